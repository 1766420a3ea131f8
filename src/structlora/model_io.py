"""Saving and loading adapters: `AdapterIO`, PeftModel's half that reads an adapter's tensors
(adapter_state_dict), writes them to a folder (save_pretrained: adapter_config.json + adapter_model.safetensors)
and reads them back (from_pretrained, load_adapter, set_adapter_state_dict), every tensor checked before the
first write. `structlora.model.PeftModel` combines it with the rest.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_state import AdapterState, ModuleSnapshot
from .atomic import copy_all_or_nothing, staged_files
from .config import CONFIG_NAME, AdapterConfig
from .convert import CONFIG_METADATA_KEY, WEIGHTS_NAME, check_saved_structure, read_weights, structure_fields
from .peft_support import refuse_peft_layout
from .distributed import full_cpu_copies, is_writer, whole_parameters
from .model_injection import _refuse_adapted_base
from .svd_init import saved_factors_follow
from .tensor_train import parameter_values

_Model = TypeVar("_Model", bound="AdapterIO")


def adapter_folder(save_directory: str, adapter_name: str) -> str:
    """Where save_pretrained(save_directory) writes adapter `adapter_name`: "default" at the top, the others in a
    sub-folder named after them (PEFT's layout)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


class AdapterIO:
    """PeftModel's saving and loading. A mixin: the host (`structlora.model.PeftModel`) holds the model and the
    adapter registry declared below."""

    base_model: nn.Module
    peft_config: dict[str, AdapterConfig]
    _trained_base_params: dict[str, list[str]]  # per adapter: the base model's parameters it trains in place
    _state: AdapterState
    _transaction: Callable[[], ContextManager[None]]  # undoes the block's changes if it raises
    _wrappers: Callable[[], Iterator[tuple[str, nn.Module]]]  # (name, adapter layer) of the base model
    add_adapter: Callable[[str, AdapterConfig], None]
    active_adapter: str

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Everything adapter `adapter_name` (default: the active one) trained, keyed by module path (no adapter
        name in the keys): the tensors save_pretrained writes.

        Raises:
            ValueError: no adapter has that name.
        """
        adapter_name = adapter_name or self.active_adapter
        self._state.check_exists(adapter_name, "adapter_state_dict")
        state: dict[str, torch.Tensor] = {}
        for name, wrapper in self._wrappers():
            if adapter_name in wrapper.adapters:
                for param_name, tensor in wrapper.adapters[adapter_name].state_dict().items():
                    state[f"{name}.{param_name}"] = tensor
        params = dict(self.base_model.named_parameters())
        for name in self._trained_base_params.get(adapter_name, []):
            state[name] = params[name]
        return state

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None
                               ) -> dict[str, torch.Tensor]:
        """transformers' name of adapter_state_dict (keys as save_pretrained writes them: module paths without the
        adapter name, not PEFT's).

        Args:
            adapter_name: the adapter (default: the active one).
            state_dict: refused (TypeError) unless None: the adapter's own tensors are read (and gathered when
                sharded).
        """
        if state_dict is not None:
            raise TypeError("get_adapter_state_dict(state_dict=...) is not supported by structlora: it reads the "
                            "adapter's own tensors (gathering them when sharded); call "
                            "get_adapter_state_dict(adapter_name)")
        return self.adapter_state_dict(adapter_name)

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters behind adapter_state_dict(adapter_name) (to gather them where they are sharded)."""
        parameters = [p for _, wrapper in self._wrappers() if adapter_name in wrapper.adapters
                      for p in wrapper.adapters[adapter_name].parameters()]
        base = dict(self.base_model.named_parameters())
        return parameters + [base[name] for name in self._trained_base_params.get(adapter_name, [])]

    # -- saving and loading ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        **_: Any) -> None:
        """Write adapter_config.json and adapter_model.safetensors per adapter into `save_directory`
        ("default" at its top, the others in subfolders named after them). Only adapter weights are written.
        Each file is written aside and renamed into place: an error or a kill while saving over an adapter leaves
        that folder loading as before.

        Args:
            save_directory: the folder (created if needed).
            selected_adapters: the adapters to save (default: all).
        Extra keyword arguments (the Trainer passes `state_dict`, `safe_serialization`…) are ignored.

        Raises:
            ValueError: `save_directory` is a file, or an adapter has no or non-finite weights (nothing is written).
            ValueError: an unknown adapter name; AdapterStateError after merge_and_unload().
        """
        names = list(selected_adapters or self.peft_config)
        self._state.check_save(names)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory!r} is a file")
        states, sharded = {}, False
        for adapter_name in names:  # everything is gathered and checked before the first file is written
            # Sharded (FSDP2, ZeRO-3) weights are gathered on every rank, which must all call this; rank 0 writes.
            with whole_parameters(self._adapter_parameters(adapter_name)) as partitioned:
                tensors, gathered = full_cpu_copies(self.adapter_state_dict(adapter_name))
            sharded |= gathered or partitioned
            if not tensors:
                raise ValueError(f"save_pretrained: adapter {adapter_name!r} has no weights to save")
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise ValueError(f"save_pretrained: adapter {adapter_name!r} has non-finite values (NaN/inf) in "
                                 f"{len(bad)} tensor(s), e.g. {bad[0]}; refusing to save a diverged adapter")
            states[adapter_name] = tensors
        if sharded and not is_writer():
            return
        for adapter_name, tensors in states.items():
            directory = adapter_folder(save_directory, adapter_name)
            metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(
                structure_fields(self.peft_config[adapter_name]), sort_keys=True)}
            # Written aside and renamed into place, the weights first: a save that fails or is killed leaves the
            # old folder loading as before, and one killed between the two renames leaves new weights beside the
            # old config, which loads as the new adapter (same structure) or is refused by the structure check.
            with staged_files(directory, (WEIGHTS_NAME, CONFIG_NAME)) as staging:
                save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata=metadata)
                self.peft_config[adapter_name].save_pretrained(staging)

    @classmethod
    def from_pretrained(cls: type[_Model], model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **_: Any) -> _Model:
        """Load the adapter saved in folder `model_id` (by save_pretrained) into `model`.

        Args:
            model: the base model it was trained on (a different architecture or size is refused).
            model_id: the adapter folder.
            adapter_name: the name to give it.
            is_trainable: False (default) freezes the adapter for inference.
        Returns:
            The PeftModel, with that adapter active.
        Raises:
            FileNotFoundError: no adapter_config.json or adapter_model.safetensors in the folder.
            ValueError: a corrupt file, a PEFT folder (load those with peft), or weights that do not fit the
                model or the config. `model` is left exactly as it was.
        """
        _refuse_adapted_base(model, hint=f"use model.load_adapter({model_id!r}, adapter_name=...) to add it")
        refuse_peft_layout(model_id)  # this earlier class reads its own weights layout only
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        with saved_factors_follow():  # SVD starts: the saved factors are loaded, not computed again
            return cls.wrap_and_fill(model, config, adapter_name,
                                     lambda peft_model: peft_model.load_adapter_weights(model_id, adapter_name))

    @classmethod
    def wrap_and_fill(cls: type[_Model], model: nn.Module, config: AdapterConfig, adapter_name: str,
                      fill: Callable[[_Model], None]) -> _Model:
        """Wrap `model` with an adapter `adapter_name` described by `config` and fill its weights with `fill`
        (called with the new PeftModel); if anything fails, `model` is left exactly as it was (module tree,
        requires_grad, hooks) and the error is raised. Returns the PeftModel."""
        snapshot = ModuleSnapshot(model)
        peft_model = cls(model, config, adapter_name)
        try:
            fill(peft_model)
        except BaseException:
            snapshot.restore()
            raise
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = True) -> None:
        """Add the adapter saved in folder `model_id` under `adapter_name`, or replace that adapter's weights if
        it exists. `is_trainable` False freezes a new adapter.

        Raises:
            AdapterStateError: an adapter is merged.
            FileNotFoundError, ValueError: as from_pretrained. On any error the model is left as it was.
        """
        if adapter_name in self._state:
            self._state.check_write_weights(adapter_name, "load_adapter")
            self.load_adapter_weights(model_id, adapter_name)
            return
        self._state.check_add(adapter_name)
        refuse_peft_layout(model_id)
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        with self._transaction(), saved_factors_follow():
            self.add_adapter(adapter_name, config)
            self.load_adapter_weights(model_id, adapter_name)

    def load_adapter_weights(self, directory: str, adapter_name: str | None = None) -> None:
        """Load adapter_model.safetensors from `directory` into the existing adapter `adapter_name` (default: the
        active one). Strict: every tensor present with its shape, and the structure recorded in the file equal
        to the adapter's config.

        Raises:
            FileNotFoundError: no weights file. ValueError: a corrupt file or weights that do not fit.
        """
        tensors, metadata, path = read_weights(directory)
        self._check_saved_structure(metadata, adapter_name or self.active_adapter, path)
        self.set_adapter_state_dict(tensors, adapter_name, source=path)

    def _check_saved_structure(self, metadata: dict[str, str], adapter_name: str, path: str) -> None:
        """Refuse weights saved from an adapter whose structure differs from the one they are loaded into
        (structlora.convert.check_saved_structure)."""
        if CONFIG_METADATA_KEY in metadata:
            self._state.check_exists(adapter_name, "loading adapter weights")
            check_saved_structure(metadata, self.peft_config[adapter_name], path)

    @torch.no_grad()
    def set_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None,
                               source: str = "state dict") -> None:
        """Write `tensors` (keyed as adapter_state_dict) into adapter `adapter_name` (default: the active one):
        every key present, shapes equal, floating point and finite in the adapter's dtype, all checked before the
        first write. `source` names the tensors' origin in error messages.

        Raises:
            ValueError: a missing, unexpected, misshapen or non-finite tensor (nothing is written).
            AdapterStateError: an adapter is merged.
        """
        adapter_name = adapter_name or self.active_adapter
        self._state.check_write_weights(adapter_name, "loading adapter weights")
        # Sharded weights (FSDP2, ZeRO-3): every rank checks the whole tensors and keeps its part.
        with whole_parameters(self._adapter_parameters(adapter_name), modify=True):
            converted = self._checked(tensors, self.adapter_state_dict(adapter_name), source)
            # Written parameter by parameter (not into the state dict's tensors): a tensor train's cores are joined
            # into the flat parameter that holds them, which may be an FSDP2 DTensor.
            pairs = [pair for name, wrapper in self._wrappers() if adapter_name in wrapper.adapters
                     for pair in parameter_values(wrapper.adapters[adapter_name], converted, f"{name}.")]
            base = dict(self.base_model.named_parameters())
            pairs += [(base[name], converted[name]) for name in self._trained_base_params.get(adapter_name, [])]
            # All or nothing, also for an interrupt in the middle: a half-loaded adapter computes neither function.
            copy_all_or_nothing(pairs)
        self._state.weights_written()

    @staticmethod
    def _checked(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 source: str) -> dict[str, torch.Tensor]:
        """`tensors` converted to the dtype and device of `expected`'s, once every check has passed."""
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(
                f"{source} has weights for modules this model's adapter does not have (an adapter for another "
                f"base model?): {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        if missing:
            raise ValueError(f"{source} lacks {len(missing)} adapter weights, e.g. {', '.join(missing[:5])}")
        converted = {}
        for key, target in expected.items():
            source_tensor = tensors[key]
            if not isinstance(source_tensor, torch.Tensor):
                raise ValueError(f"{source}: {key} is a {type(source_tensor).__name__}, not a tensor")
            if source_tensor.shape != target.shape:
                module = key.split(".adapters.")[0]
                raise ValueError(
                    f"shape mismatch for {key} (module {module!r}): the file has {tuple(source_tensor.shape)}, "
                    f"this base model needs {tuple(target.shape)} — the adapter was trained on a different base model")
            if not (source_tensor.is_floating_point() or not target.is_floating_point()):
                raise ValueError(f"{source}: {key} has dtype {source_tensor.dtype}; adapter weights are floating "
                                 f"point ({target.dtype})")
            value = source_tensor.to(dtype=target.dtype, device=target.device)
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{source}: {key} has {bad} non-finite value(s) (NaN/inf) in {target.dtype}; "
                                 f"refusing to load a diverged or corrupt adapter")
            converted[key] = value
        return converted
