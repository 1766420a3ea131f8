"""Flag values checked before any data or model weights are read.

Sizes (batch sizes, sample counts, steps) must be in range, and ``--max-length`` must fit the model's position
table, read from its ``config.json`` (or a GGUF file's header) — cheap, where a crash in the middle of training
was not. Each failure is one ``error:`` line naming the flag and the valid range.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

# Encoders whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens).
_POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                            "ibert", "mpnet", "roberta-prelayernorm", "bart", "mbart"}
_POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_integers(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Every ``dest`` of ``minimums`` that is set (not None) is an integer >= its minimum."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SystemExit(f"error: {_flag(dest)} {value!r}: must be an integer >= {minimum}")


def check_floats(args: argparse.Namespace, ranges: dict[str, tuple[float, float, bool]]) -> None:
    """Every set ``dest`` is a finite number in ``[low, high]`` (``(low, high]`` when the flag says exclusive)."""
    for dest, (low, high, low_exclusive) in ranges.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > low if low_exclusive else value >= low) and value <= high
        if not ok:
            if math.isfinite(high):
                interval = f"in {'(' if low_exclusive else '['}{low:g}, {high:g}]"
            else:
                interval = f"{'>' if low_exclusive else '>='} {low:g}"
            raise SystemExit(f"error: {_flag(dest)} {value!r}: must be a finite number {interval}")


TRAINING_INTEGERS = {"batch_size": 1, "eval_batch_size": 1, "grad_accum": 1, "max_length": 1, "eval_every": 1,
                     "logging_steps": 1, "max_steps": -1, "warmup_steps": 0,
                     # adapter flags that a zero would silently turn into the method's default
                     "num_virtual_tokens": 1, "encoder_hidden_size": 1}
TRAINING_FLOATS = {"lr": (0.0, math.inf, False), "epochs": (0.0, math.inf, False), "warmup_ratio": (0.0, 1.0, False),
                   "weight_decay": (0.0, math.inf, False), "label_smoothing": (0.0, 1.0, False),
                   "max_grad_norm": (0.0, math.inf, False)}


def check_training_flags(args: argparse.Namespace, integers: dict[str, int] | None = None,
                         floats: dict[str, tuple[float, float, bool]] | None = None) -> None:
    """The shared training flags plus a recipe's own (``integers``: minimum per flag; ``floats``: ranges)."""
    check_integers(args, {**TRAINING_INTEGERS, **(integers or {})})
    check_floats(args, {**TRAINING_FLOATS, **(floats or {})})


def model_positions(model: str, gguf_file: str | None = None) -> tuple[int | None, str, bool]:
    """``(tokens, where, hard)``: how many positions the model has (None when its config cannot be read without
    loading weights or reaching the network), where that number comes from, and whether going beyond it crashes
    (a learned position table) rather than leaving the trained context (rotary positions)."""
    from structlora.tasks.nlg.modeling import resolve_model

    try:
        source, gguf = resolve_model(model, gguf_file)
    except SystemExit:
        return None, "", False  # a missing packaged model: the model loader reports it
    if gguf:
        return _gguf_positions(Path(source) / gguf)
    try:
        from transformers import AutoConfig

        local = Path(source).is_dir()
        config = AutoConfig.from_pretrained(source, local_files_only=not local) if not local \
            else AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None, "", False  # not cached: the model loader fetches it (or reports why not)
    field = next((name for name in _POSITION_FIELDS if isinstance(getattr(config, name, None), int)), None)
    if field is None:
        return None, "", False
    positions = getattr(config, field)
    model_type = getattr(config, "model_type", "")
    if model_type in _POSITIONS_AFTER_PADDING and isinstance(getattr(config, "pad_token_id", None), int):
        positions -= config.pad_token_id + 1
    rotary = any(getattr(config, name, None) is not None for name in ("rope_theta", "rope_scaling", "rotary_dim",
                                                                        "rotary_pct", "rope_parameters"))
    relative = getattr(config, "position_biased_input", True) is False  # DeBERTa-v2/v3: relative positions only
    if relative:
        return None, "", False
    return positions, f"{field} of {model_type or model}'s config.json", not rotary


def _gguf_positions(path: Path) -> tuple[int | None, str, bool]:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        field = reader.fields[f"{arch}.context_length"]
        return int(field.parts[field.data[0]][0]), f"{arch}.context_length of {path.name}", False
    except Exception:  # noqa: BLE001 - no gguf package, another layout: leave it to the loader
        return None, "", False


def check_max_length(max_length: int, model: str, gguf_file: str | None = None, flag: str = "--max-length",
                     extra: Sequence[tuple[str, int]] = ()) -> None:
    """``max_length`` (plus ``extra`` tokens, e.g. ``("--max-new-tokens", 64)``) fits the model's positions:
    an error for a learned position table, a warning for rotary positions (it runs, beyond the trained context)."""
    positions, where, hard = model_positions(model, gguf_file)
    if positions is None:
        return
    total = max_length + sum(tokens for _, tokens in extra)
    if total <= positions:
        return
    what = f"{flag} {max_length}" + "".join(f" + {name} {tokens}" for name, tokens in extra)
    if hard:
        room = positions - sum(tokens for _, tokens in extra)
        raise SystemExit(f"error: {what} is more than the {positions} positions of --model {model} ({where}): "
                         f"use {flag} 1..{room}")
    print(f"warning: {what} is beyond the {positions} positions --model {model} was trained with ({where}); "
          f"it runs (rotary positions), but quality beyond them is untested", file=sys.stderr)


def check_before_work(args: Any, integers: dict[str, int] | None = None,
                      floats: dict[str, tuple[float, float, bool]] | None = None) -> None:
    """A training recipe's checks, in order: flag ranges, adapter flags the method reads, ``--max-length`` against
    the model, the output folder."""
    from . import checkpoints, methods
    from .hub import check_model_available

    check_training_flags(args, integers, floats)
    methods.check_method_flags(args)
    check_model_available(args.model)  # before anything could wait for an unreachable Hub
    check_max_length(args.max_length, args.model, getattr(args, "gguf_file", None))
    checkpoints.check_output_dir(args, remove=False)
