"""Training: ``transformers.TrainingArguments`` from the flags, the Trainer class of a method, and ``run_training``
(evaluation and checkpoints per epoch or every ``--eval-every`` steps, the best checkpoint reloaded at the end,
``(trainer, history, train_seconds)`` returned; a ``history`` is one dict per evaluation: ``{"epoch", "step",
"train_loss", "eval_loss", <metric>: value, ...}``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..tasks.data_errors import BadRows
from .checkpoints import check_output_dir, checkpoint_dir, resume_checkpoint, write_status
from .device import has_accelerator as _has_accelerator
from .device import resolve_device_settings
from .methods import PEFT_LIBRARY_METHODS, count_trainable_parameters
from .outputs import history_from_log, is_main_process

if TYPE_CHECKING:
    import torch


def make_training_arguments(args: argparse.Namespace, **overrides: Any):  # -> transformers.TrainingArguments
    """TrainingArguments from the shared flags; keyword ``overrides`` win (any TrainingArguments field)."""
    from transformers import TrainingArguments

    if not args.output:
        raise SystemExit("error: --output DIR is required (flag or config file)")
    resolve_device_settings(args)
    interval = "steps" if args.eval_every else "epoch"
    logging_steps = args.logging_steps or args.eval_every or 50
    warmup: float = args.warmup_steps if args.warmup_steps else args.warmup_ratio
    settings: dict[str, Any] = dict(
        output_dir=checkpoint_dir(args),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=getattr(args, "max_grad_norm", 1.0),
        adam_beta1=getattr(args, "adam_beta1", 0.9),
        adam_beta2=getattr(args, "adam_beta2", 0.999),
        adam_epsilon=getattr(args, "adam_epsilon", 1e-8),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or max(args.batch_size, 32),
        gradient_accumulation_steps=args.grad_accum,
        label_smoothing_factor=args.label_smoothing,
        bf16=bool(args.bf16),
        fp16=bool(args.fp16),
        seed=args.seed,
        data_seed=args.seed,
        eval_strategy=interval,
        save_strategy=interval,
        eval_steps=args.eval_every,
        save_steps=args.eval_every,
        logging_strategy="steps",
        logging_steps=logging_steps,
        # Best + latest survive; Trainer never deletes the best one.
        save_total_limit=2,
        load_best_model_at_end=getattr(args, "checkpoint", "best") == "best",
        # The adapter wrapper's forward is generic (**kwargs): Trainer cannot infer columns or labels.
        label_names=["labels"],
        remove_unused_columns=False,
        report_to=_report_to(getattr(args, "report_to", None)),
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_accelerator(),  # pinning only helps host-to-device copies
        # Without an accelerator, only use_cpu makes accelerate honour torchrun (gloo DDP) on CPU.
        use_cpu=not _has_accelerator(),
    )
    if getattr(args, "group_by_length", False):
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        if "train_sampling_strategy" in fields:  # transformers 5
            settings["train_sampling_strategy"] = "group_by_length"
        else:
            settings["group_by_length"] = True
    if args.gradient_checkpointing:
        # transformers 5 renamed the field; the old name still works but warns.
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        settings["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    settings.update(overrides)
    return TrainingArguments(**settings)


def _report_to(value: Any) -> str | list[str]:
    if not value:
        return "none"
    items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
    return items[0] if len(items) == 1 else list(items)


def default_trainer_class(method: str, model: Any = None) -> type:
    """The Trainer of ``--method``: the stock one with the non-finite guard for full fine-tuning and PEFT's own
    methods, ``structlora.AdapterTrainer`` for structlora's methods (a ``peft.PeftModel``), and for a model on
    structlora's look-alike class (BitFit, which has no PEFT tuner; ``adapter_model.has_peft_tuner``) that class's
    trainer (``structlora.lookalike_trainer``)."""
    if method == "full" or method in PEFT_LIBRARY_METHODS:  # the stock Trainer saves PEFT's own methods
        from structlora.trainer import GuardedTrainer

        return GuardedTrainer
    from .adapter_model import is_peft_model

    if method == "bitfit" or (model is not None and not is_peft_model(model)):
        from structlora.lookalike_trainer import LookAlikeAdapterTrainer

        return LookAlikeAdapterTrainer
    from structlora import AdapterTrainer

    return AdapterTrainer


def run_training(
    model: torch.nn.Module,
    args: argparse.Namespace,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Callable | None,
    compute_metrics: Callable | None,
    metric_for_best_model: str,
    greater_is_better: bool = True,
    trainer_cls: type | None = None,
    **trainer_kwargs: Any,
) -> tuple[Any, list[dict[str, Any]], float]:
    """Train with evaluation + checkpointing per epoch (or every ``--eval-every`` steps), reload the best
    checkpoint, and return ``(trainer, history, train_seconds)``. ``eval_dataset`` may be a dict of named
    sets (metric names then carry the set name, e.g. ``matched_accuracy``)."""
    if not args.output:
        raise SystemExit("error: --output DIR is required (flag or config file)")
    check_output_dir(args)
    overrides: dict[str, Any] = {}
    if not args.logging_steps and not args.eval_every and train_dataset is not None:
        # At least one loss log per epoch, so every history record has a training loss.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        steps_per_epoch = math.ceil(len(train_dataset) / (args.batch_size * world_size)) // max(args.grad_accum, 1)
        overrides["logging_steps"] = max(1, min(50, steps_per_epoch))
    training_args = make_training_arguments(
        args, metric_for_best_model=metric_for_best_model, greater_is_better=greater_is_better, **overrides
    )
    trainer_cls = trainer_cls or default_trainer_class(args.method, model)
    from structlora.trainer import NonFiniteGuard

    if issubclass(trainer_cls, NonFiniteGuard):
        trainer_kwargs.setdefault("skip_nonfinite_steps", bool(getattr(args, "skip_nonfinite_steps", False)))
    if getattr(args, "loraplus_lr_ratio", None) is not None:  # read by AdapterTrainer (the low-rank methods)
        trainer_kwargs.setdefault("loraplus_lr_ratio", args.loraplus_lr_ratio)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        **trainer_kwargs,
    )
    if hasattr(trainer, "allow_incomplete_checkpoint"):
        trainer.allow_incomplete_checkpoint = bool(getattr(args, "allow_incomplete_checkpoint", False))
    if not _loss_uses_num_items_in_batch(model):
        # Trainer assumes a model whose forward takes **kwargs normalises its loss by the token count it
        # passes (num_items_in_batch) and so skips the division by gradient-accumulation steps and scales
        # by the world size under DDP. Classification heads take a plain batch mean: without this, the
        # loss and gradients come out multiplied by grad-accum steps / number of processes.
        trainer.model_accepts_loss_kwargs = False
    clock = PhaseClock()
    trainer.evaluate = clock.timed("eval", trainer.evaluate)  # Trainer's in-training evaluations call this
    trainer.structlora_clock = clock
    print_run_summary(args, model, train_dataset, eval_dataset, training_args)
    if args.max_steps == 0:  # evaluation only: Trainer would read 0 as "no limit" and train --epochs
        print("note: --max-steps 0: no training step; the model is evaluated as loaded", file=sys.stderr)
        return trainer, [], 0.0
    from structlora.trainer import NonFiniteTrainingError

    try:
        with clock.phase("train_loop"):
            trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    except NonFiniteTrainingError as error:
        write_status(args.output, "diverged", str(error))
        raise SystemExit(f"error: {error}") from None
    clock.close_training()
    # Training time without the evaluations made during training (reported separately as eval time).
    train_seconds = clock.train_and_eval()["train_seconds"]
    skipped = getattr(trainer, "skipped_nonfinite_steps", 0)
    if skipped:
        print(f"warning: skipped {skipped} step(s) with a non-finite loss or gradient", file=sys.stderr)
    return trainer, history_from_log(trainer.state.log_history), train_seconds


def bad_rows_for(args: argparse.Namespace) -> BadRows:
    """The bad-row policy of ``--skip-bad-rows`` (default: the first bad data row is an error naming file:line)."""
    return BadRows(skip=bool(getattr(args, "skip_bad_rows", False)))


def print_run_summary(args: argparse.Namespace, model: Any, train_dataset: Any, eval_dataset: Any,
                      training_args: Any) -> None:
    """One block on stderr with what is actually used: examples per split after sampling, effective batch,
    precision, device, trainable parameters."""
    if not is_main_process():
        return
    from .device import device_name, precision_name

    def size(dataset: Any) -> str:
        if dataset is None:
            return "0"
        if isinstance(dataset, Mapping):
            return ", ".join(f"{name} {len(d)}" for name, d in dataset.items())
        return str(len(dataset))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    effective = args.batch_size * max(args.grad_accum, 1) * world
    trainable = count_trainable_parameters(model)
    print(f"[structlora] examples: train {size(train_dataset)}, eval {size(eval_dataset)} | effective batch "
          f"{effective} ({args.batch_size} x {max(args.grad_accum, 1)} accumulation x {world} process(es)) | "
          f"{precision_name(args)}{', gradient checkpointing' if args.gradient_checkpointing else ''} | "
          f"device {device_name()} | method {args.method}, {trainable:,} trainable parameters | "
          f"report to {training_args.report_to}", file=sys.stderr, flush=True)


class PhaseClock:
    """Wall-clock and process CPU seconds per named phase (CPU time: all threads of this process, so on a
    shared machine it measures the work done, where wall time also measures the other tenants)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` with every call counted in phase ``name``."""
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)
        return wrapper

    def close_training(self) -> None:
        """Mark the end of the training loop: evaluations so far ran inside it."""
        self.wall["eval_in_training"] = self.wall.get("eval", 0.0)
        self.cpu["eval_in_training"] = self.cpu.get("eval", 0.0)

    def train_and_eval(self) -> dict[str, float]:
        """Training (loop minus in-training evaluations) and all evaluation, wall and CPU seconds."""
        loop_wall = self.wall.get("train_loop", 0.0) - self.wall.get("eval_in_training", 0.0)
        loop_cpu = self.cpu.get("train_loop", 0.0) - self.cpu.get("eval_in_training", 0.0)
        return {"train_seconds": round(loop_wall, 3), "train_cpu_seconds": round(loop_cpu, 3),
                "eval_seconds": round(self.wall.get("eval", 0.0), 3),
                "eval_cpu_seconds": round(self.cpu.get("eval", 0.0), 3)}


def _loss_uses_num_items_in_batch(model: torch.nn.Module) -> bool:
    """Whether transformers' loss for this model honours ``num_items_in_batch`` (causal / seq2seq LMs)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
