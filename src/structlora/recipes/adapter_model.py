"""The recipes' adapter models: a ``peft.PeftModel`` with structlora's tuner (issue 27), built, loaded and read in one
place, so that the class behind it can change here alone.

``wrap_model(model, config)`` is ``structlora.get_peft_model`` (a ``peft.PeftModel`` subclass); BitFit has
no PEFT tuner (it injects no layer), and LoRETTA_adp's tensorized DeBERTa pooler is not in the tuner yet (``has_peft_tuner``):
those stay on structlora's own ``structlora.model.PeftModel`` for now.
``load_adapter(base, folder)`` is ``structlora.PeftModel.from_pretrained`` (which converts a folder in structlora's
earlier layout on load, so that no trained adapter becomes unloadable), ``peft.PeftModel.from_pretrained`` for PEFT's
own methods. ``adapter_state`` / ``set_adapter_state`` are PEFT's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (BitFit: the look-alike's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any



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


def load_adapter(base: Any, folder: str | Path, is_trainable: bool = False) -> Any:
    """``base`` with the adapter saved in ``folder``: ``structlora.PeftModel.from_pretrained`` for structlora's methods
    (which converts a folder of the earlier layout on load, or gives it the earlier class where the tuner does not
    build it: ``has_peft_tuner``), ``peft.PeftModel.from_pretrained`` for PEFT's own."""
    folder = str(folder)
    peft = _peft()
    import structlora
    from structlora.convert import is_look_alike

    if is_look_alike(folder) or isinstance(peft.PeftConfig.from_pretrained(folder), structlora.AdapterConfig):
        return structlora.PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
    return peft.PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)  # PEFT's own methods


def read_adapter_weights(folder: str | Path, model: Any) -> dict[str, Any]:
    """The tensors of the adapter in ``folder`` keyed as ``adapter_state(model)`` keys them: PEFT's keys for a
    ``peft.PeftModel`` (a folder of the earlier layout converted first: ``structlora.convert.peft_layout``), the
    earlier layout's for structlora's earlier class."""
    from safetensors.torch import load_file

    from structlora.convert import WEIGHTS_NAME, peft_layout

    if not is_peft_model(model):
        return load_file(str(Path(folder) / WEIGHTS_NAME))
    with peft_layout(str(folder)) as converted:
        return load_file(str(Path(converted) / WEIGHTS_NAME))


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
