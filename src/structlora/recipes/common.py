"""Shared training layer of the recipes (GLUE, NLG, LLM): flags, config files, adapters, Trainer, outputs.

Contract (signatures are stable; the NLG and LLM recipes import them):

- ``add_method_arguments(parser)``: adapter flags ``--method --structure --r --lora-alpha --lora-dropout
  --tensor-rank --bottleneck-size --adapter-placement --num-virtual-tokens --encoder-hidden-size --target-modules
  --modules-to-save --init``.
- ``add_training_arguments(parser)``: training flags ``--epochs --lr --batch-size --eval-batch-size
  --max-length --warmup-ratio --warmup-steps --weight-decay --seed --eval-every --grad-accum --bf16 --fp16
  --gradient-checkpointing --resume --init-from --config --output --max-steps --lr-scheduler
  --label-smoothing --logging-steps --overwrite --skip-nonfinite-steps --allow-incomplete-checkpoint
  --skip-bad-rows``.
- ``apply_config_file(args, parser=None)``: values of the ``--config`` YAML/JSON file become defaults;
  flags given explicitly on the command line win. ``parser`` may be omitted inside ``run(args)``:
  ``add_training_arguments`` stores the parser in ``args._parser``.
- ``check_method_flags(args)``: refuse an adapter flag that ``--method`` does not read (``METHOD_FLAG_READERS``).
- ``build_peft_config(args, task_type)``: a structlora config, or ``None`` for ``--method full``.
- ``wrap_model(model, args, task_type)``: the model with the adapter applied (every parameter trainable
  for ``full``); ``--init-from DIR`` loads a trained adapter (heads of another shape are left fresh).
- ``make_training_arguments(args, **overrides)``: ``transformers.TrainingArguments`` (``label_names``
  set, ``remove_unused_columns=False``, ``report_to="none"``, checkpoints in ``OUTPUT/checkpoints``).
- ``run_training(model, args, train_dataset, eval_dataset, data_collator, compute_metrics,
  metric_for_best_model, greater_is_better=True, trainer_cls=None, **trainer_kwargs)``
  -> ``(trainer, history, train_seconds)``. ``trainer_cls=None`` means ``structlora.AdapterTrainer`` for
  adapter methods and ``transformers.Trainer`` for ``full``. The best checkpoint is loaded at the end.
- ``write_results(output_dir, task, method, trainable_params, eval_metrics, history, train_seconds,
  extra=None)`` -> path of ``results.json``; ``plot_curves(output_dir, history, metric)`` -> path of
  ``curves.png``. Both write on the main process only.
- Helpers: ``count_trainable_parameters``, ``best_eval_metrics``, ``clean_eval_metrics``, ``save_final_model``,
  ``is_main_process``, ``default_trainer_class``; ``--init-from`` loads through ``runs.init_from_run``.

A ``history`` is a list of dicts, one per evaluation: ``{"epoch", "step", "train_loss", "eval_loss",
<metric>: value, ...}`` (metric names without the ``eval_`` prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ..data_errors import BadRows, add_skip_bad_rows_argument
from .device import has_accelerator as _has_accelerator
from .device import resolve_device_settings
from .peft_methods import ENCODER_METHODS, PROMPT_LEARNING_METHODS
from .resume import check_resume_flags, resumes_of, write_record
from .runs import HEAD_MODULE_NAMES, init_from_run

if TYPE_CHECKING:
    import torch

METHODS: tuple[str, ...] = ("lora", "mtlora", "loretta-rep", "loretta-adp", "full",
                             # the papers' baselines: dense adapters, BitFit, and PEFT's own methods
                             "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning")
PEFT_LIBRARY_METHODS: tuple[str, ...] = ("ia3", "prefix", "prompt", "ptuning")  # see peft_methods.py
ADAPTER_PLACEMENTS: tuple[str, ...] = ("houlsby", "pfeiffer")
MTLORA_STRUCTURES: tuple[str, ...] = ("shim", "icfm", "ctcm", "dtsm")
INIT_CHOICES: tuple[str, ...] = ("default", "reference", "identity")
LR_SCHEDULERS: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)
# The adapter flags and the methods that read them. Given with any other method a flag would change nothing, so
# the user would train another model than the one asked for (e.g. `--structure icfm` without `--method mtlora`
# trains LoRA): check_method_flags refuses it. --modules-to-save is not here: full fine-tuning trains those
# modules anyway. BitFit and IA3 read --target-modules only to refuse it with a message of their own.
METHOD_FLAG_READERS: dict[str, tuple[str, ...]] = {
    "structure": ("mtlora",),
    "r": ("lora", "mtlora", "loretta-rep"),
    "lora_alpha": ("lora", "mtlora", "loretta-rep"),
    "lora_dropout": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter"),
    "tensor_rank": ("loretta-rep", "loretta-adp"),
    "bottleneck_size": ("loretta-adp", "adapter"),
    "adapter_placement": ("adapter",),
    "num_virtual_tokens": PROMPT_LEARNING_METHODS,
    "encoder_hidden_size": ENCODER_METHODS,
    "target_modules": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter", "bitfit", "ia3"),
    "init": ("lora", "mtlora", "loretta-rep", "loretta-adp", "adapter"),
}
# The adapter flags' defaults other than None: the flags' own defaults, and what a Namespace built without the
# parser is compared with.
_METHOD_FLAG_DEFAULTS = {"structure": "shim", "adapter_placement": "houlsby"}
# Trainer's own bookkeeping keys, not metrics of the model.
_NON_METRIC_KEYS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step"}
# Where explicitly given flags are recorded (see _track_explicit_flags).
_EXPLICIT_ATTR = "_explicit_flags"


# --------------------------------------------------------------------------------------------- flags
_REGEX_CHARS = set("*()[]|^$\\+?")


def _comma_list(value: str) -> list[str] | str:
    """``"query,value"`` -> ``["query", "value"]``; a single regular expression (PEFT semantics: matched
    against the whole module name) is kept as a string, e.g. ``".*\\.output\\.dense"``."""
    value = value.strip()
    if "," not in value and _REGEX_CHARS & set(value):
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


def _tracking(action_cls: type[argparse.Action]) -> type[argparse.Action]:
    """An argparse action that also records that its flag was given on the command line."""

    class Tracked(action_cls):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            super().__call__(parser, namespace, values, option_string)
            explicit = set(getattr(namespace, _EXPLICIT_ATTR, set()))
            explicit.add(self.dest)
            setattr(namespace, _EXPLICIT_ATTR, explicit)

    Tracked.__name__ = f"Tracked{action_cls.__name__}"
    return Tracked


def _track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make every flag added from now on record itself when given, so config files never override it."""
    if getattr(parser, "_structlora_tracking", False):
        return
    for name in (None, "store", "store_const", "store_true", "store_false", "append", "extend", "count"):
        parser.register("action", name, _tracking(parser._registry_get("action", name, None)))
    # Every boolean flag is `--x/--no-x` (action="boolean"), so a recipe's `x: true` can be switched off.
    parser.register("action", "boolean", _tracking(argparse.BooleanOptionalAction))
    parser._structlora_tracking = True  # type: ignore[attr-defined]
    parser.set_defaults(_parser=parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adapter flags. Unset hyper-parameters (None) fall back to the structlora config defaults."""
    _track_explicit_flags(parser)
    group = parser.add_argument_group("adapter")
    group.add_argument("--method", choices=METHODS, default="lora",
                       help="lora, mtlora, loretta-rep, loretta-adp, full fine-tuning, or a baseline: adapter "
                            "(dense bottleneck), bitfit, ia3, prefix, prompt, ptuning (the last four need peft) "
                            "(default: lora)")
    group.add_argument("--structure", choices=MTLORA_STRUCTURES, default=_METHOD_FLAG_DEFAULTS["structure"],
                       help="MTLoRA's T: shim T=C, icfm T=C·Cᵀ, ctcm T=C·D, dtsm T=C+D (only with --method mtlora)")
    group.add_argument("--r", type=int, default=None, help="LoRA rank (default: the method's config, 8)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="scaling numerator alpha, update scaled by alpha/r (default: the method's config)")
    group.add_argument("--lora-dropout", type=float, default=None,
                       help="dropout on the adapter input, adapter dropout for loretta-adp (default: the "
                            "method's config)")
    group.add_argument("--tensor-rank", type=int, default=None,
                       help="tensor-train rank of LoRETTA's cores (default: the method's config, 5)")
    group.add_argument("--bottleneck-size", type=int, default=None,
                       help="bottleneck width of LoRETTA_adp adapters (default: the method's config, 64)")
    group.add_argument("--adapter-placement", choices=ADAPTER_PLACEMENTS,
                       default=_METHOD_FLAG_DEFAULTS["adapter_placement"],
                       help="dense adapters (--method adapter): houlsby = after attention and FFN, "
                            "pfeiffer = after FFN")
    group.add_argument("--num-virtual-tokens", type=int, default=None,
                       help="virtual tokens of --method prefix/prompt/ptuning (default 20)")
    group.add_argument("--encoder-hidden-size", type=int, default=None,
                       help="width of the MLP that produces the virtual tokens: P-tuning's encoder (default 128), "
                            "or prefix tuning's reparametrisation (Li & Liang's mid_dim; default: none, the prefix "
                            "is trained directly)")
    group.add_argument("--target-modules", type=_comma_list, default=None,
                       help="comma-separated module names to adapt, or one regular expression (default: the "
                            "architecture's, e.g. query,value for BERT/RoBERTa, q_proj,v_proj for Llama)")
    group.add_argument("--modules-to-save", type=_comma_list, default=None,
                       help="extra modules trained in full and saved with the adapter, e.g. pooler "
                            "(default: the task head only)")
    group.add_argument("--init", choices=INIT_CHOICES, default=None,
                       help="adapter initialisation: default leaves the outputs unchanged at the start; "
                            "reference is the authors' start; identity (MTLoRA) starts with T=I "
                            "(default: the method's config)")
    return parser


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Training flags shared by every recipe (model/task flags belong to the recipe)."""
    _track_explicit_flags(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--output", default=None, metavar="DIR",
                       help="output directory: results.json, adapter/, curves.png, checkpoints/ (required, "
                            "flag or config file)")
    group.add_argument("--config", default=None, metavar="FILE",
                       help="YAML/JSON recipe whose keys set any flag; flags given on the command line win "
                            "(default: none)")
    group.add_argument("--epochs", type=float, default=3.0, help="number of training epochs")
    group.add_argument("--max-steps", type=int, default=-1,
                       help="stop after this many optimizer steps (-1: run --epochs; 0: no training, evaluate the model as loaded)")
    group.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear", help="learning-rate schedule")
    group.add_argument("--batch-size", type=int, default=16, help="per-device training batch size")
    group.add_argument("--eval-batch-size", type=int, default=None,
                       help="per-device evaluation batch size (default: max(--batch-size, 32))")
    group.add_argument("--grad-accum", type=int, default=1,
                       help="gradient accumulation steps (effective batch = batch size x this x processes)")
    group.add_argument("--max-length", type=int, default=128, help="maximum tokens per example")
    group.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps for linear warm-up")
    group.add_argument("--warmup-steps", type=int, default=0, help="warm-up steps (wins over --warmup-ratio)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing factor")
    group.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="gradient clipping norm (0: no clipping, as the LoRA/MTLoRA GPT-2 runs)")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    group.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--checkpoint", choices=("best", "final"), default="best",
                       help="which weights the run keeps: the best evaluated checkpoint, or the final one "
                            "(the MTLoRA GPT-2 runs decode their last checkpoint)")
    group.add_argument("--seed", type=int, default=42, help="random seed (model init, data order, dropout)")
    group.add_argument("--eval-every", type=int, default=None, metavar="N",
                       help="evaluate and checkpoint every N steps (default: every epoch)")
    group.add_argument("--logging-steps", type=int, default=None, metavar="N",
                       help="log the training loss every N steps (default: --eval-every, else at least once "
                            "an epoch, at most every 50 steps)")
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="boolean", default=False,
                           help="bfloat16 mixed precision; only where the device has native bf16 (a warning "
                                "and float32 otherwise)")
    precision.add_argument("--fp16", action="boolean", default=False,
                           help="float16 mixed precision (GPU only; a warning and float32 on a CPU)")
    group.add_argument("--gradient-checkpointing", action="boolean", default=False,
                       help="recompute activations in the backward pass to save memory; a recipe file's value "
                            "is ignored on a CPU (where it only costs time), the flag is honoured")
    group.add_argument("--group-by-length", action="boolean", default=False,
                       help="batch training examples of similar length together (less padding, faster)")
    group.add_argument("--report-to", default="none", metavar="TOOL",
                       help="where Trainer logs: none, tensorboard, wandb, mlflow, all, ... (comma-separated)")
    group.add_argument("--resume", nargs="?", const="latest", default=None,
                       metavar="CHECKPOINT",
                       help="resume from CHECKPOINT, or (flag alone) from the latest one in OUTPUT/checkpoints "
                            "(default: start afresh)")
    group.add_argument("--init-from", default=None, metavar="DIR",
                       help="start from a trained adapter folder, e.g. an MNLI adapter for RTE (default: a "
                            "fresh adapter)")
    group.add_argument("--overwrite", action="boolean", default=False,
                       help="replace the run already in --output (its checkpoints and results.json are deleted)")
    group.add_argument("--skip-nonfinite-steps", action="boolean", default=False,
                       help="skip (and count, in results.json) steps whose loss or gradient is NaN/inf instead of "
                            "stopping")
    group.add_argument("--allow-resume-changes", action="boolean", default=False,
                       help="--resume with training flags (learning rate, schedule, batch, seed, data, ...) other than "
                            "the run's: the changes are recorded in results.json; the learning rate, weight decay "
                            "and Adam settings stay the checkpoint's")
    group.add_argument("--allow-incomplete-checkpoint", action="boolean", default=False,
                       help="--resume from a checkpoint that lacks its optimizer, scheduler or RNG state (fresh state "
                            "for them; the result then differs from an uninterrupted run) instead of refusing it")
    add_skip_bad_rows_argument(group)
    return parser


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fill ``args`` from ``args.config`` (YAML or JSON mapping): the file's values replace defaults,
    never flags given on the command line. Keys may use dashes or underscores. Returns ``args``."""
    parser = parser or getattr(args, "_parser", None)
    path = getattr(args, "config", None)
    if not path:
        return args
    if parser is None:
        raise ValueError("apply_config_file needs the parser (pass it, or use add_training_arguments)")
    values = _read_mapping(Path(path))
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    explicit = getattr(args, _EXPLICIT_ATTR, set())
    unknown = []
    for raw_key, value in values.items():
        dest = str(raw_key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            unknown.append(str(raw_key))
            continue
        if dest in explicit:
            continue
        if dest not in explicit and _is_untracked(action) and getattr(args, dest) != action.default:
            continue  # an untracked flag that differs from its default was given explicitly
        setattr(args, dest, _coerce(action, value, path))
    if unknown:
        known = sorted(d.replace("_", "-") for d in actions if not d.startswith("_") and d != "config")
        raise SystemExit(f"error: {path}: unknown key(s) {', '.join(sorted(unknown))}. Known: {', '.join(known)}")
    return args


def _is_untracked(action: argparse.Action) -> bool:
    return not type(action).__name__.startswith("Tracked")


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml  # YAML is a superset of JSON, so this also reads .json files under other names

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of flag names to values")
    return data


def _coerce(action: argparse.Action, value: Any, source: str) -> Any:
    """Give a config value the type its flag would have produced."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if value is None:
        return None
    if action.type is _comma_list:
        return [str(item) for item in value] if isinstance(value, (list, tuple)) else _comma_list(str(value))
    if action.type is not None and not isinstance(value, (list, dict)):
        try:
            value = action.type(value)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"error: {source}: bad value {value!r} for {action.dest}: {err}") from err
    if action.choices is not None and value not in action.choices:
        raise SystemExit(f"error: {source}: {action.dest}={value!r} is not one of {list(action.choices)}")
    return value


# ------------------------------------------------------------------------------------------ adapters
def _method_flags_set(args: argparse.Namespace) -> dict[str, str]:
    """The adapter flags of METHOD_FLAG_READERS that ``args`` sets -> the config file that set it ("" when given on
    the command line, or set in a caller's Namespace): given explicitly, or holding another value than the flag's
    default."""
    explicit = getattr(args, _EXPLICIT_ATTR, set())
    parser = getattr(args, "_parser", None)
    given: dict[str, str] = {}
    for dest in METHOD_FLAG_READERS:
        if not hasattr(args, dest):
            continue
        default = parser.get_default(dest) if parser is not None else _METHOD_FLAG_DEFAULTS.get(dest)
        if dest in explicit:
            given[dest] = ""
        elif getattr(args, dest) != default:
            given[dest] = str(getattr(args, "config", None) or "")
    return given


def check_method_flags(args: argparse.Namespace) -> None:
    """Refuse an adapter flag that ``args.method`` does not read (it would be ignored without a word), with one
    ``error:`` line naming the flag, the methods that read it and where it was set. One exception: a config file's
    flag when ``--method`` on the command line replaces the file's method (``--config mtlora_cola.yaml --method
    adapter`` keeps the recipe's budget); it is ignored with a warning, since the file cannot be unset flag by
    flag from the command line."""
    method = getattr(args, "method", None)
    explicit = getattr(args, _EXPLICIT_ATTR, set())
    warned = getattr(args, "_method_flags_warned", set())
    for dest, config in _method_flags_set(args).items():
        readers = METHOD_FLAG_READERS[dest]
        if method in readers:
            continue
        flag = "--" + dest.replace("_", "-")
        if config and "method" in explicit:
            if dest not in warned:
                print(f"warning: {flag} (set by {config}) is not read by --method {method} (given on the command "
                      f"line): it is ignored", file=sys.stderr)
                warned.add(dest)
            continue
        source = f" (set by {config})" if config else ""
        raise SystemExit(f"error: {flag}{source} is read only by --method {', '.join(readers)}; --method {method} "
                         f"would ignore it, training another model than the one asked for (leave {flag} unset, or "
                         f"choose one of those methods)")
    args._method_flags_warned = warned  # build_peft_config checks again: warn once
    if method == "lora" and getattr(args, "init", None) == "identity":
        raise SystemExit("error: --init identity starts MTLoRA's T at I; --method lora has one start, A "
                         "Kaiming-uniform and B zero (--init default or reference; or --method mtlora)")


def build_peft_config(args: argparse.Namespace, task_type: str) -> Any | None:
    """The structlora config for ``args.method`` (None for full fine-tuning). Only hyper-parameters the
    user set are passed, so each config keeps its own defaults (e.g. LoRETTA_rep's alpha of 16)."""
    method = args.method
    check_method_flags(args)
    if method == "full":
        return None
    if method in PEFT_LIBRARY_METHODS:
        from . import peft_methods

        return peft_methods.build_config(args, task_type)
    import structlora

    def given(**kwargs: Any) -> dict[str, Any]:
        return {key: value for key, value in kwargs.items() if value is not None}

    common = given(target_modules=getattr(args, "target_modules", None), task_type=task_type,
                   modules_to_save=getattr(args, "modules_to_save", None))
    init = getattr(args, "init", None)
    if method == "lora":
        return structlora.LoraConfig(**common, **given(r=args.r, lora_alpha=args.lora_alpha,
                                                       lora_dropout=args.lora_dropout))
    if method == "mtlora":
        if init == "default":
            init = None  # MTLoRA names its default "reference"
        return structlora.MTLoraConfig(**common, structure=args.structure,
                                       **given(r=args.r, lora_alpha=args.lora_alpha,
                                               lora_dropout=args.lora_dropout, init=init))
    if method == "loretta-rep":
        return structlora.LorettaRepConfig(**common, **given(r=args.r, lora_alpha=args.lora_alpha,
                                                             lora_dropout=args.lora_dropout,
                                                             tensor_rank=args.tensor_rank, init=init))
    if method == "loretta-adp":
        return structlora.LorettaAdpConfig(**common, **given(bottleneck_size=args.bottleneck_size,
                                                             adapter_dropout=args.lora_dropout,
                                                             tensor_rank=args.tensor_rank, init=init))
    if method == "adapter":
        return structlora.DenseAdapterConfig(**common, placement=getattr(args, "adapter_placement", "houlsby"),
                                             **given(bottleneck_size=args.bottleneck_size,
                                                     adapter_dropout=args.lora_dropout, init=init))
    if method == "bitfit":
        return structlora.BitFitConfig(**common)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def method_label(args: argparse.Namespace) -> str:
    """The method name results.json records: ``mtlora-<structure>`` and ``adapter-<placement>`` name the variant,
    so that a sweep's table keeps MTLoRA's structures and the adapter placements in rows of their own."""
    if args.method == "mtlora":
        return f"mtlora-{args.structure}"
    if args.method == "adapter":
        return f"adapter-{args.adapter_placement}"
    return args.method


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, task_type: str) -> torch.nn.Module:
    """Apply the adapter chosen by ``args.method`` (or unfreeze everything for ``full``) and load
    ``args.init_from`` if given."""
    if args.method in PEFT_LIBRARY_METHODS:
        from . import peft_methods

        check_method_flags(args)
        return peft_methods.wrap(model, args, task_type)
    config = build_peft_config(args, task_type)
    init_from = getattr(args, "init_from", None)
    if config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if init_from:
            init_from_run(model, init_from)
        return model
    import structlora

    peft_model = structlora.get_peft_model(model, config)
    if init_from:
        init_from_run(peft_model, init_from)
    return peft_model


def count_trainable_parameters(model: torch.nn.Module, exclude: Sequence[str] = ()) -> int:
    """Trainable parameters; those inside a module named in ``exclude`` (e.g. the classification head,
    ``HEAD_MODULE_NAMES``) are left out, so adapters can be compared without the task head."""
    def excluded(name: str) -> bool:
        parts = name.split(".")
        return any(part in exclude for part in parts)

    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not excluded(name))


# ------------------------------------------------------------------------------------------- trainer
def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.output, "checkpoints")


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


def default_trainer_class(method: str) -> type:
    if method == "full" or method in PEFT_LIBRARY_METHODS:  # transformers' Trainer saves PEFT models itself
        from structlora.trainer import GuardedTrainer

        return GuardedTrainer
    from structlora import AdapterTrainer

    return AdapterTrainer


def _resume_checkpoint(args: argparse.Namespace) -> str | bool | None:
    resume = getattr(args, "resume", None)
    if not resume:
        return None
    if resume in ("latest", "auto", True):
        folder = checkpoint_dir(args)
        checkpoints = _checkpoints_newest_first(folder)
        if not checkpoints:
            raise SystemExit(f"error: --resume: no checkpoint-* folder in {folder}")
        for checkpoint in checkpoints:
            missing = _missing_state(checkpoint, args.method)
            if not missing or _tolerated_missing(missing, args):
                _warn_incomplete(checkpoint, missing)
                return checkpoint
            print(f"--resume: {checkpoint} is incomplete (lacks {', '.join(missing)}; interrupted while saving?): "
                  f"trying the one before", file=sys.stderr)
        raise SystemExit(f"error: --resume: no complete checkpoint in {folder}")
    if not os.path.isdir(resume):
        raise SystemExit(f"error: --resume: {resume} is not a checkpoint folder")
    missing = _missing_state(resume, args.method)
    if missing and not _tolerated_missing(missing, args):
        raise SystemExit(f"error: --resume: {resume} lacks {', '.join(missing)}; resuming it would not continue the "
                         f"same run (--allow-incomplete-checkpoint resumes anyway, with fresh state for what is "
                         f"missing)")
    _warn_incomplete(resume, missing)
    return resume


def _warn_incomplete(checkpoint: str, missing: list[str]) -> None:
    if missing:
        print(f"warning: --allow-incomplete-checkpoint: resuming {checkpoint} without {', '.join(missing)} (fresh "
              f"state for them: the result differs from an uninterrupted run)", file=sys.stderr)


def _checkpoints_newest_first(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(folder)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(folder, name))]
    return [os.path.join(folder, name) for _, name in sorted(steps, reverse=True)]


def _missing_state(checkpoint: str, method: str) -> list[str]:
    from structlora.trainer import missing_checkpoint_state

    # --method full (and PEFT's methods) checkpoint transformers' own weight files: only the state files are checked.
    return missing_checkpoint_state(checkpoint, weights=() if method == "full" else ("adapter_model.safetensors",
                                                                                      "adapter_config.json"))


def _tolerated_missing(missing: list[str], args: argparse.Namespace) -> bool:
    """--allow-incomplete-checkpoint resumes without optimizer/scheduler/RNG state, never without the weights."""
    return bool(getattr(args, "allow_incomplete_checkpoint", False)) and not any(
        name.startswith("adapter_") for name in missing)


def _run_status(output: str) -> str | None:
    """The status of the run in `output`: None (no results.json), else results.json's status ("completed" for
    results written before runs recorded one)."""
    path = os.path.join(output, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return str(json.load(handle).get("status", "completed"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def check_output_dir(args: argparse.Namespace, remove: bool = True) -> None:
    """Never train over a finished run or another run's checkpoints without an explicit flag. The recipes call it
    twice: before loading anything with ``remove=False`` (refusals only), and when training starts, where
    ``--overwrite`` then deletes the old run (so a failure in between leaves it in place)."""
    output = args.output
    status = _run_status(output)
    has_checkpoints = bool(_checkpoints_newest_first(checkpoint_dir(args)))
    if getattr(args, "overwrite", False):
        if remove and is_main_process():
            shutil.rmtree(checkpoint_dir(args), ignore_errors=True)
            if status is not None:
                os.remove(os.path.join(output, "results.json"))
        elif not remove and is_main_process():
            write_record(output, flags_of(args))
        return
    if getattr(args, "resume", None):
        if status == "completed" and _schedule_done(args):
            print(f"{output} holds a finished run (results.json) whose last checkpoint already reached the "
                  f"requested schedule: nothing to resume, nothing was done. Pass --overwrite to train it again, or "
                  f"a longer --max-steps/--epochs to continue it", file=sys.stderr)
            raise SystemExit(0)
        if not remove:  # before anything is loaded, with the flags as given (the record was written likewise)
            check_resume_flags(args, flags_of(args), finished=status == "completed", write=is_main_process())
        return
    if status is not None:
        raise SystemExit(f"error: --output {output} holds a {status} run (results.json); pass --overwrite to replace "
                         f"it, --resume to continue it, or choose another --output")
    if has_checkpoints:
        raise SystemExit(f"error: --output {output} holds checkpoints of an unfinished run; pass --resume to continue "
                         f"it, --overwrite to start over, or choose another --output")
    if not remove and is_main_process():
        write_record(output, flags_of(args))


def _schedule_done(args: argparse.Namespace) -> bool:
    """Whether the newest checkpoint already completed the schedule these flags ask for."""
    checkpoints = _checkpoints_newest_first(checkpoint_dir(args))
    if not checkpoints:
        return True  # a finished run without checkpoints: nothing to resume from either
    try:
        with open(os.path.join(checkpoints[0], "trainer_state.json")) as handle:
            state = json.load(handle)
        step, planned = int(state["global_step"]), int(state["max_steps"])
        epochs = float(state.get("num_train_epochs") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False  # let --resume pick a complete checkpoint and report
    if args.max_steps is not None and args.max_steps > 0:
        return step >= args.max_steps
    return step >= planned and epochs >= float(args.epochs)


def _write_status(output: str, status: str, error: str) -> None:
    if is_main_process():
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "results.json"), "w") as handle:
            json.dump({"status": status, "error": error}, handle, indent=2)
            handle.write("\n")


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
    trainer_cls = trainer_cls or default_trainer_class(args.method)
    from structlora.trainer import NonFiniteGuard

    if issubclass(trainer_cls, NonFiniteGuard):
        trainer_kwargs.setdefault("skip_nonfinite_steps", bool(getattr(args, "skip_nonfinite_steps", False)))
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        **trainer_kwargs,
    )
    from structlora.trainer import AdapterCheckpoints

    if isinstance(trainer, AdapterCheckpoints):
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
            trainer.train(resume_from_checkpoint=_resume_checkpoint(args))
    except NonFiniteTrainingError as error:
        _write_status(args.output, "diverged", str(error))
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


def robustness_record(trainer: Any, bad_rows: BadRows | None) -> dict[str, Any]:
    """What results.json records of the run's skips: non-finite steps (``--skip-nonfinite-steps``) and bad data
    rows (``--skip-bad-rows``), printed too."""
    if bad_rows is not None:
        bad_rows.print_summary()
    return {"skipped_nonfinite_steps": int(getattr(trainer, "skipped_nonfinite_steps", 0) or 0),
            **(bad_rows.summary() if bad_rows is not None else {})}


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


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved flags of a run (JSON values only), saved in results.json so that `structlora eval`
    can rebuild its data and model settings."""
    flags: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("_"):
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        flags[key] = value
    return flags


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


def history_from_log(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per evaluation, with the mean training loss logged since the previous one."""
    history: list[dict[str, Any]] = []
    pending_losses: list[float] = []
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry and not any(k.startswith("eval_") for k in entry):
            pending_losses.append(float(entry["loss"]))
            continue
        if not any(k.startswith("eval_") for k in entry):
            continue  # the final train summary (train_runtime, ...)
        step = int(entry.get("step", 0))
        record = by_step.get(step)
        if record is None:  # several eval sets at one step produce several entries: merge them
            record = {"epoch": round(float(entry.get("epoch", 0.0)), 4), "step": step,
                      "train_loss": (sum(pending_losses) / len(pending_losses)) if pending_losses else None}
            pending_losses = []
            by_step[step] = record
            history.append(record)
        record.update(clean_eval_metrics(entry, keep_loss=True))
    return history


def best_eval_metrics(trainer: Any, history: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Metrics of the evaluation that chose the best checkpoint (the one loaded at the end), read from
    ``history`` so the best model need not be evaluated again; None if it cannot be told."""
    state = trainer.state
    step = getattr(state, "best_global_step", None)
    if not step and state.best_model_checkpoint:
        step = int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[-1])
    record = next((r for r in history if r.get("step") == step), None)
    if record is None:
        return None
    return {k: float(v) for k, v in record.items()
            if k not in ("epoch", "step", "train_loss") and not k.endswith("loss") and v is not None}


def clean_eval_metrics(metrics: Mapping[str, Any], keep_loss: bool = False) -> dict[str, float]:
    """``{"eval_accuracy": .9, "eval_runtime": 3}`` -> ``{"accuracy": .9}`` (``eval_loss`` kept as
    ``eval_loss`` when ``keep_loss``; per-set losses ``eval_matched_loss`` likewise)."""
    cleaned: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("eval_") or not isinstance(value, (int, float)):
            continue
        name = key[len("eval_"):]
        if name in _NON_METRIC_KEYS or name.endswith(tuple("_" + k for k in _NON_METRIC_KEYS)):
            continue
        if name == "loss" or name.endswith("_loss"):
            if keep_loss:
                cleaned[key] = float(value)
            continue
        cleaned[name] = float(value)
    return cleaned


def save_final_model(trainer: Any, output_dir: str, subdir: str = "adapter") -> str:
    """Save the (best, already reloaded) adapter + head — or the whole model for ``full`` — to
    ``output_dir/subdir``. Trainer.save_model writes on the main process only."""
    path = os.path.join(output_dir, subdir)
    trainer.save_model(path)
    if trainer.is_world_process_zero():
        # Trainer pickles its arguments next to the weights; keep the output folder pickle-free (JSON).
        pickled = os.path.join(path, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(path, "training_args.json"), "w") as handle:
            handle.write(trainer.args.to_json_string())
    return path


# ------------------------------------------------------------------------------------------- outputs
def write_results(
    output_dir: str,
    task: str,
    method: str,
    trainable_params: int,
    eval_metrics: Mapping[str, float],
    history: Sequence[Mapping[str, Any]],
    train_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write ``output_dir/results.json`` (main process only) and return its path."""
    path = os.path.join(output_dir, "results.json")
    if not is_main_process():
        return path
    payload: dict[str, Any] = {
        "status": "completed",
        "task": task,
        "method": method,
        "trainable_params": int(trainable_params),
        "eval": {k: _json_number(v) for k, v in eval_metrics.items()},
        "history": [{k: _json_number(v) for k, v in record.items()} for record in history],
        "train_seconds": round(float(train_seconds), 3),
    }
    if extra:
        payload.update(extra)
    resumes = resumes_of(output_dir)
    if resumes:
        payload["resumes"] = resumes
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return path


def _json_number(value: Any) -> Any:
    # NaN (e.g. Matthews correlation of a constant prediction is 0, but Pearson can be NaN) is not JSON.
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def plot_curves(output_dir: str, history: Sequence[Mapping[str, Any]], metric: str) -> str:
    """``output_dir/curves.png``: training/eval loss against epochs and, when ``metric`` is not the loss
    itself, the eval ``metric`` in a second panel."""
    path = os.path.join(output_dir, "curves.png")
    if not is_main_process():
        return path
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers / CI
    import matplotlib.pyplot as plt

    metric_is_loss = metric in ("loss", "eval_loss")
    epochs = [record.get("epoch", i + 1) for i, record in enumerate(history)]
    figure, axes = plt.subplots(1, 1 if metric_is_loss else 2, figsize=(5 if metric_is_loss else 10, 4),
                                squeeze=False)
    loss_axis = axes[0][0]
    for key, label in (("train_loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if r.get(key) is not None]
        if points:
            loss_axis.plot(*zip(*points, strict=True), marker="o", label=label)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.set_title("training and evaluation loss")
    if not metric_is_loss:
        metric_axis = axes[0][1]
        points = [(e, r[metric]) for e, r in zip(epochs, history, strict=True) if r.get(metric) is not None]
        if points:
            metric_axis.plot(*zip(*points, strict=True), marker="o", color="tab:green")
        metric_axis.set_xlabel("epoch")
        metric_axis.set_ylabel(metric)
        metric_axis.set_title(f"evaluation {metric}")
    figure.tight_layout()
    os.makedirs(output_dir, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
