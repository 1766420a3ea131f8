"""`structlora.PeftModel`: a `peft.PeftModel` (and its task subclasses) with what structlora adds.

`structlora.get_peft_model` and `structlora.PeftModel.from_pretrained` return these classes; `peft.get_peft_model`
returns PEFT's own classes with the same tuner inside (`structlora.peft_tuner`), so the layers, merging, loading
checks and mixed batches are the same on both. What this class adds on top of PEFT's:

- adapters of different structlora methods in one model (LoRA beside MTLoRA, LoRETTA_rep, bottleneck adapters):
  they share one tuner, where PEFT's `add_adapter` holds one `peft_type` per model;
- the adapter state machine (`structlora.adapter_state`) checked before each transition: no adapter is added,
  loaded, deleted or disabled while another is merged into the base weights (PEFT would silently run merged
  weights as "the base" inside `disable_adapter()`); after `merge_and_unload()` the model is spent and says so;
  adapter names are checked (they become module keys and folder names; "__base__" is reserved);
- `save_pretrained` all or nothing: every adapter is checked to hold finite weights, written into a staging folder
  and renamed into place, so a save that fails or is killed leaves the folder loading as before;
- `from_pretrained` also reads folders that structlora's earlier model class wrote (converted on load by
  `structlora.convert_folder`, the folder itself left as it is), and a failed load leaves the base model as it was;
- `clear_factor_caches()` (`structlora.inference`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional, Union

import peft
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from . import atomic
from .adapter_state import AdapterState, AdapterStateError, ModuleSnapshot, validate_adapter_name
from .atomic import flush_tree
from .config import CONFIG_NAME, AdapterConfig, BitFitConfig, LorettaAdpConfig, TaskType
from .convert import is_look_alike, peft_layout, structure_fields
from .distributed import is_writer
from .inference import clear_factor_caches
from .peft_layers import StructloraTunerLayer
from .peft_model_guards import PeftModelGuards, check_loadable, refuse_adapted_model
from .peft_support import StructloraPeftType, refuse_unloadable_weights
from .svd_init import saved_factors_follow


class PeftModel(PeftModelGuards):
    """A `peft.PeftModel` of structlora methods (see the module docstring for what it adds to PEFT's).

    Build it with `structlora.get_peft_model(model, config)` or `structlora.PeftModel.from_pretrained(model, path)`;
    both return the subclass for the config's `task_type` (`PeftModelForCausalLM`, ...), as PEFT does.
    """

    _spent = False  # set by merge_and_unload() / unload()
    _disabled_depth = 0  # nesting of `with disable_adapter():` blocks

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def adapter_state(self) -> AdapterState:
        """The adapters and their state (`structlora.adapter_state.AdapterState`), read from the layers: names in
        the order added, the active one, the merged ones, disabled (in a block, or by disable_adapter_layers()),
        unloaded. A snapshot: change the state through this model's methods, which check each transition on it."""
        state = AdapterState()
        state.names = list(self.peft_config)
        state.active = None if self._spent else self.active_adapter
        layers = [m for m in self.base_model.model.modules() if isinstance(m, StructloraTunerLayer)]
        state.merged = sorted({n for layer in layers for n in getattr(layer, "merged_adapters", ())})
        state.disabled_depth = self._disabled_depth
        state.switched_off = not self._disabled_depth and any(layer.disable_adapters for layer in layers)
        state.unloaded = self._spent
        return state

    # -- adapters ----------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: peft.PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """PEFT's add_adapter; the new adapter may be of another structlora method than the others (one tuner runs
        them all). Refused for an invalid or taken name, while an adapter is merged and while disabled.

        Args: adapter_name: the new adapter's name. peft_config: its structlora config. low_cpu_mem_usage,
            autocast_adapter_dtype: as PEFT's."""
        self.adapter_state.check_add(adapter_name)
        same_tuner = isinstance(peft_config, AdapterConfig) and isinstance(self.peft_type, StructloraPeftType)
        family = self.peft_type
        if same_tuner:
            self.peft_type = peft_config.peft_type  # PEFT's check is one peft_type per model: ours share one tuner
        try:
            super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                                autocast_adapter_dtype=autocast_adapter_dtype)
        finally:
            self.peft_type = family

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """PEFT's set_adapter: make `adapter_name` the active adapter (with `inference_mode`, frozen); refused
        (instead of PEFT's silent unmerge) while another adapter is merged."""
        self.adapter_state.check_activate(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """PEFT's delete_adapter (adapter_name: a name or a list of names); refused for a merged adapter, an unknown
        name and the last adapter (a PeftModel keeps one: disable_adapter() or merge_and_unload() give the base
        model)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        state = self.adapter_state
        for name in names:
            state.check_delete(name)
        if not [n for n in state.names if n not in names]:
            raise AdapterStateError(f"delete_adapter({names!r}) would delete every adapter; a PeftModel keeps at least "
                                    f"one (use disable_adapter() or merge_and_unload())")
        for name in names:
            super().delete_adapter(name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT's block that computes the base model (blocks nest); refused while an adapter is merged: its ΔW is
        in the base weights, which cannot be switched off (unmerge_adapter() first)."""
        self.adapter_state.check_disable()
        self._disabled_depth += 1
        try:
            with super().disable_adapter():
                yield
        finally:
            self._disabled_depth -= 1

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's merge_adapter of `adapter_names` (default: the active one; `safe_merge` checks the merged weights
        for NaN first), all or nothing (see StructloraTuner.merge_adapter); refused while disabled."""
        self.adapter_state.check_merge()
        if hasattr(peft.PeftModel, "merge_adapter"):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        else:  # peft 0.21's PeftModel has none (its __getattr__ reaches the tuner's)
            self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's unmerge_adapter: the merged adapters' ΔW taken back out of the base weights; refused once spent."""
        self.adapter_state.check_usable("unmerge_adapter")
        if hasattr(peft.PeftModel, "unmerge_adapter"):
            super().unmerge_adapter(*args, **kwargs)
        else:  # peft 0.21's PeftModel has none (its __getattr__ reaches the tuner's)
            self.base_model.unmerge_adapter()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """The base model with the active adapter folded in and the wrappers removed (PEFT's, all or nothing). This
        PeftModel is spent afterwards: saving or changing its adapters is refused (save the adapter first)."""
        self.adapter_state.check_merge()
        model = self.base_model.merge_and_unload(*args, **kwargs)
        self._spent = True
        return model

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """The base model without the adapters (PEFT's); this PeftModel is spent afterwards."""
        self.adapter_state.check_usable("unload")
        model = self.base_model.unload(*args, **kwargs)
        self._spent = True
        return model

    def clear_factor_caches(self) -> int:
        """Drop the factors cached for inference (`structlora.inference.clear_factor_caches`); returns how many."""
        return clear_factor_caches(self.base_model.model)

    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes for `adapter_name` (default: the active one), keyed as in the file."""
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"adapter_state_dict: no adapter named {name!r}; adapters: {', '.join(self.peft_config)}")
        return get_peft_model_state_dict(self, adapter_name=name)

    # -- saving and loading ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        **kwargs: Any) -> None:
        """PEFT's save_pretrained of `selected_adapters` (default: all) into `save_directory`, all or nothing:
        refused (nothing written) for a spent model, an unknown adapter or
        non-finite weights; the files are written into a staging folder beside them and renamed into place, the
        weights before the config, so a save that fails or is killed leaves an existing folder loading as before.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self.adapter_state.check_save(names)
        for name in names:
            tensors = self.adapter_state_dict(name)
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise ValueError(f"save_pretrained: adapter {name!r} has non-finite values (NaN/inf) in {len(bad)} "
                                 f"tensor(s), e.g. {bad[0]}; refusing to save a diverged adapter")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory!r} is a file")
        if not kwargs.pop("is_main_process", is_writer()):
            self._gather_without_writing(selected_adapters, **kwargs)
            return
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=save_directory)
        try:
            card = os.path.join(save_directory, "README.md")
            if os.path.isfile(card):  # PEFT updates a model card that is there; it must not replace it with a new one
                shutil.copy2(card, os.path.join(staging, "README.md"))
            super().save_pretrained(staging, selected_adapters=selected_adapters, **kwargs)
            flush_tree(staging)
            _move_tree(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _gather_without_writing(self, selected_adapters: Optional[list[str]], **kwargs: Any) -> None:
        """save_pretrained on a rank other than the writer (FSDP2): PEFT gathers sharded weights, a collective that
        every rank must join in the same order, and writes nothing (a throwaway folder takes its sub-folders)."""
        scratch = tempfile.mkdtemp(prefix="structlora-gather-")
        try:
            super().save_pretrained(scratch, selected_adapters=selected_adapters, is_main_process=False, **kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[peft.PeftConfig] = None,
                        **kwargs: Any) -> "PeftModel":
        """Load the adapter saved in `model_id` into `model`, as peft.PeftModel.from_pretrained, returning
        structlora's class for the config's task type. A folder written by structlora's earlier model class is
        converted on load (the folder is left as it is). On any error `model` is left as it was.

        Args: model: the base model. model_id: the adapter folder. adapter_name: the name to load it under.
            is_trainable: False (default) freezes the adapter. config: the config to use instead of the folder's."""
        validate_adapter_name(adapter_name)
        if is_look_alike(str(model_id)) and not has_peft_tuner(AdapterConfig.from_pretrained(str(model_id)), model):
            from .model import PeftModel as EarlierPeftModel  # the class that wrote it still trains it (BitFit, ...)

            return EarlierPeftModel.from_pretrained(model, str(model_id), adapter_name, is_trainable=is_trainable)
        check_loadable(model, str(model_id), kwargs.get("subfolder"))
        snapshot = ModuleSnapshot(model)
        with peft_layout(str(model_id)) as folder:
            if config is None:
                config = peft.PeftConfig.from_pretrained(folder, **{k: v for k, v in kwargs.items()
                                                                    if k in ("subfolder", "revision", "token")})
            if not isinstance(config, AdapterConfig):
                raise TypeError(f"{model_id!r} holds a {type(config).__name__} (peft_type {config.peft_type}), not a "
                                f"structlora method: load it with peft.PeftModel.from_pretrained")
            config.inference_mode = not is_trainable
            try:
                with saved_factors_follow():  # SVD starts: their saved factors are loaded next, not computed
                    peft_model = model_class(config, model)(model, config, adapter_name)
                peft_model.load_adapter(folder, adapter_name, is_trainable=is_trainable, **kwargs)
            except BaseException:
                snapshot.restore()
                raise
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        """PEFT's load_adapter of the folder `model_id` as `adapter_name` (a new adapter, frozen unless
        `is_trainable`, or new weights for one that exists, which must be of the same structure: refused otherwise);
        a folder of structlora's earlier model class is converted on load. Refused while an adapter is merged."""
        state = self.adapter_state
        if adapter_name in state:
            state.check_write_weights(adapter_name, "load_adapter")
        else:
            state.check_add(adapter_name)
        with peft_layout(str(model_id)) as folder:
            local = os.path.join(folder, kwargs.get("subfolder") or "")
            if os.path.isdir(local):  # PEFT would inject the layers before finding out
                refuse_unloadable_weights(local)
                if adapter_name in state:
                    self._refuse_other_structure(local, adapter_name)
            with saved_factors_follow():  # SVD starts: their saved factors are loaded, not computed
                return super().load_adapter(folder, adapter_name, is_trainable=is_trainable, **kwargs)

    def _refuse_other_structure(self, folder: str, adapter_name: str) -> None:
        """ValueError when the adapter saved in `folder` is not of the structure of the existing adapter
        `adapter_name` that load_adapter would write its weights into: PEFT would load them under the existing
        config (e.g. rsLoRA weights scaled as plain LoRA, LoRA-XS's frozen factors made trainable)."""
        saved = peft.PeftConfig.from_pretrained(folder)
        if not isinstance(saved, AdapterConfig):
            return  # not a structlora method: PEFT's own check refuses it
        mine, theirs = structure_fields(self.peft_config[adapter_name]), structure_fields(saved)

        # modules_to_save: PEFT adds a task's heads (the tuner's key check compares them); older folders: null
        skip = {"modules_to_save"} | {k for k in ("target_modules", "base_model_type") if theirs.get(k) is None}

        def normal(value: Any) -> Any:
            return sorted(value) if isinstance(value, (list, set, tuple)) else value

        differing = sorted(k for k in (mine.keys() & theirs.keys()) - skip if normal(mine[k]) != normal(theirs[k]))
        if differing:
            details = "; ".join(f"{k}: weights saved with {theirs[k]!r}, config has {mine[k]!r}" for k in differing)
            raise ValueError(f"load_adapter: {folder!r} holds a different adapter than {adapter_name!r} ({details}); "
                             f"refusing to load weights that would compute something else (load it under a new name)")


# PEFT's task classes, with structlora's additions first in the method order.
class PeftModelForCausalLM(PeftModel, peft.PeftModelForCausalLM):
    """structlora's PeftModel for CAUSAL_LM adapters."""


class PeftModelForSequenceClassification(PeftModel, peft.PeftModelForSequenceClassification):
    """structlora's PeftModel for SEQ_CLS adapters (the classifier head is trained and saved)."""


class PeftModelForSeq2SeqLM(PeftModel, peft.PeftModelForSeq2SeqLM):
    """structlora's PeftModel for SEQ_2_SEQ_LM adapters."""


class PeftModelForTokenClassification(PeftModel, peft.PeftModelForTokenClassification):
    """structlora's PeftModel for TOKEN_CLS adapters."""


_TASK_CLASSES: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM, "TOKEN_CLS": PeftModelForTokenClassification,
}


def model_class(config: peft.PeftConfig, model: Optional[nn.Module] = None) -> type[PeftModel]:
    """The class that wraps `model` for `config` (by its task_type, as PEFT picks its own). ValueError for a
    CAUSAL_LM / SEQ_2_SEQ_LM config on a model that cannot generate (PEFT would fail with an AttributeError)."""
    task_type = getattr(config, "task_type", None)
    task = getattr(task_type, "value", task_type)
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and model is not None and not hasattr(model, "prepare_inputs_for_generation"):
        raise ValueError(f"the adapter config's task_type is {task}, but the model ({type(model).__name__}) does not "
                         f"generate: give a config whose task_type fits the model (e.g. SEQ_CLS for a classifier), "
                         f"or task_type=None")
    return _TASK_CLASSES.get(task, PeftModel)


def has_peft_tuner(config: AdapterConfig, model: Optional[nn.Module] = None) -> bool:
    """Whether structlora's PEFT tuner builds `config`'s adapter on `model` as asked: every method but BitFit (which
    injects no layer), and but LoRETTA_adp's tensorized classifier on a DeBERTa classifier, whose pooler the authors
    tensorize and train with the head (`structlora.model_injection`), which the tuner does not do yet (it would train
    1,848 fewer parameters on DeBERTa-base). Those stay on structlora's earlier model class for now."""
    if isinstance(config, BitFitConfig):
        return False
    if (isinstance(config, LorettaAdpConfig) and config.tensorize_classifier and config.task_type == TaskType.SEQ_CLS
            and model is not None):
        model_type = config.base_model_type or getattr(getattr(model, "config", None), "model_type", "") or ""
        return not (model_type.startswith("deberta") and hasattr(model, "pooler"))
    return True


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None) -> PeftModel:
    """Inject the adapter described by `config` into `model` (whose own weights are frozen).

    Args:
        model: a transformers model (or any nn.Module with linear / Conv1D / embedding layers).
        config: a structlora config (LoraConfig, MTLoraConfig, LorettaRepConfig, LorettaAdpConfig, DenseAdapterConfig).
        adapter_name: the adapter's name.
        autocast_adapter_dtype, revision: as peft.get_peft_model's.
    Returns:
        structlora's PeftModel (a peft.PeftModel) for the config's task type; only the adapter (and, as configured,
        heads, norms, biases) is trainable.
    Raises:
        TypeError: `config` is not a structlora config. ValueError: the targets match no adaptable module, or a
            field does not fit the model; the model is left exactly as it was.
    """
    if not has_peft_tuner(config, model):  # structlora's earlier model class trains it (see has_peft_tuner)
        from .model import PeftModel as EarlierPeftModel

        return EarlierPeftModel(model, config, adapter_name)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"structlora.get_peft_model takes a structlora config (LoraConfig, MTLoraConfig, "
                        f"LorettaRepConfig, LorettaAdpConfig, DenseAdapterConfig), got {type(config).__module__}."
                        f"{type(config).__qualname__}; "
                        f"PEFT's own configs go to peft.get_peft_model")
    validate_adapter_name(adapter_name)
    refuse_adapted_model(model, "use model.add_adapter(name, config) to add another")
    # As peft.get_peft_model: the saved config names the base model (AutoPeftModel reads it).
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or config.base_model_name_or_path
    if revision is not None:
        config.revision = revision
    return model_class(config, model)(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


# -- folders of structlora's earlier model class ------------------------------------------------------------------
def _move_tree(staging: str, destination: str) -> None:
    """Rename every file under `staging` to the same place under `destination` (weights first, per folder)."""
    for root, _, files in os.walk(staging):
        target = os.path.join(destination, os.path.relpath(root, staging))
        os.makedirs(target, exist_ok=True)
        for name in sorted(files, key=lambda n: (n != "adapter_model.safetensors", n != CONFIG_NAME, n)):
            atomic._move(os.path.join(root, name), os.path.join(target, name))  # a test makes it fail


__all__ = ["PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM",
           "PeftModelForTokenClassification", "get_peft_model", "model_class"]
