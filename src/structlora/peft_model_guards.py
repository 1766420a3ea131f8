"""`PeftModelGuards`: what `structlora.PeftModel` checks around PEFT's own saving, loading and switching.

A mixin placed between structlora's `PeftModel` and `peft.PeftModel` in the method order, so that PEFT's methods
run inside these checks whichever of structlora's methods called them:

- loading weights (`load_adapter`, `load_adapter_weights`, `set_adapter_state_dict`, and so `from_pretrained`): the
  structure recorded in the weights file must equal the adapter's config (ctcm and dtsm have the same tensors), a
  refusal names the file, and weights loaded into an existing adapter are all or nothing (an exception in the
  middle, an interrupt included, puts back the tensors written so far);
- saving: the adapter's structure is recorded in the weights file's metadata (read back by the check above);
- transformers' and PEFT's switches (`disable_adapters`, `enable_adapters`, `disable_adapter_layers`,
  `enable_adapter_layers`, `get_adapter_state_dict`) checked against the adapter state; names that would reach
  transformers' adapter mixin of the wrapped model (which knows no structlora adapter) refused with what to call;
- `check_loadable(model, folder)`: from_pretrained's refusals before anything is built (a model that already holds
  adapters, a folder without or with an unreadable adapter_config.json).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Optional

import peft
import torch
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_state import AdapterStateError
from .config import CONFIG_NAME, AdapterConfig
from .convert import CONFIG_METADATA_KEY, WEIGHTS_NAME, check_saved_structure, structure_fields
from .peft_checks import loading_from
from .peft_layers import StructloraTunerLayer

# Names a user of transformers' or PEFT's API may call that structlora.PeftModel does not provide, with what to use.
_NOT_PROVIDED = {
    "enable_peft_hotswap": "hotswap_adapter (structlora.PeftModel.load_adapter into an existing adapter swaps its "
                           "weights in place)",
    "add_weighted_adapter": "adapter_names=[...] (one adapter per row) or an adapter trained on the mixture",
}


def refuse_adapted_model(model: nn.Module, hint: str) -> None:
    """AdapterStateError when `model` is a PeftModel or holds structlora's layers (the base model of one): wrapping
    it again would reset the adapters it holds. `hint` says what to call instead."""
    if isinstance(model, peft.PeftModel):
        raise AdapterStateError(f"model already has adapters (it is a PeftModel): {hint}")
    if any(isinstance(module, StructloraTunerLayer) for module in model.modules()):
        raise AdapterStateError(f"model already holds structlora adapter layers (it is the base model of a "
                                f"PeftModel): wrapping it again would reset them; {hint} on that PeftModel instead")


def check_loadable(model: nn.Module, folder: str, subfolder: Optional[str] = None) -> None:
    """from_pretrained's refusals before anything is built: `model` already holds adapters (wrapping it again would
    reset them); a local folder without an adapter_config.json, or with one that is not JSON."""
    refuse_adapted_model(model, f"use model.load_adapter({folder!r}, adapter_name=...) to add it")
    if not os.path.isdir(folder):
        return  # a Hub id: PEFT downloads it
    path = os.path.join(folder, subfolder or "", CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.path.dirname(path)!r}: not a saved adapter folder")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"corrupt adapter config {path!r}: {error}") from error
    if isinstance(data, dict) and "method" in data:  # a structlora config: its method and fields checked first
        try:
            AdapterConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path!r}: {error}") from error


class PeftModelGuards(peft.PeftModel):
    """The checks around PEFT's saving, loading and switching (see the module docstring)."""

    # -- loading -------------------------------------------------------------------------------------------------
    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        """PEFT's load_adapter with the structure check, refusals naming the file, and all-or-nothing writes into an
        existing adapter."""
        weights = os.path.join(str(model_id), kwargs.get("subfolder") or "", WEIGHTS_NAME)
        if os.path.isfile(weights):
            config = self.peft_config.get(adapter_name) or peft.PeftConfig.from_pretrained(
                str(model_id), subfolder=kwargs.get("subfolder"))
            if isinstance(config, AdapterConfig):
                with safe_open(weights, framework="pt") as handle:
                    check_saved_structure(handle.metadata() or {}, config, weights)
        with loading_from(weights), self._all_or_nothing(adapter_name):
            return super().load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)

    def load_adapter_weights(self, directory: str, adapter_name: Optional[str] = None) -> None:
        """Load the weights saved in `directory` into the existing adapter `adapter_name` (default: the active one):
        every tensor checked (present, shape, dtype, finite in the adapter's dtype, the recorded structure), then
        copied all or nothing. Refused while an adapter is merged."""
        name = adapter_name or self.active_adapter
        self.adapter_state.check_write_weights(name, "loading adapter weights")
        self.load_adapter(directory, name, is_trainable=not self.peft_config[name].inference_mode)

    @torch.no_grad()
    def set_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: Optional[str] = None,
                               source: str = "the state dict") -> None:
        """Write `tensors` (keyed as adapter_state_dict / PEFT's files) into the existing adapter `adapter_name`
        (default: the active one), with load_adapter_weights' checks; `source` names them in errors."""
        name = adapter_name or self.active_adapter
        self.adapter_state.check_write_weights(name, "loading adapter weights")
        with loading_from(source), self._all_or_nothing(name):
            set_peft_model_state_dict(self, tensors, adapter_name=name)

    @contextlib.contextmanager
    def _all_or_nothing(self, adapter_name: str) -> Iterator[None]:
        """For an existing adapter: on any exception in the block, its tensors (and the biases, which bias="all"
        trains) get their values from before the block back, bit for bit."""
        if adapter_name not in self.peft_config:
            yield  # a new adapter: a failed load takes the injection back out (structlora.peft_rollback)
            return
        marks = (f".{adapter_name}.",)
        kept = [(tensor, tensor.detach().clone()) for key, tensor in self.state_dict().items()
                if any(mark in f".{key}." for mark in marks) or key.endswith("bias")]
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for tensor, value in kept:
                    tensor.copy_(value)
            raise

    # -- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        **kwargs: Any) -> None:
        """PEFT's save_pretrained, then each adapter's structure recorded in its weights file's metadata."""
        super().save_pretrained(save_directory, selected_adapters=selected_adapters, **kwargs)
        for name in selected_adapters if selected_adapters is not None else list(self.peft_config):
            config = self.peft_config[name]
            path = os.path.join(save_directory, "" if name == "default" else name, WEIGHTS_NAME)
            if isinstance(config, AdapterConfig) and os.path.isfile(path):
                with safe_open(path, framework="pt") as handle:
                    metadata = dict(handle.metadata() or {})
                metadata[CONFIG_METADATA_KEY] = json.dumps(structure_fields(config), sort_keys=True)
                save_file(load_file(path), path, metadata=metadata)

    # -- transformers' and PEFT's switches ---------------------------------------------------------------------
    def disable_adapters(self) -> None:
        """transformers' name: every adapter off until enable_adapters() (the base model exactly). Refused while an
        adapter is merged (its ΔW is in the base weights: unmerge_adapter() first)."""
        self.adapter_state.check_disable()
        self.base_model.disable_adapter_layers()

    def enable_adapters(self) -> None:
        """transformers' name: the active adapter on again; refused inside a `with disable_adapter():` block."""
        state = self.adapter_state
        if state.disabled_depth:
            raise AdapterStateError("enable_adapters() inside a disable_adapter() block: the block computes the base "
                                    "model until it ends; leave the block instead")
        state.check_usable("enable_adapters")
        self.base_model.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """PEFT's name of disable_adapters()."""
        self.disable_adapters()

    def enable_adapter_layers(self) -> None:
        """PEFT's name of enable_adapters()."""
        self.enable_adapters()

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None,
                               state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """transformers' name of adapter_state_dict: the tensors save_pretrained writes for `adapter_name` (default:
        the active adapter); `state_dict` must be None (the adapter's own tensors are read)."""
        if state_dict is not None:
            raise TypeError("get_adapter_state_dict(state_dict=...) is not supported by structlora: it reads the "
                            "adapter's own tensors; call get_adapter_state_dict(adapter_name)")
        return self.adapter_state_dict(adapter_name)

    def __getattr__(self, name: str) -> Any:
        if name in _NOT_PROVIDED:  # PEFT would hand it on to transformers' mixin, which knows no structlora adapter
            raise AttributeError(f"structlora.PeftModel has no {name}(): use {_NOT_PROVIDED[name]}")
        return super().__getattr__(name)


__all__ = ["PeftModelGuards", "check_loadable", "refuse_adapted_model"]
