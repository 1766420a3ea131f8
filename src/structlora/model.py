"""`PeftModel`: a transformers model with named structlora adapters injected into it.

This module holds what the model is and does: behaving like the base model (forward, generate, attributes), the
adapter state machine (`structlora.adapter_state`: set, disable, enable, delete, merge, unmerge, unload) and the
parameter counts. Injection is `structlora.model_injection`'s (`AdapterInjection`), saving and loading
`structlora.model_io`'s (`AdapterIO`); `PeftModel` combines the three.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from typing import Any, Iterator, Union

import torch
from torch import nn

from .adapter_state import AdapterState, AdapterStateError, ModuleSnapshot
from .bank import bank
from .bottleneck_layers import BottleneckLayer
from .config import AdapterConfig, LoraConfig, LorettaAdpConfig
from .convert import CONFIG_METADATA_KEY, WEIGHTS_NAME  # noqa: F401 - importers read them here too
from .inference import clear_factor_caches
from .layers import AdapterLayerMixin, LowRankLayer, TrainableCopy, merge_all, unmerge_all
from .mixed import input_rows, routed_adapters
from .model_injection import AdapterInjection, _caller_outside_package, _refuse_adapted_base
from .model_io import AdapterIO, adapter_folder  # noqa: F401 - adapter_folder: importers read it here too
from .quantized import refuse_quantized_merge
from .target_checks import set_module


class PeftModel(AdapterIO, AdapterInjection, nn.Module):
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

    # -- adapters (injected by structlora.model_injection, saved and loaded by structlora.model_io) -------
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

    # -- the adapter state machine (structlora.adapter_state) ---------------------------------------------
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
                    set_module(self.base_model, name, wrapper.base_layer)
                elif isinstance(wrapper, TrainableCopy):
                    set_module(self.base_model, name, wrapper.current())
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
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel (structlora's, PEFT's, the earlier one)
    root = get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model
    for name, module in root.named_modules():
        if isinstance(module, (LowRankLayer, BottleneckLayer)):
            yield name, module
