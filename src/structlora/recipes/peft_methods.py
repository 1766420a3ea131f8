"""The baselines that PEFT itself implements — IA3, prefix tuning, prompt tuning, P-tuning — for the recipes.

structlora does not re-implement them: ``--method ia3|prefix|prompt|ptuning`` builds the PEFT config and
calls ``peft.get_peft_model``; training and saving go through transformers' Trainer, which knows PEFT
models (checkpoints and the final folder hold PEFT's ``adapter_model.safetensors``). PEFT is optional:
``pip install 'structlora[peft]'``.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

# --method name -> PEFT config class name
PEFT_METHODS: dict[str, str] = {
    "ia3": "IA3Config",
    "prefix": "PrefixTuningConfig",
    "prompt": "PromptTuningConfig",
    "ptuning": "PromptEncoderConfig",
}
DEFAULT_VIRTUAL_TOKENS = 20
DEFAULT_PTUNING_ENCODER_WIDTH = 128
# PEFT's ``peft_type`` (in the adapter_config.json it saves) -> --method name
PEFT_TYPES: dict[str, str] = {"IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
                              "P_TUNING": "ptuning"}
# Methods that feed virtual tokens (as inputs or as a key/value cache) rather than changing layers: a
# step-by-step decoder that passes its own cache would feed them again at every step.
PROMPT_LEARNING_METHODS: tuple[str, ...] = ("prefix", "prompt", "ptuning")
# Methods whose virtual tokens come out of an MLP encoder (--encoder-hidden-size): P-tuning's, and prefix tuning's
# optional reparametrisation.
ENCODER_METHODS: tuple[str, ...] = ("prefix", "ptuning")


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise SystemExit("error: --method ia3/prefix/prompt/ptuning run through the PEFT library, which is not "
                         "installed: pip install peft  (or pip install 'structlora[peft]')") from None
    return peft


def build_config(args: argparse.Namespace, task_type: str) -> Any:
    """The PEFT config of ``args.method``; ``--target-modules`` (IA3) and ``--modules-to-save`` pass through."""
    peft = require_peft()
    method = args.method
    config_class = getattr(peft, PEFT_METHODS[method])
    kwargs: dict[str, Any] = {"task_type": task_type}
    if getattr(args, "modules_to_save", None):
        kwargs["modules_to_save"] = list(args.modules_to_save)
    if method == "ia3":
        if getattr(args, "target_modules", None):
            raise SystemExit("error: --target-modules with --method ia3: IA3 also needs its feed-forward subset; "
                             "use PEFT's per-architecture defaults (leave --target-modules unset)")
    else:
        kwargs["num_virtual_tokens"] = getattr(args, "num_virtual_tokens", None) or DEFAULT_VIRTUAL_TOKENS
        encoder_width = getattr(args, "encoder_hidden_size", None)
        if method == "ptuning":
            kwargs["encoder_hidden_size"] = encoder_width or DEFAULT_PTUNING_ENCODER_WIDTH
        elif method == "prefix" and encoder_width:
            # Li & Liang's reparametrisation: embedding -> Linear -> tanh -> Linear to every layer's keys and
            # values (PEFT saves the product, so the saved adapter needs no MLP to load).
            kwargs.update(prefix_projection=True, encoder_hidden_size=encoder_width)
    return config_class(**kwargs)


def wrap(model: Any, args: argparse.Namespace, task_type: str) -> Any:
    """``peft.get_peft_model(model, config)``, refusing what PEFT cannot run on this model."""
    peft = require_peft()
    if args.method == "prefix" and not _takes_past_key_values(model):
        raise SystemExit(
            f"error: --method prefix: PEFT's prefix tuning feeds the prefix as past_key_values, and "
            f"{type(model).__name__}.forward (transformers {_transformers_version()}) takes no past_key_values; "
            f"use --method prompt or ptuning for this model")
    if getattr(args, "init_from", None):
        raise SystemExit(f"error: --init-from is not supported with --method {args.method} (a PEFT adapter)")
    return peft.get_peft_model(model, build_config(args, task_type))


def _takes_past_key_values(model: Any) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    # transformers 5.x renamed the argument to `cache` (PEFT's `past_key_values=` still reaches it).
    return "past_key_values" in parameters or "cache" in parameters


def saved_method(folder: str | Path) -> str | None:
    """The --method of an adapter folder PEFT saved (``ia3``, ``prefix``, ...); None for structlora's own."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "method" in config:  # structlora's configs name their method
        return None
    return PEFT_TYPES.get(str(config.get("peft_type")))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
