"""The recipes' adapter models: a ``peft.PeftModel`` with structlora's tuner (issue 27), built, loaded and read in one
place, so that the class behind it can change here alone.

``wrap_model(model, config)`` is ``peft.get_peft_model`` for every structlora method with a PEFT tuner; BitFit has
none (it injects no layer), and LoRETTA_adp's tensorized DeBERTa pooler is not in the tuner yet (``has_peft_tuner``):
those stay on structlora's own ``structlora.model.PeftModel`` for now.
``load_adapter(base, folder)`` is ``peft.PeftModel.from_pretrained``; a folder in structlora's earlier layout
(written by ``structlora.PeftModel.save_pretrained``: ``structlora.convert``) is converted on load into a temporary
folder first, so that no trained adapter becomes unloadable. ``adapter_state`` / ``set_adapter_state`` are PEFT's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (BitFit: the look-alike's own).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"


def _peft() -> Any:
    import peft

    import structlora  # noqa: F401 - registers structlora's methods in PEFT's tables (structlora._plugin)
    from structlora import _plugin

    _plugin.ensure_registered()
    return peft


def has_peft_tuner(config: Any, model: Any = None) -> bool:
    """``structlora.peft_model.has_peft_tuner``: BitFit, and LoRETTA_adp's tensorized DeBERTa pooler, stay on
    structlora's earlier model class."""
    from structlora.config import AdapterConfig
    from structlora.peft_model import has_peft_tuner as tuner_builds

    return isinstance(config, AdapterConfig) and tuner_builds(config, model)


def wrap_model(model: Any, config: Any, adapter_name: str = "default") -> Any:
    """``model`` with the adapter of structlora ``config``: ``structlora.get_peft_model`` (a ``peft.PeftModel``;
    BitFit and the DeBERTa case of ``has_peft_tuner``: structlora's earlier model class)."""
    _peft()
    import structlora

    return structlora.get_peft_model(model, config, adapter_name)


def is_peft_model(model: Any) -> bool:
    return isinstance(model, _peft().PeftModel)


def is_look_alike_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds an adapter in structlora's earlier layout (``structlora.PeftModel.save_pretrained``):
    a structlora config (it names its ``method``) whose ``peft_type`` is not a structlora PEFT type (the marker of
    those folders, or none in older releases)."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or "method" not in config:
        return False
    from structlora.config import StructloraPeftType

    return config.get("peft_type") not in {member.value for member in StructloraPeftType}


def load_adapter(base: Any, folder: str | Path, is_trainable: bool = False) -> Any:
    """``base`` with the adapter saved in ``folder``: ``peft.PeftModel.from_pretrained``. A folder of structlora's
    earlier layout is converted first (``structlora.convert_folder``, into a temporary folder removed afterwards);
    a folder whose method has no PEFT tuner for ``base`` (``has_peft_tuner``: BitFit) loads with structlora's own
    loader."""
    folder = str(folder)
    peft = _peft()
    if not is_look_alike_folder(folder):
        import structlora

        if isinstance(peft.PeftConfig.from_pretrained(folder), structlora.AdapterConfig):
            return structlora.PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
        return peft.PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)  # PEFT's own methods
    from structlora.config import AdapterConfig

    if not has_peft_tuner(AdapterConfig.from_pretrained(folder), base):
        from structlora.model import PeftModel

        return PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
    from structlora.convert import convert_folder

    with tempfile.TemporaryDirectory(prefix="structlora-convert-") as scratch:
        converted = str(Path(scratch) / "adapter")
        convert_folder(folder, converted)
        return peft.PeftModel.from_pretrained(base, converted, is_trainable=is_trainable)


def read_adapter_weights(folder: str | Path, model: Any) -> dict[str, Any]:
    """The tensors of the adapter in ``folder`` keyed as ``adapter_state(model)`` keys them: PEFT's keys for a
    ``peft.PeftModel`` (a folder of the earlier layout is converted first), the earlier layout's for structlora's own
    model."""
    from safetensors.torch import load_file

    from structlora.convert import WEIGHTS_NAME, convert_folder

    folder = Path(folder)
    if not is_look_alike_folder(folder) or not is_peft_model(model):
        return load_file(str(folder / WEIGHTS_NAME))
    with tempfile.TemporaryDirectory(prefix="structlora-convert-") as scratch:
        converted = Path(scratch) / "adapter"
        convert_folder(str(folder), str(converted))
        return load_file(str(converted / WEIGHTS_NAME))


def adapter_state(model: Any) -> dict[str, Any]:
    """The active adapter's tensors keyed as they are saved (PEFT's ``get_peft_model_state_dict``)."""
    if not is_peft_model(model):
        return model.adapter_state_dict()
    return _peft().get_peft_model_state_dict(model, adapter_name=model.active_adapter)


def set_adapter_state(model: Any, tensors: dict[str, Any], source: str) -> None:
    """Load ``tensors`` (keyed as ``adapter_state`` gives them) into the active adapter; every tensor must be one of
    the adapter's (structlora's tuner refuses a missing, unknown, non-finite or misshapen one before copying)."""
    if not is_peft_model(model):
        model.set_adapter_state_dict(tensors, source=source)
        return
    result = _peft().set_peft_model_state_dict(model, tensors, adapter_name=model.active_adapter)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensor(s) fit no weight of this adapter, e.g. {unexpected[0]}")
