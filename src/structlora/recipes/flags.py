"""The training flags every recipe shares, and the parser that reads them with a ``--config`` file.

A recipe's parser is ``RecipeParser``, jsonargparse's typed parser: ``--config FILE`` (``ActionConfigFile``) reads a
YAML/JSON file whose keys set any flag, each value checked by the flag's type and choices; flags given on the
command line win over the file wherever they stand. Boolean flags are ``--x/--no-x`` (``BOOLEAN``), so that a
recipe's ``x: true`` can be switched off. ``explicit_flags(args)`` tells which flags the command line gave.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Sequence

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentError, ArgumentParser

from ..tasks.data_errors import add_skip_bad_rows_argument


LR_SCHEDULERS: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)


class _YesNo(ActionYesNo):
    """jsonargparse's ``--x/--no-x`` whose bad value (``x: maybe`` in a file) names its flag, shown as argparse's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args:  # add_argument builds the flag's action from this one
            return _YesNo(_yes_prefix=self._yes_prefix, _no_prefix=self._no_prefix, **kwargs)
        return super().__call__(*args, **kwargs)

    def format_usage(self) -> str:  # the usage shows both, as argparse's BooleanOptionalAction does
        return " | ".join(self.option_strings)

    def _check_type(self, value: Any) -> bool:
        try:
            return super()._check_type(value)
        except TypeError as error:
            raise TypeError(f'Parser key "{self.dest}": {error}') from None


# Every boolean flag: `--x` sets it, `--no-x` unsets it (a recipe file's `x: true` too).
BOOLEAN = _YesNo(no_prefix="no-")
# Where RecipeParser records the flags the command line gave (read them with explicit_flags).
_EXPLICIT_ATTR = "_explicit_flags"
_REGEX_CHARS = set("*()[]|^$\\+?")


def comma_list(value: str | Sequence[str]) -> list[str] | str:
    """``"query,value"`` (or a YAML list) -> ``["query", "value"]``; a single regular expression (PEFT semantics:
    matched against the whole module name) is kept as a string, e.g. ``".*\\.output\\.dense"``."""
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    value = str(value).strip()
    if "," not in value and _REGEX_CHARS & set(value):
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


def number(value: str | float) -> float:
    """A float flag's type. jsonargparse's own ``float`` refuses nan and inf with "Expected a float"; this lets them
    through to the flag's range check (`limits`), whose message says what the flag accepts."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadValue(f"expected a number, got {value!r}") from None


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A flag type's refusal: argparse prints its message, jsonargparse names the key (a config file's too)."""


def explicit_flags(args: argparse.Namespace) -> frozenset[str]:
    """The flags (dests) given on the command line: not from a config file, not defaults."""
    return frozenset(getattr(args, _EXPLICIT_ATTR, ()))


class RecipeParser(ArgumentParser):
    """A training recipe's parser (jsonargparse): typed flags and ``--config`` files, where the command line wins.

    jsonargparse applies a config file where it stands among the arguments; the files are moved first, so that a
    flag before ``--config`` wins too. An error is one line: a command-line one with the usage (exit 2), a config
    file's naming the file and the key (exit 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, exit_on_error=False, print_config=None, **kwargs)

    def parse_flags(self, argv: Sequence[str]) -> argparse.Namespace:
        """The flags of ``argv`` as a plain Namespace (config files applied; ``explicit_flags`` recorded)."""
        files, rest = _config_files_first(list(argv))
        explicit = self._parsed(rest, defaults=False)  # only what the command line gave (its errors first)
        parsed = self._parsed(rest)
        for count, path in enumerate(files, 1):  # one file more each time: an error is the last file's
            parsed = self._parsed([*(f"--config={file}" for file in files[:count]), *rest], config=path)
        values = parsed.as_dict()
        values["config"] = ", ".join(files) or None
        values[_EXPLICIT_ATTR] = frozenset(explicit.as_dict())
        return argparse.Namespace(**values)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """What argparse's sub-command action calls: every argument is the recipe's (an unknown one is an error)."""
        return self.parse_flags(args or []), []

    def _parsed(self, argv: list[str], defaults: bool = True, config: str | None = None) -> Any:
        try:
            return self.parse_args(argv, defaults=defaults)
        except ArgumentError as error:  # jsonargparse's message, on one line: 'Parser key "lr": Expected a ...'
            message = re.sub(r"<class '(\w+)'>", r"\1", " ".join(str(error).split()))
            key = re.match(r'Parser key "(\w+)": ', message)
            if config is None:
                if key:
                    message = f"argument --{key.group(1).replace('_', '-')}: {message[key.end():]}"
                argparse.ArgumentParser.error(self, message)  # argparse's: the usage, one error line (exit 2)
            raise SystemExit(f"error: {config}: {self._file_problem(message, key)}") from None

    def _file_problem(self, message: str, key: re.Match[str] | None) -> str:
        unknown = re.fullmatch(r"Option '(.+)' is not accepted", message)
        if unknown:
            known = sorted(a.dest.replace("_", "-") for a in self._actions
                           if a.option_strings and a.help != argparse.SUPPRESS and a.dest not in ("help", "config"))
            return f"unknown key {unknown.group(1)}. Known: {', '.join(known)}"
        if message.startswith("Unexpected config"):
            return "must hold a mapping of flag names to values"
        if key and key.group(1) == "config":
            return message[key.end():]
        return f"key {key.group(1).replace('_', '-')}: {message[key.end():]}" if key else message


def _config_files_first(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (the ``--config`` files, the other arguments in their order)."""
    files: list[str] = []
    rest: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        file = next(arguments, None) if argument == "--config" else None
        if file is not None:
            files.append(file)
        elif argument.startswith("--config="):
            files.append(argument.split("=", 1)[1])
        else:
            rest.append(argument)
    return files, rest


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Training flags shared by every recipe (model/task flags belong to the recipe)."""
    group = parser.add_argument_group("training")
    group.add_argument("--output", default=None, metavar="DIR",
                       help="output directory: results.json, adapter/, curves.png, checkpoints/ (required, "
                            "flag or config file)")
    group.add_argument("--config", action=ActionConfigFile, metavar="FILE",
                       help="YAML/JSON recipe whose keys set any flag; flags given on the command line win "
                            "(default: none)")
    group.add_argument("--epochs", type=number, default=3.0, help="number of training epochs")
    group.add_argument("--max-steps", type=int, default=-1,
                       help="stop after this many optimizer steps (-1: run --epochs; 0: no training, evaluate the model as loaded)")
    group.add_argument("--lr", type=number, default=5e-4, help="peak learning rate")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="linear", help="learning-rate schedule")
    group.add_argument("--batch-size", type=int, default=16, help="per-device training batch size")
    group.add_argument("--eval-batch-size", type=int, default=None,
                       help="per-device evaluation batch size (default: max(--batch-size, 32))")
    group.add_argument("--grad-accum", type=int, default=1,
                       help="gradient accumulation steps (effective batch = batch size x this x processes)")
    group.add_argument("--max-length", type=int, default=128, help="maximum tokens per example")
    group.add_argument("--warmup-ratio", type=number, default=0.0, help="fraction of steps for linear warm-up")
    group.add_argument("--warmup-steps", type=int, default=0, help="warm-up steps (wins over --warmup-ratio)")
    group.add_argument("--weight-decay", type=number, default=0.0, help="AdamW weight decay")
    group.add_argument("--label-smoothing", type=number, default=0.0, help="label smoothing factor")
    group.add_argument("--max-grad-norm", type=number, default=1.0,
                       help="gradient clipping norm (0: no clipping, as the LoRA/MTLoRA GPT-2 runs)")
    group.add_argument("--adam-beta1", type=number, default=0.9, help="AdamW beta1")
    group.add_argument("--adam-beta2", type=number, default=0.999, help="AdamW beta2")
    group.add_argument("--adam-epsilon", type=number, default=1e-8, help="AdamW epsilon")
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
    precision.add_argument("--bf16", action=BOOLEAN, default=False,
                           help="bfloat16 mixed precision; only where the device has native bf16 (a warning "
                                "and float32 otherwise)")
    precision.add_argument("--fp16", action=BOOLEAN, default=False,
                           help="float16 mixed precision (GPU only; a warning and float32 on a CPU)")
    group.add_argument("--gradient-checkpointing", action=BOOLEAN, default=False,
                       help="recompute activations in the backward pass to save memory; a recipe file's value "
                            "is ignored on a CPU (where it only costs time), the flag is honoured")
    group.add_argument("--group-by-length", action=BOOLEAN, default=False,
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
    group.add_argument("--overwrite", action=BOOLEAN, default=False,
                       help="replace the run already in --output (its checkpoints and results.json are deleted)")
    group.add_argument("--skip-nonfinite-steps", action=BOOLEAN, default=False,
                       help="skip (and count, in results.json) steps whose loss or gradient is NaN/inf instead of "
                            "stopping")
    group.add_argument("--allow-resume-changes", action=BOOLEAN, default=False,
                       help="--resume with training flags (learning rate, schedule, batch, seed, data, ...) other than "
                            "the run's: the changes are recorded in results.json; the learning rate, weight decay "
                            "and Adam settings stay the checkpoint's")
    group.add_argument("--allow-incomplete-checkpoint", action=BOOLEAN, default=False,
                       help="--resume from a checkpoint that lacks its optimizer, scheduler or RNG state (fresh state "
                            "for them; the result then differs from an uninterrupted run) instead of refusing it")
    add_skip_bad_rows_argument(group, BOOLEAN)
    return parser
