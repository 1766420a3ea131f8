"""`structlora train llm` end to end on a tiny Llama built from a config: 2 training steps + evaluation
for each task family (classification, multiple choice, generation), zero-shot / ICL, recipes, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structlora.recipes.commands import build_parser, main
from structlora.tasks.llm.tiny import save_tiny_llama
from test_llm_tasks import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def rte_records(n: int) -> list[dict]:
    return [{"premise": f"The man saw {i} dogs.", "hypothesis": "The man saw dogs.",
             "label": "entailment" if i % 2 else "not_entailment"} for i in range(n)]


def copa_records(n: int) -> list[dict]:
    return [{"premise": "The man turned on the faucet.", "choice1": f"Water flowed {i}.", "choice2": "The cat ran.",
             "question": "effect" if i % 2 else "cause", "label": i % 2} for i in range(n)]


def squad_records(n: int) -> list[dict]:
    return [{"title": "Film", "context": f"The film was made in {1990 + i}.", "question": "When was the film made?",
             "answers": {"text": [str(1990 + i)], "answer_start": [21]}} for i in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    data = root / "data"
    write_jsonl(data / "superglue" / "RTE" / "train.jsonl", rte_records(12))
    write_jsonl(data / "superglue" / "RTE" / "val.jsonl", rte_records(6))
    write_jsonl(data / "superglue" / "COPA" / "train.jsonl", copa_records(12))
    write_jsonl(data / "superglue" / "COPA" / "val.jsonl", copa_records(6))
    write_jsonl(data / "squad" / "train.jsonl", squad_records(12))
    write_jsonl(data / "squad" / "validation.jsonl", squad_records(4))
    corpus = [json.dumps(r) for r in rte_records(4) + copa_records(4) + squad_records(4)]
    return {"root": root, "data": data, "model": save_tiny_llama(root / "tiny-llama", corpus=corpus)}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def train_llm(workspace: dict[str, Path], task: str, method: str, name: str, *extra: str) -> dict:
    output = workspace["root"] / name
    argv = ["train", "llm", "--task", task, "--model", str(workspace["model"]), "--method", method,
            "--output", str(output), "--data-dir", str(workspace["data"]), "--n-train", "4", "--n-dev", "2",
            "--n-eval", "4", "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--seed", "0", *extra]
    assert main(argv) == 0
    return json.loads((output / "results.json").read_text())


def test_classification_lora_trains_and_evaluates(workspace: dict[str, Path]) -> None:
    result = train_llm(workspace, "RTE", "lora", "rte-lora")
    assert result["task"] == "RTE" and result["family"] == "classification" and result["objective"] == "candidates"
    # LoRA r 8 on q_proj (32 -> 32) and v_proj (32 -> 16, 2 KV heads) in 2 layers: 2 * 8 * (64 + 48).
    assert result["trainable_params"] == 1792
    assert (result["n_train"], result["n_dev"], result["n_eval"]) == (4, 2, 4)
    assert result["eval"]["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert result["history"] and result["history"][-1]["step"] == 2 and result["history"][-1]["eval_loss"] > 0
    output = workspace["root"] / "rte-lora"
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    predictions = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(len(p["scores"]) == 2 for p in predictions)
    accuracy = sum(p["prediction"] in p["gold"] for p in predictions) / 4
    assert accuracy == result["eval"]["accuracy"]


def test_full_fine_tuning_saves_the_whole_model(workspace: dict[str, Path]) -> None:
    result = train_llm(workspace, "RTE", "full", "rte-full", "--gradient-checkpointing")
    assert result["method"] == "full" and result["trainable_params"] > 20_000
    assert (workspace["root"] / "rte-full" / "adapter" / "model.safetensors").is_file()


def test_multiple_choice_trains_on_the_gold_completion(workspace: dict[str, Path]) -> None:
    result = train_llm(workspace, "COPA", "loretta-adp", "copa-adp")
    assert result["family"] == "multiple_choice" and result["objective"] == "lm"
    assert result["trainable_params"] > 0
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0 and result["history"]


def test_generation_reports_f1_and_exact_match(workspace: dict[str, Path]) -> None:
    result = train_llm(workspace, "SQuAD", "mtlora", "squad-mtlora", "--max-new-tokens", "5")
    assert result["family"] == "generation" and set(result["eval"]) == {"f1", "exact_match"}
    assert 0.0 <= result["eval"]["exact_match"] <= result["eval"]["f1"] <= 1.0
    predictions = (workspace["root"] / "squad-mtlora" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(predictions[0])
    assert len(predictions) == 4 and "\n" not in first["prediction"] and first["answers"][0].startswith("199")


def test_zero_shot_and_icl_are_deterministic(workspace: dict[str, Path]) -> None:
    zero = train_llm(workspace, "RTE", "none", "rte-none")
    assert zero["trainable_params"] == 0 and zero["history"] == [] and zero["train_seconds"] == 0
    assert train_llm(workspace, "RTE", "none", "rte-none-again")["eval"] == zero["eval"]
    icl = train_llm(workspace, "RTE", "none", "rte-icl", "--icl", "2")
    assert icl["icl"] == 2 and 0.0 <= icl["eval"]["accuracy"] <= 1.0


def test_evaluation_progress_goes_to_stderr_and_keeps_logs_short(workspace: dict[str, Path],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The dev evaluations during training and the final evaluation show a bar on stderr; stdout (the Trainer's
    log lines, then the result as JSON) gets none of it. Off a terminal (here: captured) a bar draws its start and
    end, not one line per batch."""
    capsys.readouterr()
    train_llm(workspace, "RTE", "lora", "rte-progress", "--eval-every", "1", "--eval-batch-size", "1")
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["task"] == "RTE"
    assert "RTE:" not in captured.out and "\r" not in captured.out
    final = [part for part in captured.err.replace("\r", "\n").splitlines() if part.startswith("eval RTE:")]
    assert final and "4/4" in final[-1] and len(final) <= 3  # 4 batches of 1: not one redraw per batch
    assert captured.err.count("dev RTE:") >= 2  # the dev set is evaluated at steps 1 and 2


def test_report_reads_llm_runs(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    train_llm(workspace, "RTE", "none", "report-runs/rte-none")
    assert main(["report", str(workspace["root"] / "report-runs")]) == 0
    table = capsys.readouterr().out
    assert "| none | " in table and "| RTE (" in table  # the paper table: a method row, a task column
    assert main(["report", str(workspace["root"] / "report-runs"), "--per-run"]) == 0
    table = capsys.readouterr().out
    assert "| RTE | none | 0 |" in table and "accuracy" in table


def test_unreachable_data_is_a_clear_error(workspace: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="no eval data for task CB"):
        main(["train", "llm", "--task", "CB", "--model", str(workspace["model"]), "--method", "none",
              "--output", str(workspace["root"] / "cb"), "--data-dir", str(workspace["data"])])


@pytest.mark.parametrize("text,problem", [("task: nosuch\n", "key task: unknown task 'nosuch'; choose from SST-2, "),
                                          ("task-overrides: [CB]\n", "key task-overrides: expected a JSON object")])
def test_a_bad_task_in_a_recipe_file_names_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    config = tmp_path / "llm.yaml"
    config.write_text(text)
    argv = ["train", "llm", "--task", "CB", "--model", "m", "--config", str(config)]
    with pytest.raises(SystemExit, match=f"^error: {config}: {problem}"):
        build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "llm").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_apply_with_task_overrides(recipe: Path) -> None:
    from structlora.recipes.llm import apply_task_overrides

    def parse(*extra: str):
        argv = ["train", "llm", "--task", "CB", "--model", "m", "--output", "o", "--config", str(recipe), *extra]
        args = build_parser(argv).parse_args(argv)
        return apply_task_overrides(args)

    args = parse()
    assert args.method in ("lora", "loretta-rep", "loretta-adp", "adapter", "ia3", "prefix", "prompt")
    assert args.epochs == 3 and args.lr == 1e-4
    # Low-rank methods on q_proj, v_proj; adapters and PEFT's methods keep their default placement.
    low_rank = args.method in ("lora", "loretta-rep")
    assert args.target_modules == (["q_proj", "v_proj"] if low_rank else None)
    assert (args.batch_size, args.grad_accum, args.n_dev) == (1, 1, 100)  # CB's override (finetune.sh)
    assert parse("--batch-size", "2").batch_size == 2  # explicit flags win over recipes
