"""The baselines that PEFT itself implements — IA3, prefix tuning, prompt tuning, P-tuning — for the recipes.

structlora does not re-implement them: ``--method ia3|prefix|prompt|ptuning`` builds the PEFT config and
calls ``peft.get_peft_model``; training and saving go through transformers' Trainer, which knows PEFT
models (checkpoints and the final folder hold PEFT's ``adapter_model.safetensors``). PEFT is optional:
``pip install 'structlora[peft]'``.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

# --method name -> PEFT config class name
PEFT_METHODS: dict[str, str] = {
    "ia3": "IA3Config",
    "prefix": "PrefixTuningConfig",
    "prompt": "PromptTuningConfig",
    "ptuning": "PromptEncoderConfig",
}
DEFAULT_VIRTUAL_TOKENS = 20


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
        if method == "ptuning":
            kwargs["encoder_hidden_size"] = getattr(args, "encoder_hidden_size", None) or 128
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
        return "past_key_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
