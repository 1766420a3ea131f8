"""`PeftModel`: a transformers model with named structlora adapters injected into it."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import types
import warnings
from typing import Any, Callable, Iterator, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_state import AdapterState, AdapterStateError, ModuleSnapshot
from .atomic import copy_all_or_nothing, staged_files
from .bank import bank
from .inference import clear_factor_caches
from .config import (CONFIG_NAME, AdapterConfig, BitFitConfig, LoraConfig, LorettaAdpConfig, LorettaRepConfig,
                     TaskType, portable_model_name)
from .convert import CONFIG_METADATA_KEY, WEIGHTS_NAME, check_saved_structure, read_weights, structure_fields
from .distributed import full_cpu_copies, is_writer, whole_parameters
from .bottleneck_layers import BottleneckLayer
from .layers import (AdapterLayerMixin, LowRankLayer, TrainableCopy, base_shape, layer_kind, merge_all,
                     unmerge_all)
from .mixed import input_rows, routed_adapters
from .quantized import refuse_quantized_merge
from .svd_init import saved_factors_follow
from .targets import (BOTTLENECK_PLACEMENT, CLASSIFIER_HEAD_NAMES, FUSED_PROJECTIONS, TargetWarning,
                      default_targets, enabled_slices, is_norm_module, module_matches, unknown_target_error)
from .tensor_train import TTLinear, classifier_tt_shape, parameter_values

HEAD = "the classification head"  # why a module is trained in full (see PeftModel._trained_copy_names)


def adapter_folder(save_directory: str, adapter_name: str) -> str:
    """Where save_pretrained(save_directory) writes adapter `adapter_name`: "default" at the top, the others in a
    sub-folder named after them (PEFT's layout)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


_INTERNAL_SEGMENTS = ("base_layer", "original", "adapters")


def _is_internal(name: str) -> bool:
    """Names inside our wrappers (their base layer, original module, adapters) are not targets."""
    return any(part in _INTERNAL_SEGMENTS for part in name.split("."))


def _inside_any(name: str, modules: Any) -> bool:
    """Whether module `name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _caller_outside_package() -> int:
    """The `stacklevel` at which a warning raised by our caller points at the first frame outside structlora."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = inspect.currentframe(), 1
    frame = frame.f_back if frame is not None else None  # None on interpreters without frame support
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


class PeftModel(nn.Module):
    """A transformers model with structlora adapters injected; behaves like it (same forward signature,
    generate, config…). Usually built with `get_peft_model` or `PeftModel.from_pretrained`.

    Args:
        model: the base model; its weights are frozen and adapter layers are put in place of the targets.
        config: the first adapter's config (LoraConfig, MTLoraConfig, LorettaRepConfig, LorettaAdpConfig, …).
        adapter_name: the first adapter's name; it becomes the active one.

    Raises:
        TypeError: `config` is not a structlora config (a PEFT config is named as such).
        ValueError: the targets match no adaptable module, or a field does not fit the model; the model is
            left exactly as it was.
        AdapterStateError: `model` already holds structlora adapters.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _refuse_adapted_base(model)
        self._state = AdapterState()
        self._factors_cached_at = self._state.version  # the adapter state the cached factors belong to
        self._state.check_add(adapter_name)
        snapshot = ModuleSnapshot(model)
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self._trained_base_params: dict[str, list[str]] = {}
        self._bind_forward_signature()
        try:
            # Before every forward of the base model (however it is reached: this forward, generate, the
            # Trainer), compute the active adapters' factors together (structlora.bank); kept by id for
            # deepcopy and unload.
            self._bank_hook_id = model.register_forward_pre_hook(self._bank_factors).id
            self.add_adapter(adapter_name, config)
        except BaseException:
            snapshot.restore()  # the caller's model is left exactly as it was
            raise

    @property
    def adapter_state(self) -> AdapterState:
        """The adapter registry and merge/disable state (read it; change it through this model's methods)."""
        return self._state

    @property
    def active_adapter(self) -> str:
        """The name of the adapter the forward uses (and the only one being trained)."""
        return self._state.active

    # -- behaving like the base model --------------------------------------------------------------------
    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapter (same arguments and outputs). `labels` go to the
        base model; `adapter_names=[...]` (one adapter name per row) routes each row to its own adapter."""
        # `labels` is named so that transformers' Trainer finds the label column by inspecting this class.
        if labels is not None:
            kwargs["labels"] = labels
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # one adapter per row (structlora.mixed)
            with routed_adapters(self, adapter_names, input_rows(args, kwargs)):
                return self.base_model(*args, **kwargs)
        return self.base_model(*args, **kwargs)

    def _bind_forward_signature(self) -> None:
        """Give this instance's forward the base model's signature (the Trainer drops dataset columns the
        forward does not name). A per-instance function object keeps deepcopy and DDP working."""
        try:
            base_signature = inspect.signature(self.base_model.forward)
        except (TypeError, ValueError):
            return
        function = types.FunctionType(PeftModel.forward.__code__, PeftModel.forward.__globals__, "forward",
                                      PeftModel.forward.__defaults__, PeftModel.forward.__closure__)
        function.__kwdefaults__ = PeftModel.forward.__kwdefaults__
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        function.__signature__ = base_signature.replace(
            parameters=[self_parameter, *base_signature.parameters.values()])
        self.forward = types.MethodType(function, self)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _NOT_PROVIDED:  # not to the base model's transformers mixin ("No adapter loaded")
                raise AttributeError(f"structlora's PeftModel has no {name}(): {_NOT_PROVIDED[name]}") from None
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the adapter layers in it)."""
        return self.base_model

    def clear_factor_caches(self) -> int:
        """Drop the factors cached for inference (`structlora.inference`); returns how many caches were dropped.

        Needed only after writing adapter weights in a way autograd does not see, `param.data.copy_(...)` or
        writes through `.numpy()` / DLPack: nothing records those, so a later no-grad forward would reuse factors
        of the old weights. Optimizer steps, `load_state_dict`, `copy_` under `torch.no_grad()`, loading,
        switching, merging and `.to()` are all detected without it."""
        return clear_factor_caches(self.base_model)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate` with the active adapter; `adapter_names` (one per row) routes each row
        to its own adapter."""
        if adapter_names is not None:  # one adapter per row (structlora.mixed); beams follow their row
            with routed_adapters(self, adapter_names, input_rows(args, kwargs), expanded=True):
                return self.base_model.generate(*args, **kwargs)
        return self.base_model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs: Any) -> None:
        """Checkpoint the base model's layers (non-reentrant by default, which frozen inputs need).

        Args:
            activation_checkpointing_kwargs: passed to torch.utils.checkpoint (e.g. {"use_reentrant": True}).
            kwargs: passed to the base model's activation_checkpointing_enable (transformers >= 5).
        """
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if options["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
            # Reentrant checkpointing needs an input that requires grad, or frozen embeddings cut the graph.
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """transformers' older name of activation_checkpointing_enable (gradient_checkpointing_kwargs is
        activation_checkpointing_kwargs)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def _bank_factors(self, _module: nn.Module, _args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self._factors_cached_at != self._state.version:
            # Any adapter transition (switch, merge, disable, load): no factor cached before it is reused.
            clear_factor_caches(self.base_model)
            self._factors_cached_at = self._state.version
        if all(type(config) is LoraConfig for config in self.peft_config.values()):
            return  # plain LoRA computes no factor
        if not torch.is_grad_enabled():
            return  # without autograd each adapter reuses its cached factors (structlora.inference)
        bank(member for _, wrapper in self._wrappers() for member in _active_bankables(wrapper))

    # -- adapters ------------------------------------------------------------------------------------------
    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayerMixin):
                yield name, module

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Undo everything the block did to the modules and the adapter registry if it raises."""
        snapshot = ModuleSnapshot(self.base_model)
        state = self._state.snapshot()
        configs, trained = dict(self.peft_config), dict(self._trained_base_params)
        try:
            yield
        except BaseException:
            snapshot.restore()
            self._state.restore(state)
            self.peft_config.clear()
            self.peft_config.update(configs)
            self._trained_base_params.clear()
            self._trained_base_params.update(trained)
            raise

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject a new adapter `adapter_name` described by `config` (made active only if it is the first).

        Raises:
            ValueError: the name exists; or as the constructor (TypeError too).
            AdapterStateError: an adapter is merged, inside disable_adapter(), or after merge_and_unload().
            On any error nothing is changed.
        """
        self._state.check_add(adapter_name)
        if not isinstance(config, AdapterConfig):
            raise TypeError(_foreign_config_message(config))
        model_type = _model_type(self.base_model)
        if config.base_model_type and model_type and config.base_model_type != model_type:
            raise ValueError(
                f"adapter {adapter_name!r} was made for a {config.base_model_type!r} model, but this base model "
                f"is {model_type!r}")
        targets = config.target_modules
        if isinstance(config, BitFitConfig):
            if not any(n.endswith("bias") for n, _ in self.base_model.named_parameters()):
                raise ValueError(f"BitFit trains biases, but this {model_type or 'model'} has no bias parameters")
        else:
            if targets is None:
                targets = default_targets(model_type, config.method, getattr(config, "use_parallel_adapter", False),
                                          getattr(config, "placement", "houlsby"))
        trained_in_full = self._trained_copy_names(config, model_type)
        exclude: tuple[str, ...] = ()
        if not isinstance(config, BitFitConfig):
            exclude = self._trained_in_full_among(targets, trained_in_full)
            self._check_targets(config, targets, model_type, exclude)
        with self._transaction():
            if isinstance(config, BitFitConfig):
                injected = []  # BitFit only trains the base model's biases (and the head)
            elif isinstance(config, LorettaAdpConfig):
                injected = self._inject_bottleneck(adapter_name, config, targets, model_type, exclude)
            else:
                injected = self._inject_low_rank(adapter_name, config, targets, exclude)
            if not injected and not isinstance(config, BitFitConfig):
                names = [n for n, _ in self.base_model.named_modules() if not _is_internal(n)]
                adaptable = [n for n, m in self.base_model.named_modules() if layer_kind(m) and not _is_internal(n)]
                raise unknown_target_error(targets, names, adaptable)
            self._add_trainable_copies(adapter_name, config, trained_in_full)
            self._trained_base_params[adapter_name] = self._select_trained_biases(config, injected)
            self.peft_config[adapter_name] = config
            self._state.add(adapter_name)
            self.set_adapter(self._state.active or adapter_name)
        config.base_model_type = model_type or None
        if config.target_modules is None and not isinstance(config, BitFitConfig):
            # Record what the defaults resolved to, so that the saved config says which modules were adapted:
            # a default list as it is, a default regex as the module names it matched.
            config.target_modules = list(targets) if isinstance(targets, list) else injected
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = portable_model_name(getattr(self.base_model, "name_or_path", None))

    def _check_targets(self, config: AdapterConfig, targets: Union[list[str], str], model_type: str,
                       exclude: tuple[str, ...]) -> None:
        """Refuse, before anything is injected, targets the method cannot adapt and per-layer options
        (enable_lora, fan_in_fan_out) that do not fit the layers they would apply to."""
        bottleneck = isinstance(config, LorettaAdpConfig)
        kinds = ("linear", "conv1d") if bottleneck else ("linear", "conv1d", "embedding")
        candidates = []
        unadaptable = []
        for name, module in self._candidates(targets, exclude):
            inner = module.base_layer if isinstance(module, (LowRankLayer, BottleneckLayer)) else module
            kind = layer_kind(inner)
            if kind in kinds:
                candidates.append((name, kind))
            else:
                unadaptable.append(f"{name} ({type(inner).__name__})")
        if unadaptable:
            raise ValueError(
                f"target_modules {targets!r} matches {len(unadaptable)} module(s) that {config.method} cannot adapt: "
                f"{', '.join(unadaptable[:5])}{' …' if len(unadaptable) > 5 else ''}. It adapts "
                f"{', '.join(kinds)} layers only: narrow target_modules to those")
        if bottleneck or not candidates:
            return
        enable = config.enable_lora
        if isinstance(enable, dict):
            for key in enable:
                if not any(name == key or name.endswith("." + key) for name, _ in candidates):
                    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
                    raise ValueError(f"enable_lora key {key!r} matches none of the target modules "
                                     f"(targets: {', '.join(leaves)}); a key must name a targeted fused projection")
        fused = FUSED_PROJECTIONS.get(model_type)
        for name, kind in candidates:
            slices = enabled_slices(config.enable_lora, name)
            if slices is not None and fused is not None:
                expected = fused.get(name.rsplit(".", 1)[-1], 1)
                out_features = base_shape(self.base_model.get_submodule(name))[1] if kind != "embedding" else None
                divides = out_features is None or out_features % len(slices) == 0
                if len(slices) != expected and divides:  # a count that does not divide is reported by the layer
                    what = f"a fused projection of {expected} slices" if expected > 1 else "not a fused projection"
                    raise ValueError(f"enable_lora gives {len(slices)} slices for {name!r}, which is {what} in a "
                                     f"{model_type} model; give exactly {expected} entr{'ies' if expected > 1 else 'y'}"
                                     f"{'' if expected > 1 else ' or leave enable_lora unset for it'}")
            if config.fan_in_fan_out is not None and config.fan_in_fan_out != (kind == "conv1d"):
                raise ValueError(
                    f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name!r}, a {kind} layer (stored "
                    f"{'in x out' if kind == 'conv1d' else 'out x in'}); structlora detects the layout itself: "
                    f"leave fan_in_fan_out unset")

    def _candidates(self, targets: Union[list[str], str],
                    exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
        """The modules `targets` matches, less those equal to or inside a module of `exclude`."""
        return [(n, m) for n, m in self.base_model.named_modules()
                if n and not _is_internal(n) and module_matches(n, targets) and not _inside_any(n, exclude)]

    def _trained_in_full_among(self, targets: Union[list[str], str],
                               trained_in_full: dict[str, str]) -> tuple[str, ...]:
        """PEFT's rule: a module trained in full (the head, modules_to_save) is not also adapted. Returns the
        modules to leave out of the targets; warns which targets that leaves out, refuses when it leaves none."""
        matched = [n for n, _ in self._candidates(targets)]
        overlap = [n for n in matched if _inside_any(n, trained_in_full)]
        if not overlap:
            return ()
        reasons = " / ".join(sorted({why for owner, why in trained_in_full.items()
                                     if any(_inside_any(n, (owner,)) for n in overlap)}))
        listed = f"{', '.join(overlap[:5])}{' …' if len(overlap) > 5 else ''}"
        if len(overlap) == len(matched):
            raise ValueError(
                f"target_modules {targets!r} matches only modules trained in full ({reasons}): {listed}. A module "
                f"is either adapted or trained in full, not both: target other modules"
                f"{', or leave these out of modules_to_save' if 'modules_to_save' in reasons else ''}")
        warnings.warn(f"target_modules {targets!r} also matches {len(overlap)} module(s) trained in full "
                      f"({reasons}): {listed}. Those are trained in full, not adapted (PEFT's rule)",
                      TargetWarning, stacklevel=_caller_outside_package())
        return tuple(trained_in_full)

    def _inject_low_rank(self, adapter_name: str, config: LoraConfig, targets: Union[list[str], str],
                         exclude: tuple[str, ...]) -> list[str]:
        injected = []
        for name, module in self._candidates(targets, exclude):
            layer = self._wrap(name, module, LowRankLayer)
            if layer is None:
                continue
            try:
                layer.add_adapter(adapter_name, config, enabled_slices(config.enable_lora, name))
            except ValueError as error:  # name the module (e.g. a quantized base refused by an SVD start)
                raise ValueError(f"{name!r}: {error}") from error
            injected.append(name)
        return injected

    def _inject_bottleneck(self, adapter_name: str, config: LorettaAdpConfig, targets: Union[list[str], str],
                           model_type: str, exclude: tuple[str, ...]) -> list[str]:
        placements = BOTTLENECK_PLACEMENT.get(model_type, {})
        injected = []
        for name, module in self._candidates(targets, exclude):
            leaf = name.rsplit(".", 1)[-1]
            if config.use_parallel_adapter:
                placement = "parallel"
            elif leaf in placements:
                placement = placements[leaf]
            else:
                placement = "output"  # the sequential adapter after a projection is the common case
            layer = self._wrap(name, module, BottleneckLayer)
            if layer is None:
                continue
            layer.add_adapter(adapter_name, config, placement)
            injected.append(name)
        return injected

    def _wrap(self, name: str, module: nn.Module, layer_cls: type) -> nn.Module | None:
        """The adapter layer of kind `layer_cls` at `name`, wrapping the module (or the base layer of a
        wrapper of the other kind) if needed. None when the module cannot carry an adapter."""
        if isinstance(module, layer_cls):
            return module
        if isinstance(module, (LowRankLayer, BottleneckLayer)):  # the other kind: nest inside it
            inner = module.base_layer
            if isinstance(inner, layer_cls):
                return inner
            if layer_kind(inner) is None:
                return None
            module.base_layer = layer_cls(inner)
            return module.base_layer
        if layer_kind(module) is None or (layer_cls is BottleneckLayer and layer_kind(module) == "embedding"):
            return None
        layer = layer_cls(module)
        _set_module(self.base_model, name, layer)
        return layer

    def _trained_copy_names(self, config: AdapterConfig, model_type: str) -> dict[str, str]:
        """The modules trained in full, each with why: norms (LoRETTA's train_norms), heads (SEQ_CLS) and
        modules_to_save. Computed before anything is injected (injection keeps module names)."""
        modules = dict(self.base_model.named_modules())
        wanted: list[tuple[str, str]] = []  # (name, why)
        if config.train_norms:
            wanted += [(n, "train_norms") for n, m in modules.items()
                       if not _is_internal(n) and (is_norm_module(m) or
                                                   (isinstance(m, TrainableCopy) and is_norm_module(m.original)))]
        if config.task_type == TaskType.SEQ_CLS:
            heads = [n for n in modules if n in CLASSIFIER_HEAD_NAMES]
            heads = heads or [n for n in modules if not _is_internal(n) and n.rsplit(".", 1)[-1] in CLASSIFIER_HEAD_NAMES]
            wanted += [(n, HEAD) for n in heads]
            if getattr(config, "tensorize_classifier", False) and model_type.startswith("deberta") and "pooler" in modules:
                wanted.append(("pooler", HEAD))
        for name in config.modules_to_save or []:
            matches = [n for n in modules if not _is_internal(n) and module_matches(n, [name])]
            if not matches:
                raise ValueError(f"modules_to_save entry {name!r} matches no module of this model")
            wanted += [(n, "modules_to_save") for n in matches]  # trained as they are: never tensorized
        trained: dict[str, str] = {}
        for name, why in wanted:
            trained.setdefault(name, why)  # a module listed twice keeps its first reason
        return trained

    def _add_trainable_copies(self, adapter_name: str, config: AdapterConfig, trained_in_full: dict[str, str]) -> None:
        """Each module trained in full (see _trained_copy_names) gets a per-adapter copy."""
        tensorize = isinstance(config, (LorettaRepConfig, LorettaAdpConfig)) and config.tensorize_classifier
        for name, why in trained_in_full.items():
            module = self.base_model.get_submodule(name)
            wrapper = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
            if wrapper is not module:
                _set_module(self.base_model, name, wrapper)
            copy_module = wrapper.add_copy(adapter_name)
            if why == HEAD and tensorize and config.task_type == TaskType.SEQ_CLS:
                self._tensorize_dense(copy_module, config.tensor_rank)

    @staticmethod
    def _tensorize_dense(head: nn.Module, tensor_rank: int) -> None:
        """The authors' tensorized classifier: the head's square hidden `dense` becomes a TT layer."""
        dense = getattr(head, "dense", None)
        if isinstance(dense, nn.Linear) and dense.in_features == dense.out_features:
            hidden = dense.in_features
            head.dense = TTLinear(hidden, hidden, classifier_tt_shape(hidden), tensor_rank).to(dense.weight.device)

    def _select_trained_biases(self, config: AdapterConfig, injected: list[str]) -> list[str]:
        if config.bias == "none":
            return []
        # Not the adapters' own biases, nor those of a wrapped head's frozen original (its copy is trained).
        names = [n for n, _ in self.base_model.named_parameters()
                 if n.endswith("bias") and ".adapters." not in n and ".original." not in n]
        if config.bias in ("lora_only", "adapter_only"):
            names = [n for n in names if any(n.startswith(layer + ".base_layer.") for layer in injected)]
        return names

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active (and only trainable) adapter.

        Raises:
            ValueError: no adapter has that name.
            AdapterStateError: another adapter is merged.
        """
        self._state.activate(adapter_name)
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        for _, wrapper in self._wrappers():
            wrapper.set_active(adapter_name)
            if adapter_name in wrapper.adapters:
                for parameter in wrapper.adapters[adapter_name].parameters():
                    parameter.requires_grad_(not self.peft_config[adapter_name].inference_mode)
        trained = set(self._trained_base_params.get(adapter_name, []))
        for name, parameter in self.base_model.named_parameters():
            if name in trained:
                parameter.requires_grad_(not self.peft_config[adapter_name].inference_mode)

    @property
    def active_adapters(self) -> list[str]:
        """[active_adapter] (PEFT's list form)."""
        return [self.active_adapter]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly what the base model computes. Blocks nest.

        Refused for an adapter that trains the base model's own biases (BitFit, bias="all"/"lora_only"):
        those are changed in place, so the base function is no longer there to switch back to."""
        self._refuse_in_place_biases("disable_adapter")
        self._state.enter_disabled()
        self._sync_disabled()
        try:
            yield
        finally:
            self._state.exit_disabled()
            self._sync_disabled()

    def disable_adapters(self) -> None:
        """transformers' and PEFT's (`disable_adapter_layers`) form of disable_adapter() without a block: the model
        computes the base model until enable_adapters(). Refused, as disable_adapter(), while an adapter is merged
        (PEFT would unmerge it: call unmerge_adapter() first) and for an adapter that trains the base model's
        biases in place. Calling it twice is harmless."""
        self._refuse_in_place_biases("disable_adapters")
        self._state.switch_off()
        self._sync_disabled()

    def enable_adapters(self) -> None:
        """Undo disable_adapters() (refused inside a `with disable_adapter():` block, which ends by itself)."""
        self._state.switch_on()
        self._sync_disabled()

    disable_adapter_layers = disable_adapters  # PEFT's tuner names
    enable_adapter_layers = enable_adapters

    def _refuse_in_place_biases(self, what: str) -> None:
        in_place = self._trained_base_params.get(self.active_adapter, [])
        if in_place:
            raise ValueError(
                f"{what} cannot give the base model's outputs for adapter {self.active_adapter!r}: it trains "
                f"{len(in_place)} of the base model's biases in place (e.g. {in_place[0]})")

    def delete_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Delete an adapter as PEFT does: when the active one is deleted, the first remaining adapter becomes
        active, with a warning. Layers that held only the deleted adapters stay wrapped and compute their base
        output.

        Args:
            adapter_name: the adapter's name, or a list of names (as transformers' delete_adapter accepts).
        Raises:
            ValueError: an unknown name, the only adapter (use disable_adapters() or merge_and_unload()), or a
                merged adapter (AdapterStateError: call unmerge_adapter() first). Nothing is deleted then.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        remaining, previous = [name for name in self._state.names if name not in names], self._state.active
        for name in names:
            self._state.check_delete(name)
        if not remaining:
            raise AdapterStateError(f"delete_adapter({names!r}) would delete every adapter; a PeftModel keeps at "
                                    f"least one (use disable_adapters() or merge_and_unload())")
        with self._transaction():
            for name in names:
                for _, wrapper in self._wrappers():
                    if name in wrapper.adapters:
                        wrapper.delete_adapter(name)
                del self.peft_config[name]
                self._trained_base_params.pop(name, None)
                self._state.remove(name)
            if self._state.active is None:
                warnings.warn(f"adapter {previous!r} was active and is deleted; the active adapter is now "
                              f"{remaining[0]!r}", UserWarning,
                              stacklevel=_caller_outside_package())
                self.set_adapter(remaining[0])

    def _sync_disabled(self) -> None:
        for _, wrapper in self._wrappers():
            wrapper.adapters_disabled = self._state.disabled

    # -- merging ------------------------------------------------------------------------------------------
    def check_mergeable(self, what: str, quantized_ok: bool = False) -> None:
        """Raise (changing nothing) if `what` (a merge of the active adapter) would be refused: after
        merge_and_unload, inside disable_adapter(), a bottleneck adapter, or (unless `quantized_ok`) a quantized
        base."""
        self._state.check_merge()
        self._require_mergeable(what, quantized_ok)

    def _require_mergeable(self, what: str, quantized_ok: bool = False) -> None:
        if not quantized_ok:
            refuse_quantized_merge(self._wrappers(), what)
        config = self.peft_config[self.active_adapter]
        if isinstance(config, LorettaAdpConfig):
            kind = "dense" if config.method == "adapter" else "LoRETTA_adp"
            raise ValueError(
                f"{what} is not possible for {kind} adapter {self.active_adapter!r}: a bottleneck adapter "
                f"applies a non-linearity (down → {config.non_linearity} → up) to the activations, so it is not "
                f"a change of the weights and cannot be folded into them")

    def merge_adapter(self) -> None:
        """Fold the active adapter's ΔW into the base weights (forward then skips the adapter path).

        All or nothing: every layer's ΔW and merged weight are checked to be finite in the base weight's dtype
        before any weight is written, and an exception while writing (an interrupt, out of memory) unmerges the
        layers merged so far before it propagates.

        Raises:
            ValueError: a non-finite merged weight (the layer is named; no weight changes), a bottleneck adapter
                (LoRETTA_adp, dense adapters: not a weight change) or a quantized base.
            AdapterStateError: inside disable_adapter(), or after merge_and_unload().
        """
        self._state.check_merge()
        self._require_mergeable("merge_adapter")
        name = self.active_adapter
        layers = [(module_name, wrapper) for module_name, wrapper in self._wrappers()
                  if isinstance(wrapper, LowRankLayer) and name in wrapper.adapters
                  and name not in wrapper.merged_adapters]
        for module_name, layer in layers:
            try:
                layer.merged_weight(name)
            except ValueError as error:
                raise ValueError(f"merge refused at {module_name!r}: {error}; no weight was changed") from error
        merge_all([layer for _, layer in layers], name)  # all or nothing, also when interrupted
        self._state.mark_merged(name)

    def unmerge_adapter(self) -> None:
        """Take merged ΔW back out of the base weights (the adapter path runs again); nothing to do if none is
        merged. Refused after merge_and_unload.

        The ΔW subtracted is the one that was added (each layer keeps a frozen copy of the adapter as merged), so
        writes to the adapter while merged (`load_state_dict`, an optimizer step) do not shift the base weights;
        the written values are kept and used once unmerged. All or nothing, like merge_adapter."""
        self._state.check_usable("unmerge_adapter")
        unmerge_all([wrapper for _, wrapper in self._wrappers() if isinstance(wrapper, LowRankLayer)])
        self._state.mark_unmerged()

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter folded in and every wrapper removed. The PeftModel is then
        spent: saving or changing its adapters is refused (save the adapter first).

        Returns:
            The plain transformers model (trained norms and heads in place), frozen.
        Raises:
            As merge_adapter.
        """
        self.check_mergeable("merge_and_unload")
        wrappers = sorted(self._wrappers(), key=lambda item: -item[0].count("."))
        snapshot = ModuleSnapshot(self.base_model)
        self.merge_adapter()
        try:  # all or nothing: an interrupt while unwrapping puts the wrappers back and unmerges
            for name, wrapper in wrappers:
                if isinstance(wrapper, (LowRankLayer, BottleneckLayer)):
                    _set_module(self.base_model, name, wrapper.base_layer)
                elif isinstance(wrapper, TrainableCopy):
                    _set_module(self.base_model, name, wrapper.current())
            for parameter in self.base_model.parameters():
                parameter.requires_grad_(False)
        except BaseException:
            snapshot.restore()
            self.unmerge_adapter()
            raise
        self.base_model._forward_pre_hooks.pop(self._bank_hook_id, None)
        self._state.mark_unloaded()
        return self.base_model

    # -- parameters ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as PEFT."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            trainable += parameter.numel() if parameter.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts and their ratio (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

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
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **_: Any) -> "PeftModel":
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
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        with saved_factors_follow():  # SVD starts: the saved factors are loaded, not computed again
            return cls.wrap_and_fill(model, config, adapter_name,
                                     lambda peft_model: peft_model.load_adapter_weights(model_id, adapter_name))

    @classmethod
    def wrap_and_fill(cls, model: nn.Module, config: AdapterConfig, adapter_name: str,
                      fill: Callable[["PeftModel"], None]) -> "PeftModel":
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


# PEFT / transformers adapter methods that structlora's PeftModel does not provide, with what to use instead.
_NOT_PROVIDED = {
    "unload": "merge_and_unload() folds the adapter into the base weights; disable_adapters() or "
              "`with model.disable_adapter():` computes the base model",
    "enable_peft_hotswap": "structlora.mixed.hotswap_adapter(model, folder, adapter_name) replaces an adapter's "
                           "weights in place, without recompiling",
    "add_weighted_adapter": "combining adapters is not supported; route rows to adapters with adapter_names=[...]",
    "get_model_status": "model.adapter_state (adapters, active, merged, disabled)",
    "get_layer_status": "model.adapter_state and structlora.model.adapted_layers(model)",
}


def _active_bankables(wrapper: nn.Module) -> Iterator[nn.Module]:
    """The modules whose factors the wrapper's next forward computes (none when disabled or merged)."""
    name = wrapper._active()
    if name is None or name in getattr(wrapper, "merged_adapters", ()):
        return
    for module in wrapper.adapters[name].modules():
        if hasattr(module, "bank_key"):
            yield module


def _foreign_config_message(config: Any) -> str:
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    if type(config).__module__.split(".")[0] == "peft":
        return (f"structlora got a PEFT config ({kind}); use structlora's own classes, e.g. "
                "structlora.LoraConfig(r=8, lora_alpha=16, target_modules=[...]), MTLoraConfig, LorettaRepConfig or "
                "LorettaAdpConfig (same field names as PEFT's), or peft.get_peft_model for PEFT's methods")
    return f"expected a structlora config (structlora.LoraConfig, MTLoraConfig, …), got {kind}"


def _refuse_adapted_base(model: nn.Module, hint: str = "use model.add_adapter(name, config) to add another") -> None:
    """Wrapping a model twice would re-initialise the adapters it already holds: refuse."""
    if isinstance(model, PeftModel):
        raise AdapterStateError(f"model already has adapters (it is a PeftModel): {hint}")
    if any(isinstance(module, AdapterLayerMixin) for module in model.modules()):
        raise AdapterStateError(
            f"model already holds structlora adapter layers (it is the base model of a PeftModel): wrapping it again "
            f"would reset them; {hint} on that PeftModel instead")


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Inject the adapter described by `config` into `model` (whose own weights are frozen).

    Args:
        model: a transformers model (or any nn.Module with linear / Conv1D / embedding layers).
        config: a structlora config (LoraConfig, MTLoraConfig, LorettaRepConfig, LorettaAdpConfig, …).
        adapter_name: the adapter's name.
    Returns:
        The PeftModel; only the adapter (and, as configured, heads, norms, biases) is trainable.
    Raises:
        As PeftModel.
    """
    return PeftModel(model, config, adapter_name)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, Union[LowRankLayer, BottleneckLayer]]]:
    """Yield (name, layer) for every adapter layer of `model` (a PeftModel or its base model), names relative
    to the base model."""
    root = model.base_model if isinstance(model, PeftModel) else model
    for name, module in root.named_modules():
        if isinstance(module, (LowRankLayer, BottleneckLayer)):
            yield name, module
