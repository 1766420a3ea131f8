"""Precision and memory settings that follow the device the run is on.

Recipes are written for the authors' GPUs (bf16, gradient checkpointing); the same command must also run on
a CPU. ``resolve_device_settings`` keeps every setting the hardware can honour and turns off, with one
``warning:`` line each, those it cannot:

- ``--bf16`` / ``--model-dtype bfloat16`` only where the device computes in bfloat16 natively (CUDA with
  bf16 support, a CPU with AVX512-BF16 or AMX; on such a CPU a note says the run is in bf16); elsewhere bf16 matrix
  products are emulated and were measured ~54x slower than float32, so float32 is used.
- ``--fp16`` needs an accelerator (Trainer's fp16 mixed precision has no CPU path).
- ``--gradient-checkpointing`` from a recipe file is a GPU-memory setting; on a CPU it only costs a second
  forward pass, so it is turned off there unless given on the command line.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from .flags import explicit_flags


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the instruction sets that compute in bf16 (x86 AVX512-BF16 / AMX, Arm BF16)
        flags = set(cpuinfo.read_text(errors="ignore").split())
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
    import torch

    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def bf16_supported() -> bool:
    """Whether bfloat16 arithmetic runs natively on the device this process trains on."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    if has_accelerator():
        return True  # other accelerators (XPU, MPS on recent macOS) compute in bf16
    return _cpu_has_native_bf16()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    if has_accelerator():
        return str(torch.accelerator.current_accelerator())
    return f"cpu ({torch.get_num_threads()} threads)"


def resolve_device_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Turn off, with a warning, the precision / checkpointing settings the device cannot honour.
    Idempotent; returns ``args``."""
    if getattr(args, "_device_settings_resolved", False):
        return args
    explicit = explicit_flags(args)
    accelerator = has_accelerator()
    wants_bf16 = bool(getattr(args, "bf16", False)) or getattr(args, "model_dtype", None) == "bfloat16"
    if wants_bf16 and not bf16_supported():
        warn("bf16 requested (--bf16 / --model-dtype bfloat16) but this device has no native bfloat16 "
             "arithmetic (emulated bf16 is ~54x slower on such CPUs): using float32. Run on a GPU with bf16 to "
             "keep the recipe's precision")
        if getattr(args, "bf16", False):
            args.bf16 = False
        if getattr(args, "model_dtype", None) == "bfloat16":
            args.model_dtype = "float32"
    elif wants_bf16 and not accelerator:  # said, not silent: a CPU run in bf16 is a choice worth seeing
        print("note: bf16 on the CPU: it has native bfloat16 arithmetic (AVX512-BF16 / AMX), so the run computes in "
              "bfloat16 as asked; losses and metrics differ slightly from a float32 run (pass --no-bf16 for float32)",
              file=sys.stderr, flush=True)
    if getattr(args, "fp16", False) and not accelerator:
        warn("--fp16 needs a GPU (fp16 mixed precision has no CPU path): using float32")
        args.fp16 = False
    if getattr(args, "gradient_checkpointing", False) and not accelerator \
            and "gradient_checkpointing" not in explicit:
        warn("the recipe's gradient checkpointing saves GPU memory; on a CPU it only recomputes the forward "
             "pass, so it is off (pass --gradient-checkpointing to keep it)")
        args.gradient_checkpointing = False
    args._device_settings_resolved = True
    return args


def precision_name(args: argparse.Namespace) -> str:
    """What the Trainer will compute in, for the run summary."""
    if getattr(args, "bf16", False):
        return "bf16 mixed precision" + ("" if has_accelerator() else " on the CPU")
    if getattr(args, "fp16", False):
        return "fp16 mixed precision"
    return "float32"
