"""`structlora train glue`: fine-tune an encoder on a GLUE task with LoRA, MTLoRA, LoRETTA or full FT.

    structlora train glue --task sst2 --model roberta-base --method mtlora --structure shim --output runs/x
    structlora train glue --config recipes/glue/mtlora_roberta_base_rte.yaml --model roberta-base --output runs/rte

Writes OUTPUT/results.json, OUTPUT/adapter/ (adapter + classification head, or the whole model for
``--method full``), OUTPUT/curves.png and Trainer checkpoints in OUTPUT/checkpoints/.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import flags, limits, methods, outputs, training
from ..tasks.data_dir import add_data_dir_argument, resolve_data_dir
from .runs import glue_label_settings

TASK_TYPE = "SEQ_CLS"
# The names of structlora.tasks.glue.data.GLUE_TASKS (kept here so --help needs no scientific stack; a test checks).
GLUE_TASK_NAMES: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")


# `--config` files and typed flags: the training recipes' parser (structlora.recipes.commands reads this).
PARSER_CLASS = flags.RecipeParser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods.add_method_arguments(parser)
    flags.add_training_arguments(parser)
    group = parser.add_argument_group("GLUE")
    # Not argparse-required: a --config file may supply them (checked after it is read).
    group.add_argument("--task", default=None, choices=GLUE_TASK_NAMES, type=str.lower,
                       help="GLUE task (required, flag or config file)")
    group.add_argument("--model", default=None,
                       help="hub id or local folder of the encoder (required, flag or config file)")
    add_data_dir_argument(group, "GLUE's TSV layout, e.g. SST-2/{train,dev}.tsv or sst2/{train,dev}.tsv; "
                                 "hub id nyu-mll/glue; an automatically found ../shared/data without the task "
                                 "falls back to the hub")
    group.add_argument("--max-train-samples", type=int, default=None,
                       help="train on a seeded random subset of N examples (default: all)")
    group.add_argument("--max-eval-samples", type=int, default=None,
                       help="evaluate on the first N dev examples (default: all)")
    group.add_argument("--eval-subset", type=int, default=None, metavar="N",
                       help="during training, evaluate (and pick the best checkpoint) on a seeded random N of the "
                            "dev examples; the chosen model is then evaluated once on the whole dev set "
                            "(default: the whole dev set every time)")


def run(args: argparse.Namespace) -> int:
    for required in ("task", "model", "output"):
        if not getattr(args, required):
            raise SystemExit(f"error: --{required} is required (flag or config file)")
    # Before any data or weights are read: flag ranges, --max-length against the model, the output folder.
    limits.check_before_work(args, integers={"max_train_samples": 1, "max_eval_samples": 1, "eval_subset": 1})
    from ..tasks.glue import GlueDataError

    try:
        results = train_glue(args)
    except GlueDataError as error:
        raise SystemExit(f"error: {error}") from None  # a message, not a traceback
    if outputs.is_main_process():
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in results["eval"].items() if isinstance(v, float))
        print(f"[structlora] {args.task} {results['method']}: {metrics} "
              f"({results['trainable_params']:,} trainable params; train {results['train_seconds']:.1f}s, "
              f"eval {results['eval_seconds']:.1f}s) -> {args.output}")
    return 0


def _warning_on_collapse(compute_metrics: Any, is_regression: bool) -> Any:
    """``compute_metrics`` that also warns when every prediction is the same class."""
    if is_regression:
        return compute_metrics

    def with_warning(eval_prediction: Any) -> dict[str, float]:
        from .adapters import warn_if_collapsed

        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        warn_if_collapsed([int(i) for i in logits.argmax(-1)])
        return compute_metrics(eval_prediction)

    return with_warning


def train_glue(args: argparse.Namespace) -> dict[str, Any]:
    """Load data and model, train, evaluate the best checkpoint, write the outputs; return results.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    from ..tasks.glue import load_glue, make_compute_metrics
    from ..tasks.glue.data import get_task, take_examples, tokenize_split

    task = get_task(args.task)
    args.task = task.name
    set_seed(args.seed)  # the new classification head's initialisation
    from ..tasks.glue.data import find_task_folder

    data_dir = resolve_data_dir(args.data_dir, has_data=lambda root: find_task_folder(root, task) is not None)
    bad_rows = training.bad_rows_for(args)
    raw = load_glue(task.name, data_dir, bad_rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for flag, asked, available in (("--max-train-samples", args.max_train_samples, len(raw["train"])),
                                   ("--eval-subset", args.eval_subset, len(raw[task.eval_splits[0]]))):
        if asked and asked > available:
            print(f"warning: {flag} {asked}: the data has {available} examples; using all of them", file=sys.stderr)
    train_set = tokenize_split(take_examples(raw["train"], args.max_train_samples, args.seed), tokenizer,
                               task.text_columns, args.max_length)
    full_eval = {split: take_examples(raw[split], args.max_eval_samples, None) for split in task.eval_splits}
    eval_sets = {split: tokenize_split(ds, tokenizer, task.text_columns, args.max_length, sort_by_length=True)
                 for split, ds in full_eval.items()}
    selection_sets = eval_sets
    if args.eval_subset and any(args.eval_subset < len(ds) for ds in full_eval.values()):
        selection_sets = {split: tokenize_split(take_examples(ds, args.eval_subset, args.seed), tokenizer,
                                                task.text_columns, args.max_length, sort_by_length=True)
                          for split, ds in full_eval.items()}

    def as_eval_dataset(sets: dict[str, Any]) -> Any:
        # A single set keeps Trainer's plain metric names (eval_accuracy); MNLI gets matched_/mismatched_.
        return (next(iter(sets.values())) if len(sets) == 1
                else {split.removeprefix("validation_"): ds for split, ds in sets.items()})

    model = AutoModelForSequenceClassification.from_pretrained(args.model, **glue_label_settings(task))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder-style models pool on the last non-pad
    model = methods.wrap_model(model, args, TASK_TYPE)
    trainable_params = methods.count_trainable_parameters(model)
    # Without the task head (classifier / pooler / score), which every method trains alike.
    adapter_params = methods.count_trainable_parameters(model, exclude=methods.HEAD_MODULE_NAMES)

    trainer, history, train_seconds = training.run_training(
        model, args, train_set, as_eval_dataset(selection_sets),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_warning_on_collapse(make_compute_metrics(task.name), task.is_regression),
        metric_for_best_model=task.main_metric,
        greater_is_better=True,
        processing_class=tokenizer,
    )
    # The best checkpoint is loaded (load_best_model_at_end); its metrics are the run's result. They are
    # in the history already; evaluate again only if the best evaluation cannot be found there.
    eval_metrics = None if selection_sets is not eval_sets else outputs.best_eval_metrics(trainer, history)
    if eval_metrics is None:  # the whole dev set, once, with the chosen model (eval sets one by one if a dict)
        eval_metrics = outputs.clean_eval_metrics(trainer.evaluate(as_eval_dataset(eval_sets)))
    outputs.save_final_model(trainer, args.output)
    method = methods.method_label(args)
    extra = {"recipe": "glue", "adapter_params": adapter_params, "model": args.model, "seed": args.seed,
             "main_metric": task.main_metric,
             "train_examples": len(train_set), "eval_examples": {k: len(v) for k, v in eval_sets.items()},
             "selection_eval_examples": {k: len(v) for k, v in selection_sets.items()},
             **trainer.structlora_clock.train_and_eval(), **outputs.robustness_record(trainer, bad_rows),
             "flags": outputs.flags_of(args)}
    outputs.write_results(args.output, task.name, method, trainable_params, eval_metrics, history,
                         train_seconds, extra)
    outputs.plot_curves(args.output, history, task.main_metric)
    return {"task": task.name, "method": method, "trainable_params": trainable_params, "eval": eval_metrics,
            "history": history, "train_seconds": train_seconds, **extra}
