"""`StructloraTuner`: structlora's methods as a PEFT tuner (`peft.tuners.tuners_utils.BaseTuner`).

`peft.get_peft_model(model, MTLoraConfig(...))` (and PeftModel.from_pretrained, AutoPeftModel, transformers'
`load_adapter`, TRL's `peft_config=`) build this tuner, which puts the layers of `structlora.peft_layers` in place
of the targets. What it adds to PEFT's BaseTuner:

- targets: structlora's matching and per-architecture defaults (`structlora.targets`), checked in full (layer
  kinds, `enable_lora`, `fan_in_fan_out`) before the model is touched;
- LoRETTA's trained layer-norm copies (`train_norms`) and tensorized classifier (`tensorize_classifier`, SEQ_CLS);
- the factor bank before each forward (`structlora.bank`);
- merge, unmerge and unloading all-or-nothing (all layers checked before the first weight is written, and an
  exception, an interrupt included, undoes what was done); bottleneck adapters and quantized bases refused;
  exact unmerge (each layer subtracts the ΔW it added); `__base__` refused as an adapter name;
- checkpoints checked before PEFT copies them, and hotswap (`structlora.peft_weights.TunerWeights`);
- a failed injection, or a refused load of an adapter that the same `PeftModel.from_pretrained` / `load_adapter`
  call injected, leaves the model as before the call (`structlora.peft_rollback`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .adapter_state import ModuleSnapshot, refuse_base_adapter_name
from .bank import bank
from .config import AdapterConfig, BitFitConfig, LoraConfig, LorettaAdpConfig, LorettaRepConfig, TaskType
from .inference import clear_factor_caches
from .layers import LowRankLayer, merge_all, unmerge_all
from .mixed import input_rows, routed_adapters
from .peft_checks import check_modules_to_save, check_trained_in_full
from .peft_layers import (ADAPTERS, StructloraBottleneckLayer, StructloraLowRankLayer, StructloraTrainedCopy,
                          StructloraTunerLayer)
from .peft_rollback import InjectionRollback
from .peft_weights import TunerWeights, _is_internal, _RoutedTuner
from .quantized import refuse_quantized_merge
from .target_checks import (adaptable_targets, check_low_rank_options, model_type_of, set_module,
                            unmatched_targets_error)
from .targets import (BOTTLENECK_PLACEMENT, CLASSIFIER_HEAD_NAMES, FUSED_PROJECTIONS, LOW_RANK_DEFAULT_TARGETS,
                      default_targets, enabled_slices, is_norm_module, module_matches)
from .tensor_train import TTLinear, classifier_tt_shape

def _inside_any(name: str, owners: Any) -> bool:
    return any(name == owner or name.startswith(owner + ".") or name.endswith("." + owner) or
               ("." + owner + ".") in name for owner in owners)


# PEFT's low_cpu_mem_usage builds adapters on the meta device; structlora's layers place each new adapter on its
# base layer's device, so it is refused before anything is injected.
_NO_LOW_CPU_MEM = ("low_cpu_mem_usage=True is not supported by structlora's methods yet: load the adapter without it "
                   "(adapter weights are small)")


def _creates_on_meta() -> bool:
    """Whether new parameters are being created on the meta device (PEFT's from_pretrained(low_cpu_mem_usage=True)
    builds the tuner inside accelerate's init_empty_weights)."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(1)))
    return probe.probe.device.type == "meta"


def _bank_active_factors(model: nn.Module, _args: Any) -> None:
    """Forward pre-hook: compute the active adapters' factors of all layers together (structlora.bank)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return  # without autograd each adapter reuses its cached factors (structlora.inference)
    configs = getattr(model, "peft_config", {})
    if all(type(config) is LoraConfig for config in configs.values()):
        return  # plain LoRA computes no factor
    members = []
    for module in model.modules():
        if isinstance(module, StructloraTunerLayer):  # low-rank and bottleneck adapters (trained copies: no factor)
            name = module._active()
            if name is not None and name not in module.merged_adapters:
                members += [m for m in module.adapters[name].modules() if hasattr(m, "bank_key")]
    bank(members)


class StructloraTuner(TunerWeights, BaseTuner):
    """The PEFT tuner of every structlora method (LoRA, MTLoRA, LoRETTA_rep, LoRETTA_adp, dense adapters)."""

    prefix: str = ADAPTERS
    tuner_layer_cls = StructloraTunerLayer
    target_module_mapping = LOW_RANK_DEFAULT_TARGETS

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        if low_cpu_mem_usage or _creates_on_meta():
            raise ValueError(_NO_LOW_CPU_MEM)
        refuse_base_adapter_name(adapter_name)  # before BaseTuner's __init__ touches the model
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                         state_dict=state_dict)
        if getattr(self.model, "_structlora_bank_hook", None) is None:
            self.model._structlora_bank_hook = self.model.register_forward_pre_hook(_bank_active_factors)

    # -- targets -------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        if isinstance(peft_config, BitFitConfig) or not isinstance(peft_config, (LoraConfig, LorettaAdpConfig)):
            raise TypeError(f"{type(peft_config).__name__} has no PEFT tuner (BitFit injects no layer, and PEFT's "
                            f"tuners need one): use structlora.get_peft_model(model, config)")
        model_type = model_config.get("model_type", "") or ""
        if peft_config.base_model_type and model_type and peft_config.base_model_type != model_type:
            raise ValueError(f"this adapter was made for a {peft_config.base_model_type!r} model, but the base model "
                             f"is {model_type!r}")
        if peft_config.target_modules is None:
            targets = default_targets(model_type, peft_config.method,
                                      getattr(peft_config, "use_parallel_adapter", False),
                                      getattr(peft_config, "placement", "houlsby"))
            peft_config.target_modules = list(targets) if isinstance(targets, list) else targets
        peft_config.base_model_type = model_type or None
        peft_config._in_peft_model = True  # saved with its StructloraPeftType (see AdapterConfig.save_pretrained)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: AdapterConfig, key: str) -> bool:
        if _is_internal(key) or _inside_any(key, peft_config.modules_to_save or ()):
            return False  # a module trained in full (head, modules_to_save) is not also adapted (PEFT's rule)
        return module_matches(key, peft_config.target_modules)

    def _prepare_model(self, peft_config: AdapterConfig, model: nn.Module) -> None:
        """Check every target before anything is injected (PEFT injects layer by layer)."""
        check_modules_to_save(model, peft_config, _is_internal)
        check_trained_in_full(model, peft_config, _is_internal, _inside_any)
        bottleneck = isinstance(peft_config, LorettaAdpConfig)
        kinds = ("linear", "conv1d") if bottleneck or isinstance(peft_config, LorettaRepConfig) else (
            "linear", "conv1d", "embedding")
        found = [(name, module.base_layer if isinstance(module, StructloraTunerLayer) else module)
                 for name, module in model.named_modules()
                 if name and self._check_target_module_exists(peft_config, name)]
        candidates = adaptable_targets(found, kinds, peft_config, peft_config.target_modules)
        if not candidates:
            raise unmatched_targets_error(model, peft_config.target_modules, _is_internal)
        if not bottleneck:
            # A model type without known fused projections: every target is one projection (one slice).
            model_type = model_type_of(model)
            check_low_rank_options(peft_config, candidates, model_type, FUSED_PROJECTIONS.get(model_type, {}))

    def _create_and_replace(self, peft_config: AdapterConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:
        kind = StructloraBottleneckLayer if isinstance(peft_config, LorettaAdpConfig) else StructloraLowRankLayer
        holder = None
        if isinstance(target, (StructloraBottleneckLayer, StructloraLowRankLayer)) and not isinstance(target, kind):
            holder, target = target, target.base_layer  # a layer of the other kind wraps it: nest inside that one
        layer = target if isinstance(target, kind) else kind(target)
        if kind is StructloraBottleneckLayer:
            layer.add_adapter(adapter_name, peft_config, self._placement(peft_config, current_key))
        else:
            try:
                layer.add_adapter(adapter_name, peft_config, enabled_slices(peft_config.enable_lora, current_key))
            except ValueError as error:  # name the module (e.g. a quantized base refused by an SVD start)
                raise ValueError(f"{current_key!r}: {error}") from error
        if layer is not target:
            if holder is not None:
                holder.base_layer = layer
            else:
                self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, StructloraTrainedCopy):  # unloading: the copy (or original) goes in as it is
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _placement(self, config: LorettaAdpConfig, name: str) -> str:
        if config.use_parallel_adapter:
            return "parallel"
        return BOTTLENECK_PLACEMENT.get(model_type_of(self.model), {}).get(name.rsplit(".", 1)[-1], "output")

    # -- what PEFT does not inject: trained norms and the tensorized head ------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        if low_cpu_mem_usage:
            raise ValueError(_NO_LOW_CPU_MEM)
        refuse_base_adapter_name(adapter_name)  # add_adapter / load_adapter: refused before anything is injected
        rollback = InjectionRollback(model, self, adapter_name)
        try:
            self._inject(model, adapter_name, autocast_adapter_dtype, state_dict)
        except BaseException:  # a layer that cannot take the adapter (e.g. an SVD start), an interrupt: undone
            rollback.restore()
            raise
        if rollback.load_call is not None:  # undone if this load call then refuses the weights
            self._load_rollbacks()[adapter_name] = rollback

    def _load_rollbacks(self) -> dict[str, InjectionRollback]:
        """The injections made by PEFT load calls still running, by adapter name (see structlora.peft_rollback)."""
        rollbacks = self.__dict__.setdefault("_structlora_load_rollbacks", {})
        for name in [n for n, r in rollbacks.items() if not r.belongs_to_failing_load()]:
            del rollbacks[name]
        return rollbacks

    def _inject(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool,
                state_dict: Optional[dict[str, torch.Tensor]]) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=False, state_dict=state_dict)
        config = self.peft_config[adapter_name]
        trainable = not config.inference_mode and adapter_name in self.active_adapters
        if config.train_norms:
            self._add_norm_copies(model, adapter_name, config, trainable)
        if (isinstance(config, (LorettaRepConfig, LorettaAdpConfig)) and config.tensorize_classifier
                and config.task_type == TaskType.SEQ_CLS):
            self._tensorize_heads(model, adapter_name, config.tensor_rank, trainable)

    def _add_norm_copies(self, model: nn.Module, adapter_name: str, config: AdapterConfig, trainable: bool) -> None:
        owners = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        names = [n for n, m in model.named_modules()
                 if n and not _is_internal(n) and not _inside_any(n, owners)
                 and (isinstance(m, StructloraTrainedCopy) or (is_norm_module(m)
                                                               and not isinstance(m, StructloraTunerLayer)))]
        for name in names:
            module = model.get_submodule(name)
            layer = module if isinstance(module, StructloraTrainedCopy) else StructloraTrainedCopy(module)
            if layer is not module:
                set_module(model, name, layer)
            layer.add_copy(adapter_name)
            layer.set_adapter(self.active_adapters, inference_mode=not trainable)
            for parameter in layer.adapters[adapter_name].parameters():
                parameter.requires_grad_(trainable)

    @staticmethod
    def _tensorize_heads(model: nn.Module, adapter_name: str, tensor_rank: int, trainable: bool) -> None:
        """The authors' tensorized classifier: the head copy's square hidden `dense` becomes a TT layer."""
        for name, module in model.named_modules():
            if not isinstance(module, ModulesToSaveWrapper) or name.rsplit(".", 1)[-1] not in CLASSIFIER_HEAD_NAMES:
                continue
            head = module.modules_to_save[adapter_name]
            dense = getattr(head, "dense", None)
            if isinstance(dense, nn.Linear) and dense.in_features == dense.out_features:
                hidden = dense.in_features
                head.dense = TTLinear(hidden, hidden, classifier_tt_shape(hidden), tensor_rank).to(dense.weight.device)
                head.dense.requires_grad_(trainable)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"structlora's layers run one adapter at a time; got {names}")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        clear_factor_caches(self.model)

    # -- every adapter transition drops the factors cached for inference (an inactive or merged adapter's are not
    # kept; the next no-grad forward caches what it uses) ------------------------------------------------------
    def _enable_adapter_layers(self, enabled: bool = True) -> None:  # disable_adapter_layers / enable_adapter_layers
        super()._enable_adapter_layers(enabled=enabled)
        clear_factor_caches(self.model)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's delete_adapter, with one new active adapter for the whole model. PEFT's layers each pick the first
        adapter they hold: with adapters on different modules (several structlora methods in one model) layers would
        activate different adapters (and make them trainable). Every layer follows the model's pick: the first
        adapter left, as PEFT's rule says."""
        was_active = adapter_name in self.active_adapters
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().delete_adapter(adapter_name)
        others = [w for w in caught if "was active which is now deleted" not in str(w.message)]
        for warning in others:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        left = list(self.peft_config)
        if was_active and left:
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{left[0]}.")  # PEFT's words
            self.set_adapter(left[0], inference_mode=self.peft_config[left[0]].inference_mode)
        clear_factor_caches(self.model)

    # -- trainable parameters: the adapters, and the biases the config names -------------------------------
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if ("." + ADAPTERS + ".") not in ("." + name) and ".modules_to_save." not in name:
                parameter.requires_grad = False
        for active in self.active_adapters:
            bias = getattr(self.peft_config[active], "bias", "none")
            if bias == "all":
                for name, parameter in model.named_parameters():
                    if name.endswith("bias") and "." + ADAPTERS + "." not in name and "original_module" not in name:
                        parameter.requires_grad = True
            elif bias in ("lora_only", "adapter_only"):
                for module in model.modules():
                    if isinstance(module, (StructloraLowRankLayer, StructloraBottleneckLayer)):
                        if getattr(module.base_layer, "bias", None) is not None:
                            module.base_layer.bias.requires_grad = True

    # -- several adapters in one batch ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's forward / generate hook: `adapter_names=[...]` (one per row, "__base__" for none) routes each
        row to its adapter (structlora.mixed), as PEFT's LoRA does: through the adapter layers, the trained norm
        copies and each adapter's copy of a module to save or classification head (LoRETTA's tensorized one too).

        The heads are routed by structlora.mixed's hooks, not by PEFT's ModulesToSaveWrapper mixed batch (which PEFT's
        LoRA uses): that one refuses any head that is not a Linear, Embedding or Conv (a RoBERTa or DeBERTa
        classification head, LoRETTA's tensorized head) and fails on a row whose adapter has no copy of the module."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        merged = sorted({n for _, layer in self._low_rank_layers() for n in layer.merged_adapters})
        if merged:
            raise ValueError(f"adapter_names: adapter(s) {merged} are merged into the base weights, which every row "
                             f"would then see; unmerge_adapter() first")
        # PEFT passes generate() its inputs, but forward() only the extra keyword arguments. Inputs seen here: one
        # name per input row is checked now, and the larger batches that follow can only be generate()'s beams and
        # returned sequences. No inputs (forward): every batch must have exactly one row per name.
        rows = input_rows(args, kwargs)
        with routed_adapters(_RoutedTuner(self), adapter_names, rows, expanded=rows is not None):
            yield

    # -- merging ---------------------------------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name in self.active_adapters:
            config = self.peft_config[name]
            if isinstance(config, LorettaAdpConfig):
                kind = "dense adapter" if config.method == "adapter" else "LoRETTA_adp adapter"
                raise ValueError(f"adapter {name!r} is a bottleneck adapter ({kind}): it applies "
                                 f"{config.non_linearity} to the activations, so it is not a change of the weights and "
                                 f"cannot be merged into them")
        refuse_quantized_merge(self._low_rank_layers(), "merge")

    def _low_rank_layers(self) -> list[tuple[str, StructloraLowRankLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, StructloraLowRankLayer)]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold ΔW into the base weights. All or nothing: every layer's merged weight is checked to be finite first
        (a refusal names the layer and changes no weight), and an exception while writing (an interrupt, out of
        memory) unmerges the layers merged so far before it propagates (structlora.layers.merge_all)."""
        self._check_merge_allowed()
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        layers = self._low_rank_layers()
        if all(name in layer.merged_adapters for _, layer in layers for name in names if name in layer.adapters):
            warnings.warn("All adapters are already merged, nothing to do.")  # PEFT's words for the same case
            return
        for module_name, layer in layers:
            for name in names:
                if name in layer.adapters and name not in layer.merged_adapters:
                    try:
                        layer.merged_weight(name)
                    except ValueError as error:
                        raise ValueError(f"merge refused at {module_name!r}: {error}; no weight was changed") from error
        merge_all([layer for _, layer in layers], names)
        clear_factor_caches(self.model)

    def unmerge_adapter(self) -> None:
        """Take every merged ΔW back out, as it was merged (each layer keeps a frozen copy of the adapter as merged,
        so writes to a merged adapter do not shift the base). All or nothing (structlora.layers.unmerge_all)."""
        unmerge_all([layer for _, layer in self._low_rank_layers()])
        clear_factor_caches(self.model)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        """PEFT's unloading, all or nothing: on any exception while merging or unwrapping (an interrupt included)
        the wrappers are put back, what this call merged is unmerged and the exception is raised."""
        layers = [layer for _, layer in self._low_rank_layers()]
        merged_before = {id(layer): len(layer.merged_adapters) for layer in layers}
        snapshot = ModuleSnapshot(self.model)
        had_config = "peft_config" in self.model.__dict__
        if merge and not all(n in layer.merged_adapters for layer in layers
                             for n in (adapter_names or self.active_adapters) if n in layer.adapters):
            self.merge_adapter(adapter_names)  # all layers checked first; the unloading below then only unwraps
        try:
            model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                         adapter_names=adapter_names)
            while any(isinstance(m, StructloraTunerLayer) for m in model.modules()):
                # a layer nested inside one of the other kind (two methods on one module) surfaces once the outer
                # one is unwrapped: PEFT's pass listed the module names before it
                model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar,
                                                             safe_merge=safe_merge, adapter_names=adapter_names)
        except BaseException:
            snapshot.restore()
            if had_config:
                self.model.peft_config = self.peft_config
            for layer in reversed(layers):
                LowRankLayer.unmerge(layer, last=len(layer.merged_adapters) - merged_before[id(layer)])
            raise
        hook = getattr(model, "_structlora_bank_hook", None)
        if hook is not None:
            hook.remove()
            del model._structlora_bank_hook
        return model
