"""What structlora's PEFT tuner does with adapter weights: checking a checkpoint before PEFT copies it, and replacing
an adapter's weights in place (hotswap). `TunerWeights` is a mixin of `structlora.peft_tuner.StructloraTuner`.

- checkpoints: keys `<module>.adapters.<path>` (the adapter name removed), and loading refuses, before the first
  tensor is copied, a file that lacks any of the adapter's weights, holds a tensor no module takes, non-finite values
  (in the dtype it is loaded into), a tensor of the wrong shape or a non-float tensor (PEFT itself loads with
  strict=False); a refused load of an adapter that the same load call injected takes the injection back out
  (`structlora.peft_rollback`);
- `hotswap_adapter`: another folder of the same structure copied into an adapter in place (`structlora.mixed`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .config import AdapterConfig
from .convert import PEFT_PREFIX, peft_layout, read_weights
from .mixed import swap_adapter_weights
from .peft_checks import checkpoint_name
from .peft_layers import ADAPTERS, StructloraTunerLayer
from .targets import module_matches

# Segments of module names inside wrappers (ours and PEFT's): never targets themselves.
_INTERNAL_SEGMENTS = frozenset(("base_layer", ADAPTERS, "modules_to_save", "original_module"))


def _is_internal(name: str) -> bool:
    return not _INTERNAL_SEGMENTS.isdisjoint(name.split("."))


class TunerWeights:
    """StructloraTuner's checkpoint checks and hotswap (see the module docstring). A mixin placed before PEFT's
    BaseTuner: `super()` here is BaseTuner."""

    model: nn.Module
    peft_config: dict[str, AdapterConfig]

    # -- replacing an adapter's weights in place -------------------------------------------------------------
    def hotswap_adapter(self, model_id: str, adapter_name: str = "default") -> None:
        """Replace the weights of `adapter_name` with those of the adapter folder `model_id` (written by
        save_pretrained of a PeftModel with the same structure), in place: the parameters stay the same objects, so an
        optimizer and a torch.compile'd model keep working. A different `lora_alpha` updates the scaling. All or
        nothing: the structure, then every tensor (`_checked_state_dict`) is checked before the first write, and an
        exception while writing puts the previous weights back. Refused while the adapter is merged.
        `peft_model.hotswap_adapter(...)` reaches this through PeftModel's attribute forwarding."""
        with peft_layout(str(model_id)) as folder:  # a folder of structlora's earlier model class: converted
            swap_adapter_weights(_RoutedTuner(self), folder, adapter_name,
                                 lambda path: self._saved_config(path, self.peft_config[adapter_name]))

    def _saved_config(self, folder: str, current: AdapterConfig) -> AdapterConfig:
        """The config saved in `folder` (of `current`'s method), its modules_to_save compared as the modules of this
        model they name: PEFT adds its classifier names to a SEQ_CLS adapter's list when it builds the model (0.21
        again on every load, 0.22 also "pre_classifier"), so the lists of two equal adapters may differ."""
        saved = type(current).from_pretrained(folder)
        names = [n for n, _ in self.model.named_modules() if n and not _is_internal(n)]
        if ({n for n in names if module_matches(n, list(saved.modules_to_save or []))}
                == {n for n in names if module_matches(n, list(current.modules_to_save or []))}):
            saved.modules_to_save = current.modules_to_save
        return saved

    # -- checkpoints -----------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`<module>.adapters.<name>.<path>` → `<module>.adapters.<path>`; other keys (heads, biases) unchanged."""
        head, marker, tail = key.rpartition(f".{ADAPTERS}.{adapter_name}.")
        return f"{head}.{ADAPTERS}.{tail}" if marker else key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: AdapterConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's remapping, then the checks below. A refusal of the weights for an adapter that this same load call
        injected (PeftModel.from_pretrained, load_adapter under a new name) takes the injection back out first, so
        the model is as before the call (structlora.peft_rollback)."""
        tuner = getattr(model, "base_model", None)
        rollback = tuner._load_rollbacks().pop(adapter_name, None) if isinstance(tuner, TunerWeights) else None
        try:
            return cls._checked_state_dict(model, config, adapter_name, state_dict)
        except BaseException:
            if rollback is not None and rollback.belongs_to_failing_load():
                rollback.restore()
            raise

    @classmethod
    def _checked_state_dict(cls, model: nn.Module, config: AdapterConfig, adapter_name: str,
                            state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's remapping; refused before the first tensor is copied when the file lacks any of the adapter's
        weights, holds non-finite values or a tensor of the wrong shape."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        source = checkpoint_name()
        current = model.state_dict()
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(current, prefixes)
        missing = sorted(key for key in expected if key not in remapped)
        if missing:
            hint = ("; its keys name no `.adapters.` weights: a folder written by structlora.PeftModel.save_pretrained "
                    "loads with structlora.PeftModel.from_pretrained" if not any(
                        f".{ADAPTERS}." in key for key in state_dict) else "")
            raise ValueError(f"{source} lacks {len(missing)} of adapter {adapter_name!r}'s weights, e.g. "
                             f"{_short(missing[0])} (an adapter of another model or method?){hint}")
        unknown = sorted(key for key in remapped
                         if key not in current and key.removeprefix("base_model.model.") not in current)
        if unknown:  # PEFT itself would skip them (strict=False): the adapter would load without those weights
            raise ValueError(f"{source} holds {len(unknown)} tensor(s) that no module of this model takes, e.g. "
                             f"{_short(unknown[0])} (an adapter of another model or config?): nothing was loaded")
        for key, value in remapped.items():
            target = current.get(key, current.get(key.removeprefix("base_model.model.")))
            if isinstance(value, torch.Tensor) and target is not None:
                _check_tensor(source, _short(key), value, target)
        return remapped


class _RoutedTuner:
    """What structlora.mixed reads of a model (routing rows, hot-swapping), for a StructloraTuner."""

    def __init__(self, tuner: TunerWeights) -> None:
        self.peft_config = tuner.peft_config
        self._model = tuner.model

    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        """structlora's layers, and PEFT's wrappers of the modules to save (heads) with one copy per adapter."""
        return ((n, m) for n, m in self._model.named_modules()
                if isinstance(m, (StructloraTunerLayer, ModulesToSaveWrapper)))

    @torch.no_grad()
    def load_adapter_weights(self, directory: str, adapter_name: str) -> None:
        """The weights of the folder written by a PeftModel's save_pretrained, copied into adapter `adapter_name`'s
        tensors (parameters stay the same objects) by PEFT's set_peft_model_state_dict, whose tuner hook checks every
        tensor before the first copy (`StructloraTuner._checked_state_dict`). An exception while copying (an
        interrupt) writes the previous weights back."""
        merged = [n for n, m in self._wrappers() if adapter_name in getattr(m, "merged_adapters", ())]
        if merged:
            raise ValueError(f"hotswap_adapter: adapter {adapter_name!r} is merged into the base weights (e.g. at "
                             f"{merged[0]!r}): unmerge_adapter() first; nothing was changed")
        tensors, _, _ = read_weights(directory)
        # The layers sit in the model itself here (no PeftModel around it): keys without PEFT's prefix, as
        # transformers' load_adapter passes them.
        tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
        previous = {key: value.clone() for key, value in
                    get_peft_model_state_dict(self._model, adapter_name=adapter_name).items()}
        try:
            set_peft_model_state_dict(self._model, tensors, adapter_name)
        except BaseException:
            set_peft_model_state_dict(self._model, previous, adapter_name)
            raise

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Every layer computes its base output; requires_grad is left as it is (PEFT's enable_adapters would set
        it on the active adapter)."""
        layers = [layer for _, layer in self._wrappers()]
        previous = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous):
                layer._disable_adapters = was


def _check_tensor(source: str, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    """ValueError, before the first copy, for a checkpoint tensor that would not load as itself into `target`."""
    # torch's load_state_dict copies every other tensor before it reports a wrong shape: refused here, before the
    # first copy (PEFT's ignore_mismatched_sizes would leave those weights as they were: refused too).
    if value.shape != target.shape:
        raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, but the model's is {tuple(target.shape)} "
                         f"(an adapter of another model or config?): nothing was loaded")
    if target.is_floating_point() and not value.is_floating_point():  # copy_ would convert it without a word
        raise ValueError(f"{source}: {key} has dtype {value.dtype}; adapter weights are floating point "
                         f"({target.dtype}): a corrupt file? nothing was loaded")
    # Finite in the dtype it is loaded into: an fp32 3e35 becomes inf in an fp16 adapter.
    if value.is_floating_point() and not torch.isfinite(value.to(target.dtype)).all():
        raise ValueError(f"{source}: {key} has non-finite values (NaN/inf) in {target.dtype}: refusing to load a "
                         f"diverged or corrupt adapter; nothing was loaded")


def _short(key: str) -> str:
    return re.sub(r"^base_model\.model\.", "", key)
