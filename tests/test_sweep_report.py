"""`structlora sweep` (a resumable grid) and `structlora report` (the paper table, CSV and plot)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest

import structlora.recipes.commands
from structlora.cli import main
from structlora.recipes import report, sweep
from tiny_models import save_tiny_bert


class FakeTrainer:
    """Stands in for `structlora train`: writes a results.json like the GLUE recipe, records its argv,
    and can be told to fail or to be interrupted (KeyboardInterrupt) at a given call."""

    def __init__(self, interrupt_at: int | None = None, fail_method: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.interrupt_at, self.fail_method = interrupt_at, fail_method

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        flags = dict(zip(argv[2::2], argv[3::2]))
        method = flags["--method"]
        if method == self.fail_method:
            raise SystemExit(f"error: {method} cannot run here")
        label = {"mtlora": f"mtlora-{flags.get('--structure')}",
                 "adapter": f"adapter-{flags.get('--adapter-placement')}"}.get(method, method)
        output = Path(flags["--output"])
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps({
            "task": flags["--task"], "method": label, "seed": int(flags["--seed"]), "trainable_params": 100,
            "adapter_params": 90, "eval": {"accuracy": 0.5}, "history": [], "train_seconds": 1.0}))
        return 0


def grid(output: Path, seeds: str = "0,1", methods: str = "lora,adapter-pfeiffer", extra: tuple = ()) -> int:
    return main(["sweep", "glue", "--tasks", "sst2,cola", "--methods", methods, "--seeds", seeds,
                 "--output", str(output), "--train-args", "--model m --epochs 1", *extra])


def test_interrupted_grid_continues_and_keeps_finished_runs(tmp_path, monkeypatch):
    interrupted = FakeTrainer(interrupt_at=4)
    monkeypatch.setattr(structlora.recipes.commands, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid(tmp_path)
    finished = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert len(finished) == 3  # seed 0: sst2 x 2 methods, cola lora; then the interrupt
    stamps = {p: (p / "results.json").stat().st_mtime_ns for p in finished}

    resumed = FakeTrainer()
    monkeypatch.setattr(structlora.recipes.commands, "main", resumed)
    assert grid(tmp_path) == 0
    assert len(resumed.calls) == 8 - 3  # only what was not finished
    assert all((p / "results.json").stat().st_mtime_ns == stamps[p] for p in finished)  # kept, not rerun
    assert len(list(tmp_path.rglob("results.json"))) == 8
    first = resumed.calls[0]
    assert first[:4] == ["train", "glue", "--task", "cola"]
    assert first[4:8] == ["--method", "adapter", "--adapter-placement", "pfeiffer"]
    assert first[-4:] == ["--model", "m", "--epochs", "1"]
    assert Path(first[first.index("--output") + 1]) == tmp_path / "cola" / "adapter-pfeiffer" / "seed0"

    again = FakeTrainer()
    monkeypatch.setattr(structlora.recipes.commands, "main", again)
    assert grid(tmp_path, seeds="0,1,2") == 0  # the grid grows into the same folder
    assert len(again.calls) == 4 and all(call[call.index("--seed") + 1] == "2" for call in again.calls)


def test_a_run_cut_mid_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "sst2" / "lora" / "seed0" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    fake = FakeTrainer()
    monkeypatch.setattr(structlora.recipes.commands, "main", fake)
    grid(tmp_path, seeds="0", methods="lora")
    by_output = {Path(c[c.index("--output") + 1]).relative_to(tmp_path).parts[0]: c for c in fake.calls}
    assert by_output["sst2"][-1] == "--resume" and "--resume" not in by_output["cola"]


def test_failed_runs_are_recorded_retried_and_marked(tmp_path, monkeypatch):
    monkeypatch.setattr(structlora.recipes.commands, "main", FakeTrainer(fail_method="prefix"))
    assert grid(tmp_path, seeds="0", methods="lora,prefix") == 1  # non-zero: the grid is not complete
    failed = json.loads((tmp_path / "sst2" / "prefix" / "seed0" / "failed.json").read_text())
    assert failed["status"] == "failed" and "cannot run here" in failed["error"]
    assert (failed["task"], failed["method"], failed["seed"]) == ("sst2", "prefix", 0)
    table = report.paper_table(report.load_runs([tmp_path]))
    prefix_row = next(line for line in table.splitlines() if line.startswith("| prefix "))
    assert "✗ 1 failed" in prefix_row and prefix_row.split(" | ")[-2] == "–"  # no average
    retry = FakeTrainer()
    monkeypatch.setattr(structlora.recipes.commands, "main", retry)
    assert grid(tmp_path, seeds="0", methods="lora,prefix") == 0
    assert [c[c.index("--method") + 1] for c in retry.calls] == ["prefix", "prefix"]
    assert not list(tmp_path.rglob("failed.json"))  # finished since


def test_sweep_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(structlora.recipes.commands, "main", FakeTrainer())
    with pytest.raises(SystemExit, match="unknown method 'lorra'"):
        grid(tmp_path, methods="lora,lorra")
    with pytest.raises(SystemExit, match="--seed in --train-args"):
        main(["sweep", "glue", "--tasks", "sst2", "--methods", "lora", "--output", str(tmp_path),
              "--train-args", "--seed 3"])
    grid(tmp_path, seeds="0", methods="lora")
    with pytest.raises(SystemExit, match="other training flags"):  # one folder, one budget
        main(["sweep", "glue", "--tasks", "sst2", "--methods", "lora", "--seeds", "0", "--output", str(tmp_path),
              "--train-args", "--model m --epochs 2"])


def write_run(root: Path, task: str, method: str, seed: int, metrics: dict, adapter: int = 1000) -> None:
    folder = root / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "task": task, "method": method, "seed": seed, "trainable_params": adapter + 10, "adapter_params": adapter,
        "eval": metrics, "history": [], "train_seconds": 2.0 + seed}))


def test_report_names_every_folder_it_leaves_out_and_why(tmp_path, capsys):
    write_run(tmp_path / "good", "sst2", "lora", 0, {"accuracy": 0.9})
    half = tmp_path / "half"  # interrupted: checkpoints, no results.json
    (half / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (half / "checkpoints" / "checkpoint-10").mkdir()
    diverged = tmp_path / "grid" / "diverged"
    diverged.mkdir(parents=True)
    (diverged / "results.json").write_text(json.dumps({"status": "diverged", "error": "loss is NaN at step 3"}))
    unfinished = tmp_path / "grid" / "seed1"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert main(["report", str(tmp_path / "good"), str(half), str(tmp_path / "grid"), str(tmp_path / "none")]) == 0
    captured = capsys.readouterr()
    assert "| lora |" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("note: not in the table: ")]
    assert notes == [
        f"note: not in the table: {half}: no results.json: an unfinished run (resume it with --resume); its last "
        "checkpoint is checkpoint-10",
        f"note: not in the table: {unfinished}: no results.json: an unfinished run (resume it with --resume)",
        f"note: not in the table: {diverged}: diverged: loss is NaN at step 3",
        f"note: not in the table: {tmp_path / 'none'}: does not exist"]


def test_report_rows_per_model_and_only_fractions_times_100(tmp_path):
    write_run(tmp_path / "bert", "sst2", "lora", 0, {"accuracy": 0.9})
    write_run(tmp_path / "roberta", "sst2", "lora", 0, {"accuracy": 0.8})
    write_run(tmp_path / "gpt2", "nlg-e2e", "lora", 0, {"eval_loss": 3.32})
    for model in ("bert", "roberta", "gpt2"):
        path = next((tmp_path / model).rglob("results.json"))
        path.write_text(json.dumps({**json.loads(path.read_text()), "model": model, "main_metric": "eval_loss"
                                    if model == "gpt2" else "accuracy"}))
    table = report.paper_table(report.load_runs([tmp_path]))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["bert · lora", "gpt2 · lora", "roberta · lora"]
    assert rows["method"][3:5] == ["sst2 (acc)", "nlg-e2e (eval_loss)"]
    assert rows["bert · lora"][3:5] == ["90.0", "–"] and rows["roberta · lora"][3:5] == ["80.0", "–"]
    assert rows["gpt2 · lora"][4] == "3.3"  # a loss, not a fraction: not ×100 (was 332.0)
    one_model = report.paper_table(report.load_runs([tmp_path / "bert"]))
    assert "| lora |" in one_model and "·" not in one_model


def test_paper_table_metrics_marks_csv_and_plot(tmp_path):
    for seed, (mcc, acc, f1) in enumerate([(0.50, 0.80, 0.90), (0.52, 0.82, 0.86), (0.54, 0.84, 0.88)]):
        write_run(tmp_path, "cola", "lora", seed, {"matthews_correlation": mcc})
        write_run(tmp_path, "mrpc", "lora", seed, {"accuracy": acc, "f1": f1})
        write_run(tmp_path, "cola", "bitfit", seed, {"matthews_correlation": mcc - 0.1}, adapter=50)
    write_run(tmp_path, "mrpc", "bitfit", 0, {"accuracy": 0.70, "f1": 0.80}, adapter=50)
    write_run(tmp_path, "mrpc", "bitfit", 1, {"accuracy": 0.72, "f1": None}, adapter=50)  # NaN F1
    (tmp_path / "mrpc" / "bitfit" / "seed2").mkdir()
    (tmp_path / "mrpc" / "bitfit" / "seed2" / "failed.json").write_text(json.dumps(
        {"task": "mrpc", "method": "bitfit", "seed": 2, "error": "boom"}))

    table = report.paper_table(report.load_runs([tmp_path]))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["method"][3:5] == ["cola (MCC)", "mrpc (acc/F1)"]
    assert rows["bitfit"][0] == "| bitfit"  # the papers' order: baselines before LoRA
    assert list(rows)[1:] == ["bitfit", "lora"]
    lora = rows["lora"]
    assert lora[1:3] == ["1,000", "1,010"]
    assert lora[3] == "52.0 ± 2.0" and lora[4] == "82.0 ± 2.0 / 88.0 ± 2.0"
    assert lora[5] == f"{(52.0 + (82.0 + 88.0) / 2) / 2:.1f}"  # average, unmarked: every cell complete
    bitfit = rows["bitfit"]
    assert bitfit[4] == "70.0 / 80.0 †(n=1/3, 1 failed, 1 NaN)"  # one seed has no spread: no "± 0.0"
    assert bitfit[5].endswith("†")  # an average over an incomplete cell is marked
    assert "†: fewer seeds than expected" in table

    cells = report.build_cells(report.load_runs([tmp_path]))
    rows_csv = list(csv.DictReader(io.StringIO(report.csv_table(cells))))
    f1 = next(r for r in rows_csv if (r["method"], r["task"], r["metric"]) == ("lora", "mrpc", "f1"))
    assert (f1["mean"], f1["std"], f1["n_seeds"], f1["values"], f1["complete"]) == (
        "88.0000", "2.0000", "3", "90.0000;86.0000;88.0000", "True")
    incomplete = next(r for r in rows_csv if (r["method"], r["task"], r["metric"]) == ("bitfit", "mrpc", "accuracy"))
    assert (incomplete["std"], incomplete["n_seeds"], incomplete["n_failed"], incomplete["n_nan"],
            incomplete["complete"]) == ("", "1", "1", "1", "False")

    png, md, csv_path = tmp_path / "t.png", tmp_path / "t.md", tmp_path / "t.csv"
    assert main(["report", str(tmp_path), "--plot", str(png), "--output", str(md), "--csv", str(csv_path)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert md.read_text().strip() == table and csv_path.read_text() == report.csv_table(cells)


def test_sweep_trains_baselines_end_to_end(tmp_path):
    """A real (one-step) grid on a tiny BERT: PEFT's IA3, BitFit and dense adapters in the results layout."""
    pytest.importorskip("peft")
    model = save_tiny_bert(tmp_path / "tiny-bert")
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    rng = random.Random(0)
    for name, n in (("train", 16), ("dev", 8)):
        rows = [f"{i % 2}\t{rng.choice(['the film was good', 'a great movie', 'an awful movie'])}" for i in range(n)]
        (data / f"{name}.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n")
    output = tmp_path / "grid"
    assert main(["sweep", "glue", "--tasks", "sst2", "--methods", "ia3,bitfit,adapter-houlsby", "--seeds", "0",
                 "--output", str(output), "--train-args",
                 f"--model {model} --data-dir {data.parent} --max-steps 1 --batch-size 8"]) == 0
    results = {r["method"]: r for r in report.load_runs([output])}
    assert set(results) == {"ia3", "bitfit", "adapter-houlsby"}
    head = 32 * 2 + 2
    assert results["ia3"]["adapter_params"] == 2 * (32 * 3 + 64)  # PEFT's BERT defaults (key, value, output.dense)
    assert results["bitfit"]["adapter_params"] == 2 * (4 * 32 + 64 + 3 * 32) + 32  # biases, embeddings' LN
    pooler_bias = 32  # BitFit also trains the pooler's bias, counted with the head
    assert {m: r["trainable_params"] - r["adapter_params"] for m, r in results.items()} == {
        "ia3": head, "bitfit": head + pooler_bias, "adapter-houlsby": head}
    assert all(set(r) >= {"task", "method", "seed", "trainable_params", "eval", "history", "train_seconds"}
               for r in results.values())
    assert (output / "sst2" / "ia3" / "seed0" / "adapter" / "adapter_model.safetensors").is_file()
    run = json.loads((output / "sst2" / "bitfit" / "seed0" / "sweep_run.json").read_text())
    assert run["status"] == "finished" and run["process_cpu_seconds"] > 0


def test_method_names_are_defined_once_and_the_table_orders_every_one():
    from structlora import config, demo
    from structlora.recipes import methods

    assert sorted(report._TABLE_ORDER) == sorted(methods.METHODS)  # every --method has its row position
    assert report.METHOD_ORDER[:3] == ("full", "bitfit", "adapter-houlsby")
    assert set(demo.METHODS) <= set(methods.METHODS) and methods.MTLORA_STRUCTURES is config.MTLORA_STRUCTURES
    assert [sweep.canonical_label(m) for m in ("mtlora", "adapter", "lora")] == ["mtlora-shim", "adapter-houlsby",
                                                                                "lora"]
