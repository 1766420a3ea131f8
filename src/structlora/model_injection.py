"""Injecting an adapter into the base model: `AdapterInjection.add_adapter`, PeftModel's half that checks the
targets against the model, wraps the targeted layers (`LowRankLayer`, `BottleneckLayer`), makes the per-adapter
copies of the modules trained in full (heads, norms, modules_to_save) and picks the trained biases.

`structlora.model.PeftModel` combines it with the rest; the helpers below are shared with that module.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable, ContextManager, Union

from torch import nn

from .adapter_state import AdapterState, AdapterStateError
from .bottleneck_layers import BottleneckLayer
from .config import AdapterConfig, BitFitConfig, LoraConfig, LorettaAdpConfig, LorettaRepConfig, TaskType
from .config_checks import portable_model_name
from .layers import AdapterLayerMixin, LowRankLayer, TrainableCopy, layer_kind
from .target_checks import (adaptable_targets, check_low_rank_options, model_type_of, set_module,
                            unmatched_targets_error)
from .targets import (BOTTLENECK_PLACEMENT, CLASSIFIER_HEAD_NAMES, FUSED_PROJECTIONS, TargetWarning,
                      default_targets, enabled_slices, is_norm_module, module_matches)
from .tensor_train import TTLinear, classifier_tt_shape

HEAD = "the classification head"  # why a module is trained in full (see AdapterInjection._trained_copy_names)
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


class AdapterInjection:
    """PeftModel's injection: add_adapter and the checks and wrapping behind it. A mixin: the host
    (`structlora.model.PeftModel`) holds the model and the adapter registry declared below."""

    base_model: nn.Module
    peft_config: dict[str, AdapterConfig]
    _trained_base_params: dict[str, list[str]]  # per adapter: the base model's parameters it trains in place
    _state: AdapterState
    _transaction: Callable[[], ContextManager[None]]  # undoes the block's changes if it raises
    set_adapter: Callable[[str], None]

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
        model_type = model_type_of(self.base_model)
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
                raise unmatched_targets_error(self.base_model, targets, _is_internal)
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
        found = [(name, module.base_layer if isinstance(module, (LowRankLayer, BottleneckLayer)) else module)
                 for name, module in self._candidates(targets, exclude)]
        candidates = adaptable_targets(found, kinds, config, targets)
        if not bottleneck and candidates:
            check_low_rank_options(config, candidates, model_type, FUSED_PROJECTIONS.get(model_type))

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
        set_module(self.base_model, name, layer)
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
                set_module(self.base_model, name, wrapper)
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


def _foreign_config_message(config: Any) -> str:
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    if type(config).__module__.split(".")[0] == "peft":
        return (f"structlora got a PEFT config ({kind}); use structlora's own classes, e.g. "
                "structlora.LoraConfig(r=8, lora_alpha=16, target_modules=[...]), MTLoraConfig, LorettaRepConfig or "
                "LorettaAdpConfig (same field names as PEFT's), or peft.get_peft_model for PEFT's methods")
    return f"expected a structlora config (structlora.LoraConfig, MTLoraConfig, …), got {kind}"


def _refuse_adapted_base(model: nn.Module, hint: str = "use model.add_adapter(name, config) to add another") -> None:
    """Wrapping a model twice would re-initialise the adapters it already holds: refuse."""
    if isinstance(model, AdapterInjection):  # only structlora.model.PeftModel is one
        raise AdapterStateError(f"model already has adapters (it is a PeftModel): {hint}")
    if any(isinstance(module, AdapterLayerMixin) for module in model.modules()):
        raise AdapterStateError(
            f"model already holds structlora adapter layers (it is the base model of a PeftModel): wrapping it again "
            f"would reset them; {hint} on that PeftModel instead")
