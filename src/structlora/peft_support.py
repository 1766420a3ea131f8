"""How structlora meets PEFT: the releases it plugs into (and the one error outside them), and the `peft_type`
names of its methods.

structlora's methods are PEFT methods written into PEFT's module-level tables (`structlora.peft_method`), which
PEFT does not promise to keep stable: only the releases tested in CI are accepted.
"""

from __future__ import annotations

import enum
import os
import re
import sys
from importlib import metadata
from types import CodeType

# The PEFT releases CI tests (oldest and newest); pyproject.toml bounds peft to the same range.
SUPPORTED_PEFT = (">=0.21", "<0.23")
_LOWEST, _BELOW = (0, 21), (0, 23)


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def require_supported_peft() -> str:
    """The installed peft version, or ImportError naming the supported range (peft missing or outside it)."""
    wanted = f"peft{','.join(SUPPORTED_PEFT)}"
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        raise ImportError(f"structlora needs {wanted}, which is not installed: pip install '{wanted}'") from None
    release = _major_minor(version)
    if release is None or not _LOWEST <= release < _BELOW:
        raise ImportError(f"structlora needs {wanted} (the PEFT releases it is tested with), but peft {version} is "
                          f"installed: pip install '{wanted}'")
    return version


# What PEFT's loaders say, without structlora imported, about a folder saved through PEFT (peft.PeftModel,
# transformers' save_pretrained): they look `peft_type` up in their table and fail with a KeyError quoting it.
_PEFT_TYPE_HINT = " (a structlora method: pip install structlora, then import structlora before loading this adapter)"


class StructloraPeftType(str, enum.Enum):
    """The `peft_type` of each structlora method in PEFT's tables. The value carries the hint a user needs when
    PEFT meets it without structlora imported."""

    LORA = "STRUCTLORA_LORA" + _PEFT_TYPE_HINT
    MTLORA = "STRUCTLORA_MTLORA" + _PEFT_TYPE_HINT
    LORETTA_REP = "STRUCTLORA_LORETTA_REP" + _PEFT_TYPE_HINT
    LORETTA_ADP = "STRUCTLORA_LORETTA_ADP" + _PEFT_TYPE_HINT
    ADAPTER = "STRUCTLORA_ADAPTER" + _PEFT_TYPE_HINT
    BITFIT = "STRUCTLORA_BITFIT" + _PEFT_TYPE_HINT


def refuse_peft_layout(directory: str) -> None:
    """ValueError when the adapter folder was saved through peft (peft.PeftModel, transformers): its weights are
    keyed `base_model.model.<module>.adapters.<path>`, which structlora.PeftModel's loaders do not read."""
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return  # the loader reports a missing weights file itself
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - a corrupt file is the weights loader's to report, with its own message
        return
    if any(key.startswith("base_model.model.") for key in keys):
        raise ValueError(f"{directory!r} was saved through peft (peft.PeftModel.save_pretrained or transformers): "
                         f"load it with peft.PeftModel.from_pretrained(model, path) (importing structlora registers "
                         f"its methods with peft); structlora.PeftModel reads the folders it saves itself")


def running_frames() -> set[int]:
    """The ids of the frames running now (this call's callers)."""
    frame, ids = sys._getframe(1), set()
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return ids


def _peft_load_codes() -> tuple[CodeType, ...]:
    from peft import PeftModel

    return PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__


def peft_load_call() -> int | None:
    """The outermost `peft.PeftModel.from_pretrained` / `load_adapter` call running now (its frame's id), or None.
    An id, not the frame: a record that outlives its call must not keep the call's locals (the models) alive."""
    codes, frame, found = _peft_load_codes(), sys._getframe(1), None
    while frame is not None:
        if frame.f_code in codes:
            found = id(frame)
        frame = frame.f_back
    return found


class MissingWeightsError(FileNotFoundError, ValueError):
    """An adapter folder without its weights file: a FileNotFoundError, and a ValueError as the other refusals of a
    folder."""


def refuse_unloadable_weights(directory: str) -> None:
    """Inside a PEFT load call (`peft_load_call`): ValueError when the folder has no adapter weights file, or an
    adapter_model.safetensors whose header does not read. PEFT would find out only after injecting the adapter's
    layers into the user's model; this runs when PEFT reads the folder's config, before that."""
    directory = os.path.normpath(directory)
    safetensors_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(safetensors_path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            return  # PEFT's older format: PEFT reads it
        raise MissingWeightsError(f"no adapter_model.safetensors in {directory!r} (it has an adapter_config.json): "
                                  f"the adapter's weights are missing (an incomplete copy or download?); nothing was "
                                  f"loaded")
    from safetensors import safe_open

    try:
        with safe_open(safetensors_path, framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types; reported as one ValueError
        raise ValueError(f"{safetensors_path!r} does not read as a safetensors file ({error}): a truncated or "
                         f"corrupt copy; nothing was loaded") from error
