"""`structlora eval`, `merge` and `export` on a tiny BERT run, and `--max-steps 0` (evaluation only)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from structlora.cli import main
from tiny_models import save_tiny_bert

POSITIVE = ["the film was good", "a great movie", "i liked the story", "very fun and good"]
NEGATIVE = ["the film was bad", "an awful movie", "i hated the plot", "very boring and bad"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-commands")
    rng = random.Random(0)
    for split, n in (("train", 32), ("dev", 12)):
        rows = [[str(i % 2), rng.choice(POSITIVE if i % 2 else NEGATIVE)] for i in range(n)]
        (root / "data" / "sst2").mkdir(parents=True, exist_ok=True)
        (root / "data" / "sst2" / f"{split}.tsv").write_text(
            "\n".join("\t".join(r) for r in [["label", "sentence"], *rows]) + "\n")
    model = save_tiny_bert(root / "bert")
    run = root / "run"
    assert main(["train", "glue", "--task", "sst2", "--model", str(model), "--data-dir", str(root / "data"),
                 "--method", "mtlora", "--structure", "icfm", "--init", "identity", "--max-steps", "3",
                 "--batch-size", "8", "--lr", "1e-2", "--seed", "0", "--output", str(run)]) == 0
    return {"root": root, "model": model, "run": run, "data": root / "data"}


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_eval_reproduces_the_runs_dev_metrics_and_writes_predictions(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(trained["run"])]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_results = json.loads((trained["run"] / "results.json").read_text())
    assert printed["eval"]["accuracy"] == pytest.approx(run_results["eval"]["accuracy"])
    predictions = (trained["run"] / "eval-dev" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and printed["eval_examples"] == 12
    # A report over the folder holding the run counts the run once, not its re-evaluation as a second seed.
    from structlora.recipes.report import load_runs

    assert [Path(r["run"]) for r in load_runs([trained["root"]])] == [trained["run"]]


def test_max_steps_zero_does_not_train(trained, tmp_path):
    output = tmp_path / "zero"
    assert main(["train", "glue", "--task", "sst2", "--model", str(trained["model"]), "--data-dir",
                 str(trained["data"]), "--max-steps", "0", "--output", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["history"] == [] and results["train_seconds"] == 0 and "accuracy" in results["eval"]
    from safetensors.torch import load_file

    weights = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert all(float(t.abs().sum()) == 0 for name, t in weights.items() if "lora_B" in name)  # B still zero


def test_merge_gives_a_plain_model_with_the_same_outputs(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from structlora.recipes.adapters import TrainedRun, load_run_model

    assert main(["merge", "--run", str(trained["run"]), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapted, _ = load_run_model(TrainedRun(str(trained["run"])), None)
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(adapted, tokenizer), atol=1e-5, rtol=1e-4)
    # Nothing is overwritten.
    with pytest.raises(SystemExit, match="not empty"):
        main(["merge", "--run", str(trained["run"]), "--output", str(tmp_path / "merged")])


def test_export_gives_a_peft_folder_with_the_same_outputs(trained, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from structlora.recipes.adapters import TrainedRun, load_run_model

    assert main(["export", "--run", str(trained["run"]), "--output", str(tmp_path / "peft")]) == 0
    base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=2)
    exported = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    adapted, _ = load_run_model(TrainedRun(str(trained["run"])), None)
    torch.testing.assert_close(logits_of(exported, tokenizer), logits_of(adapted, tokenizer), atol=1e-5, rtol=1e-4)


def test_eval_refuses_a_bad_row_unless_skipped_and_counts_it(trained, tmp_path):
    """`eval` reads data with the same rule as training: a bad row is one error line naming file:line (nothing is
    written); with --skip-bad-rows it is skipped and counted in the evaluation's results.json."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    dev = data / "sst2" / "dev.tsv"
    dev.write_text(dev.read_text() + "2\ta third class\n")
    output = tmp_path / "eval"
    argv = ["eval", "--run", str(trained["run"]), "--data-dir", str(data), "--output", str(output)]
    assert main(argv) == 1
    assert not output.exists()
    assert main([*argv, "--skip-bad-rows"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert (results["eval_examples"], results["skipped_bad_rows"]) == (12, 1)
    assert results["bad_rows"]["first"] == [f"{dev}:14: label '2' is not one of 0..1 (task 'sst2')"]


@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("method", ["loretta_adp", "adapter"])
def test_merge_and_export_of_a_bottleneck_adapter_say_what_does_work(tmp_path, capsys, command, method):
    from structlora.recipes.commands import build_parser

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"method": method, "task_type": "SEQ_CLS"}))
    (run / "results.json").write_text(json.dumps({"task": "sst2", "model": "m"}))
    with pytest.raises(SystemExit) as refused:
        main([command, "--run", str(run), "--output", str(tmp_path / "out")])
    message = str(refused.value.code)
    assert message.startswith(f"error: structlora {command}: {run / 'adapter'} holds a {method} adapter.")
    assert "`structlora eval --run RUN`" in message and "`structlora generate --adapter RUN`" in message
    assert "PeftModel.from_pretrained(base_model, \"RUN/adapter\")" in message
    assert not (tmp_path / "out").exists()
    parser = build_parser([command])
    help_text = next(a for a in parser._actions if a.dest == "command").choices[command].format_help()
    assert "structlora generate" in " ".join(help_text.split())


def test_merge_prints_no_load_report_for_the_head_the_adapter_holds(trained, tmp_path):
    """The run's base loads without its classifier (the adapter holds it): transformers' MISSING report is not
    shown; a report that names other tensors still would be (tests/test_cli_errors.py)."""
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler := Keep())
    try:
        assert main(["merge", "--run", str(trained["run"]), "--output", str(tmp_path / "merged")]) == 0
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "LOAD REPORT" in m]


def test_a_run_says_which_recipe_trained_it(trained, tmp_path):
    from structlora.recipes.runs import TrainedRun

    assert json.loads((trained["run"] / "results.json").read_text())["recipe"] == "glue"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"method": "lora"}))
    (tmp_path / "results.json").write_text(json.dumps({"recipe": "llm", "task": "rte"}))
    assert TrainedRun(tmp_path).recipe == "llm"  # recorded, not guessed (a task alone would read as GLUE)
