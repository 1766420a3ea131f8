"""End to end through the CLI on a tiny BERT: every method, MNLI/STS-B, --init-from, --resume, torchrun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from structlora.cli import main
from tiny_models import save_tiny_bert

SRC = Path(__file__).resolve().parents[1] / "src"
POSITIVE = ["the film was good", "a great movie", "i liked the story", "very fun and good", "great actors"]
NEGATIVE = ["the film was bad", "an awful movie", "i hated the plot", "very boring and bad", "bad actors"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """sst2 in the shared layout; GLUE-layout MNLI, RTE and STS-B; tiny and seeded."""
    root = tmp_path_factory.mktemp("glue-data")
    rng = random.Random(0)

    def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")

    def sentiment(n: int) -> list[list[str]]:
        return [[str(i % 2), rng.choice(POSITIVE if i % 2 else NEGATIVE)] for i in range(n)]

    write(root / "sst2" / "train.tsv", ["label", "sentence"], sentiment(64))
    write(root / "sst2" / "dev.tsv", ["label", "sentence"], sentiment(16))

    def pairs(n: int, labels: list[str]) -> list[list[str]]:
        return [[str(i), rng.choice(POSITIVE), rng.choice(NEGATIVE), labels[i % len(labels)]] for i in range(n)]

    mnli_labels = ["entailment", "neutral", "contradiction"]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        write(root / "MNLI" / name, ["index", "sentence1", "sentence2", "gold_label"], pairs(24, mnli_labels))
    for name in ("train.tsv", "dev.tsv"):
        write(root / "RTE" / name, ["index", "sentence1", "sentence2", "label"],
              pairs(24, ["entailment", "not_entailment"]))
        write(root / "STS-B" / name, ["index", "sentence1", "sentence2", "score"], pairs(24, ["0.5", "2.5", "4.8"]))
    return root


def train(model: Path, data: Path, output: Path, *extra: str) -> dict:
    argv = ["train", "glue", "--model", str(model), "--data-dir", str(data), "--output", str(output),
            "--batch-size", "8", "--seed", "0", *extra]
    assert main(argv) == 0
    return json.loads((output / "results.json").read_text())


EXPECTED_METHOD_LABEL = {"lora": "lora", "mtlora": "mtlora-icfm", "loretta-rep": "loretta-rep",
                         "loretta-adp": "loretta-adp", "full": "full"}


# Each method gets only the flags it reads (any other is refused: tests/test_method_flags.py).
METHOD_FLAGS = {"lora": ["--r", "4"], "mtlora": ["--structure", "icfm", "--r", "4"],
                "loretta-rep": ["--r", "4", "--tensor-rank", "2"],
                "loretta-adp": ["--tensor-rank", "2", "--bottleneck-size", "8"], "full": []}


@pytest.mark.parametrize("method", list(EXPECTED_METHOD_LABEL))
def test_two_steps_per_method(tiny_bert, data_dir, tmp_path, method):
    out = tmp_path / "run"
    results = train(tiny_bert, data_dir, out, "--task", "sst2", "--method", method, *METHOD_FLAGS[method],
                    "--max-steps", "2", "--eval-every", "1", "--lr", "1e-3")
    assert set(results) >= {"task", "method", "trainable_params", "eval", "history", "train_seconds"}
    assert (results["task"], results["method"]) == ("sst2", EXPECTED_METHOD_LABEL[method])
    assert 0.0 <= results["eval"]["accuracy"] <= 1.0 and list(results["eval"]) == ["accuracy"]
    assert [record["step"] for record in results["history"]] == [1, 2]
    assert all(r["train_loss"] > 0 and r["eval_loss"] > 0 for r in results["history"])
    assert results["train_seconds"] > 0
    full_size = 24_546  # every parameter of the tiny BERT classifier
    # The head: a 2-way classifier on 32 features, plus the BERT pooler when it is trained (full only).
    head_size = 32 * 2 + 2 + (32 * 32 + 32 if method == "full" else 0)
    assert results["adapter_params"] == results["trainable_params"] - head_size
    if method == "full":
        assert results["trainable_params"] == full_size
        assert (out / "adapter" / "model.safetensors").is_file()
    else:
        assert 0 < results["trainable_params"] < full_size // 4
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
        saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert any("classifier" in name for name in saved)  # the head travels with the adapter
        for checkpoint in (out / "checkpoints").glob("checkpoint-*"):  # adapter + head only
            names = {p.name for p in checkpoint.iterdir()}
            assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert not list((out / "adapter").glob("*.bin"))  # pickle-free output folder
    assert (out / "curves.png").stat().st_size > 1000


def test_mnli_two_eval_sets_then_rte_init_from_mnli(tiny_bert, data_dir, tmp_path):
    mnli = train(tiny_bert, data_dir, tmp_path / "mnli", "--task", "mnli", "--method", "lora", "--epochs", "1",
                 "--lr", "5e-2")
    assert set(mnli["eval"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert mnli["history"][0]["step"] == 3 and "mismatched_accuracy" in mnli["history"][0]
    # The RTE head is 2-way, the MNLI one 3-way: the adapter is reused, the head starts fresh.
    adapter = tmp_path / "mnli" / "adapter"
    rte = train(tiny_bert, data_dir, tmp_path / "rte", "--task", "rte", "--method", "lora", "--max-steps", "1",
                "--lr", "0", "--init-from", str(adapter))
    mnli_weights = load_file(str(adapter / "adapter_model.safetensors"))
    rte_weights = load_file(str(tmp_path / "rte" / "adapter" / "adapter_model.safetensors"))
    adapter_names = [n for n in mnli_weights if "lora" in n]
    assert adapter_names and all((mnli_weights[n] == rte_weights[n]).all() for n in adapter_names)
    assert rte["task"] == "rte" and 0.0 <= rte["eval"]["accuracy"] <= 1.0


def test_init_from_an_adapter_of_another_structure_is_one_error_line(tiny_bert, data_dir, tmp_path, capsys):
    """A dtsm run's adapter has the tensors of a ctcm one: --init-from it into a ctcm run is refused, not loaded."""
    train(tiny_bert, data_dir, tmp_path / "dtsm", "--task", "sst2", "--method", "mtlora", "--structure", "dtsm",
          "--max-steps", "1")
    argv = ["train", "glue", "--model", str(tiny_bert), "--data-dir", str(data_dir), "--output", str(tmp_path / "ctcm"),
            "--task", "sst2", "--method", "mtlora", "--structure", "ctcm", "--max-steps", "1",
            "--init-from", str(tmp_path / "dtsm")]
    capsys.readouterr()
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --init-from {tmp_path / 'dtsm'}: its adapter has another structure than this "
                            "run's (structure 'dtsm' there, 'ctcm' here, from adapter_config.json)")
    assert not (tmp_path / "ctcm" / "results.json").exists()


def test_stsb_regression_via_config_file(tiny_bert, data_dir, tmp_path):
    config = tmp_path / "stsb.yaml"
    config.write_text("task: stsb\nmethod: loretta-rep\ntensor-rank: 2\nmax-steps: 2\neval-every: 2\nlr: 1e-2\n")
    results = train(tiny_bert, data_dir, tmp_path / "stsb", "--config", str(config))
    assert (results["task"], results["method"]) == ("stsb", "loretta-rep")
    assert set(results["eval"]) == {"pearson", "spearmanr"}


def test_resume_matches_uninterrupted_run(tiny_bert, data_dir, tmp_path):
    # Constant learning rate, so a run cut at step 2 (--max-steps 2) is exactly the first half of a 4-step run.
    common = ["--task", "sst2", "--method", "lora", "--lr", "5e-2", "--lr-scheduler", "constant", "--eval-every", "2"]
    straight = train(tiny_bert, data_dir, tmp_path / "straight", *common, "--max-steps", "4")
    train(tiny_bert, data_dir, tmp_path / "resumed", *common, "--max-steps", "2")
    resumed = train(tiny_bert, data_dir, tmp_path / "resumed", *common, "--max-steps", "4", "--resume")
    assert resumed["eval"] == straight["eval"]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["step"] == b["step"]
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    last = "checkpoints/checkpoint-4/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / last)), load_file(str(tmp_path / "resumed" / last))
    assert all(float((a[name] - b[name]).abs().max()) < 1e-6 for name in a)


def test_resume_with_another_training_flag_is_refused_unless_allowed_then_recorded(tiny_bert, data_dir, tmp_path,
                                                                                     capsys):
    flags = ["--task", "sst2", "--method", "lora", "--lr", "5e-2", "--lr-scheduler", "constant", "--eval-every", "2"]
    out = tmp_path / "run"
    train(tiny_bert, data_dir, out, *flags, "--max-steps", "2")
    argv = ["train", "glue", "--model", str(tiny_bert), "--data-dir", str(data_dir), "--output", str(out),
            "--seed", "0", *flags, "--max-steps", "4", "--resume", "--lr", "0.5", "--batch-size", "4"]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert str(refused.value.code).startswith("error: --resume: --batch-size 4 (the run: 8), --lr 0.5 (the run: "
                                              f"0.05) differ from the flags {out} was trained with")
    capsys.readouterr()
    assert not (out / "checkpoints" / "checkpoint-4").exists()
    assert main([*argv, "--allow-resume-changes"]) == 0
    assert "--lr 0.5 (the run: 0.05) not used: the optimizer continues with the checkpoint's" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["flags"]["lr"] == 0.05 and results["flags"]["batch_size"] == 4  # what ran
    assert results["resumes"] == [{"resume": "latest", "changed": {"batch_size": {"run": 8, "resumed": 4}},
                                   "not_used": {"lr": 0.5}}]


def test_torchrun_two_processes_gloo(tiny_bert, data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "structlora.cli", "train", "glue", "--task", "sst2", "--model", str(tiny_bert),
               "--data-dir", str(data_dir), "--output", str(out), "--method", "loretta-adp",
               "--bottleneck-size", "8", "--max-steps", "2", "--eval-every", "2", "--batch-size", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "loretta-adp" and 0.0 <= results["eval"]["accuracy"] <= 1.0
    # One RNG state per process: both ranks took part; the loss has the single-process scale (~ln 2).
    assert {p.name for p in (out / "checkpoints" / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}
    assert 0.3 < results["history"][0]["eval_loss"] < 1.2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
