"""The training flags every recipe shares, and the ``--config`` file that sets any flag (explicit flags win).

``add_training_arguments(parser)`` adds ``--epochs --lr --batch-size ... --resume --init-from --config --output`` and
makes every flag added to ``parser`` from then on record itself when given (``args._explicit_flags``), so that
``apply_config_file(args)`` fills only what the command line left at its default. Boolean flags are ``--x/--no-x``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..tasks.data_errors import add_skip_bad_rows_argument


LR_SCHEDULERS: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)


# Where explicitly given flags are recorded (see track_explicit_flags).
EXPLICIT_ATTR = "_explicit_flags"


_REGEX_CHARS = set("*()[]|^$\\+?")


def comma_list(value: str) -> list[str] | str:
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
            explicit = set(getattr(namespace, EXPLICIT_ATTR, set()))
            explicit.add(self.dest)
            setattr(namespace, EXPLICIT_ATTR, explicit)

    Tracked.__name__ = f"Tracked{action_cls.__name__}"
    return Tracked


def track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make every flag added from now on record itself when given, so config files never override it."""
    if getattr(parser, "_structlora_tracking", False):
        return
    for name in (None, "store", "store_const", "store_true", "store_false", "append", "extend", "count"):
        parser.register("action", name, _tracking(parser._registry_get("action", name, None)))
    # Every boolean flag is `--x/--no-x` (action="boolean"), so a recipe's `x: true` can be switched off.
    parser.register("action", "boolean", _tracking(argparse.BooleanOptionalAction))
    parser._structlora_tracking = True  # type: ignore[attr-defined]
    parser.set_defaults(_parser=parser)


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Training flags shared by every recipe (model/task flags belong to the recipe)."""
    track_explicit_flags(parser)
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
    explicit = getattr(args, EXPLICIT_ATTR, set())
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
    if action.type is comma_list:
        return [str(item) for item in value] if isinstance(value, (list, tuple)) else comma_list(str(value))
    if action.type is not None and not isinstance(value, (list, dict)):
        try:
            value = action.type(value)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"error: {source}: bad value {value!r} for {action.dest}: {err}") from err
    if action.choices is not None and value not in action.choices:
        raise SystemExit(f"error: {source}: {action.dest}={value!r} is not one of {list(action.choices)}")
    return value
