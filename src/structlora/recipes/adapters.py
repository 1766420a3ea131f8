"""``structlora eval``, ``structlora merge`` and ``structlora export``: use a trained run without training.

    structlora eval --run runs/sst2                       # GLUE dev metrics + predictions.jsonl
    structlora eval --run runs/rte --n-eval 200           # an LLM run on its evaluation sample
    structlora merge --run runs/sst2 --output merged/     # a plain transformers model, adapter merged in
    structlora export --run runs/sst2 --output peft/      # a plain PEFT LoRA folder (LoRA, MTLoRA, LoRETTA_rep)

``--run`` is a ``train glue`` / ``train llm`` / ``train nlg`` output folder (or its ``adapter/``). The base model
is the one the run recorded (``results.json``), or ``--model``. Nothing is overwritten: an existing, non-empty
``--output`` is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..tasks.data_errors import BadRows, add_skip_bad_rows_argument
from ..tasks.data_dir import add_data_dir_argument, resolve_data_dir
from .runs import TrainedRun, load_glue_run, load_run_model

def _refuse_existing(output: str) -> Path:
    folder = Path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"error: --output {output} exists and is not empty; choose another folder (nothing is "
                         "overwritten)")
    return folder


# ------------------------------------------------------------------------------------------- parsers
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR",
                        help="a `train glue` or `train llm` output folder (or its adapter/)")
    parser.add_argument("--model", default=None,
                        help="base model (default: the one the run recorded in results.json)")
    add_data_dir_argument(parser, "as for the training command")
    parser.add_argument("--split", choices=("dev", "train"), default="dev",
                        help="GLUE: which split to evaluate (LLM runs: their seeded evaluation sample)")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="GLUE: evaluate the first N examples (default: all)")
    parser.add_argument("--n-eval", type=int, default=None,
                        help="LLM: evaluation examples sampled (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where results.json and predictions.jsonl go (default: RUN/eval-SPLIT)")
    add_skip_bad_rows_argument(parser)
    parser.set_defaults(skip_bad_rows=None)  # None: as the training run did (its results.json flags)


def add_merge_arguments(parser: argparse.ArgumentParser, writes: str = "the merged model") -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a training output folder (or its adapter/)")
    parser.add_argument("--model", default=None, help="base model (default: the one the run recorded)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help=f"new folder for {writes} (refused when it exists and is not empty)")


# Bottleneck adapters (adapter_config.json's method) add a non-linear path: neither a LoRA nor mergeable.
BOTTLENECK_METHODS = ("loretta_adp", "adapter")
BOTTLENECK_DEPLOYMENT = (
    "LoRETTA_adp and dense adapters add a non-linear bottleneck: no weight update can hold them, so they are neither "
    "merged nor exported. Use the run as it is: `structlora eval --run RUN` (GLUE, LLM), `structlora generate "
    "--adapter RUN` (NLG), or in Python `peft.PeftModel.from_pretrained(base_model, \"RUN/adapter\")` after `import "
    "structlora`")


def add_merge_and_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    add_merge_arguments(parser)
    parser.description = (parser.description or "") + "\n\n" + BOTTLENECK_DEPLOYMENT + "."


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_merge_arguments(parser, writes="the PEFT LoRA folder")
    parser.description = (parser.description or "") + (
        "\n\nLoRA, MTLoRA and LoRETTA_rep export exactly (T·A and tensor trains expanded). " + BOTTLENECK_DEPLOYMENT
        + ".")


def _refuse_bottleneck(run: TrainedRun, command: str) -> None:
    if run.adapter_config.get("method") in BOTTLENECK_METHODS:
        raise SystemExit(f"error: structlora {command}: {run.adapter_dir} holds a {run.adapter_config['method']} "
                         f"adapter. {BOTTLENECK_DEPLOYMENT}")


# ------------------------------------------------------------------------------------------- commands
def run_merge(args: argparse.Namespace) -> int:
    output = _refuse_existing(args.output)
    run = TrainedRun(args.run)
    if run.is_full:
        raise SystemExit(f"error: {run.adapter_dir} holds a fully fine-tuned model: nothing to merge, load it as is")
    _refuse_bottleneck(run, "merge")
    model, tokenizer = load_run_model(run, args.model)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    print(f"merged {run.adapter_config.get('method', 'adapter')} into {run.base_model(args.model)} -> {output} "
          "(loads with transformers' from_pretrained)", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from structlora import export_to_peft

    output = _refuse_existing(args.output)
    run = TrainedRun(args.run)
    if run.is_full:
        raise SystemExit(f"error: {run.adapter_dir} holds a fully fine-tuned model, not an adapter")
    _refuse_bottleneck(run, "export")
    model, _ = load_run_model(run, args.model)
    export_to_peft(model, str(output))
    print(f"PEFT LoRA folder -> {output} (peft.PeftModel.from_pretrained(base, {str(output)!r}))", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from . import limits

    limits.check_integers(args, {"batch_size": 1, "max_eval_samples": 1, "n_eval": 1})
    run = TrainedRun(args.run)
    if args.skip_bad_rows is None:  # the same data as the training run saw (an LLM sample depends on it)
        args.skip_bad_rows = bool(run.flags.get("skip_bad_rows", False))
    bad_rows = BadRows(skip=args.skip_bad_rows)
    output = Path(args.output or run.run_dir / f"eval-{args.split}")
    if run.recipe == "nlg":
        raise SystemExit("error: NLG runs are evaluated by decoding: `structlora generate --adapter RUN --output "
                         "HYPS --score`")
    metrics, predictions, sizes = (_eval_glue(run, args, bad_rows) if run.recipe == "glue"
                                   else _eval_llm(run, args, bad_rows))
    bad_rows.print_summary()
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "predictions.jsonl", "w") as handle:
        for record in predictions:
            handle.write(json.dumps(record) + "\n")
    warn_if_collapsed([p["prediction"] for p in predictions])
    # `evaluation_of` marks this results.json as a re-evaluation, which `structlora report` does not count as a run.
    payload = {"run": str(run.run_dir), "evaluation_of": str(run.run_dir), "task": run.results.get("task"),
               "method": run.results.get("method"), "split": args.split, "eval": metrics, **sizes,
               **bad_rows.summary()}
    (output / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({**payload, "results": str(output / "results.json")}))
    return 0


def warn_if_collapsed(predictions: list[Any]) -> None:
    """A warning when every prediction is the same class (a model that learned nothing but the prior)."""
    hashable = [json.dumps(p, sort_keys=True) for p in predictions]
    if len(hashable) >= 4 and len(set(hashable)) == 1:
        print(f"warning: all {len(hashable)} predictions are {predictions[0]!r}: the model predicts one class "
              "(metrics such as MCC are then 0); train longer, raise the learning rate or check the labels",
              file=sys.stderr)


def _eval_glue(run: TrainedRun, args: argparse.Namespace, bad_rows: BadRows) -> tuple[dict[str, float], list[dict], dict]:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding

    from ..tasks.glue import load_glue
    from ..tasks.glue.data import find_task_folder, take_examples, tokenize_split
    from ..tasks.glue.metrics import compute_glue_metrics

    model, tokenizer, task = load_glue_run(run, run.base_model(args.model))
    data_dir = resolve_data_dir(args.data_dir or run.flags.get("data_dir"),
                                has_data=lambda root: find_task_folder(root, task) is not None)
    raw = load_glue(task.name, data_dir, bad_rows)
    split = task.eval_splits[0] if args.split == "dev" else "train"
    dataset = tokenize_split(take_examples(raw[split], args.max_eval_samples, None), tokenizer, task.text_columns,
                             int(run.flags.get("max_length") or 128))
    collator = DataCollatorWithPadding(tokenizer)
    model.eval()
    outputs = []
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for start in tqdm(range(0, len(dataset), args.batch_size), desc=f"eval {task.name} {split}",
                          file=sys.stderr):
            rows = [dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))]
            batch = collator([{k: v for k, v in row.items() if k != "labels"} for row in rows])
            outputs.append(model(**batch).logits.float().numpy())
    logits = np.concatenate(outputs) if outputs else np.zeros((0, task.num_labels))
    labels = np.asarray(dataset["labels"])
    predicted = logits[:, 0] if task.is_regression else logits.argmax(-1)
    metrics = compute_glue_metrics(task.name, predicted, labels)
    predictions = [{"prediction": float(p) if task.is_regression else int(p), "label": float(g) if task.is_regression
                    else int(g)} for p, g in zip(predicted, labels)]
    return metrics, predictions, {"eval_examples": len(dataset)}


def _eval_llm(run: TrainedRun, args: argparse.Namespace, bad_rows: BadRows) -> tuple[dict[str, float], list[dict], dict]:
    from ..tasks.llm.data import add_demonstrations, sample_splits
    from ..tasks.llm.evaluation import EvaluationSettings, evaluate_examples
    from ..tasks.llm.tasks import get_task

    spec = get_task(run.results["task"])
    flags, results = run.flags, run.results
    seed = int(results.get("seed", flags.get("seed", 42)))
    splits = sample_splits(spec, int(flags.get("n_train", results.get("n_train", 0))),
                           int(flags.get("n_dev", results.get("n_dev", 0))),
                           int(args.n_eval or flags.get("n_eval") or results.get("n_eval", 1000)), seed=seed,
                           data_dir=resolve_data_dir(args.data_dir or flags.get("data_dir")),
                           split_validation=bool(flags.get("split_validation", False)),
                           hub_path=flags.get("dataset_path"), bad_rows=bad_rows)
    model, tokenizer = load_run_model(run, args.model)
    model.eval()
    settings = EvaluationSettings(max_length=int(flags.get("max_length") or 2048), batch_size=args.batch_size,
                                  max_new_tokens=int(flags.get("max_new_tokens") or 50))
    examples = add_demonstrations(splits.eval, splits.train, int(results.get("icl", 0)), seed=seed)
    metrics, predictions = evaluate_examples(model, tokenizer, spec, examples, settings, results.get("objective"),
                                             progress=f"eval {spec.name}")
    return metrics, predictions, {"eval_examples": len(examples)}


# The three commands share this module; cli.py registers one thin module per command below.
class _Command:
    def __init__(self, add: Any, run: Any) -> None:
        self.add_arguments, self.run = add, run


EVAL = _Command(add_eval_arguments, run_eval)
MERGE = _Command(add_merge_and_deploy_arguments, run_merge)
EXPORT = _Command(add_export_arguments, run_export)
