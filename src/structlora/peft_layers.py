"""structlora's adapter layers as PEFT tuner layers (`peft.tuners.tuners_utils.BaseTunerLayer`).

Each class is the layer of `structlora.layers` with PEFT's layer protocol on top: the forward, the factor bank and
the no-grad inference cache are those layers' own (nothing of the math is repeated here); what is added is PEFT's
adapter bookkeeping (`set_adapter`, `enable_adapters`, `delete_adapter`, `merge(safe_merge, adapter_names)`) and
the state that PEFT keeps per layer (`_active_adapter`, `_disable_adapters`).

The adapters live in a ModuleDict named `adapters` (PEFT's "adapter layer name"), so the checkpoint key of a
weight is `<module>.adapters.<path in the adapter>` (the adapter's name removed, see `StructloraTuner`).
"""

from __future__ import annotations

from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .bottleneck_layers import BottleneckLayer
from .inference import FactorCache
from .layers import LowRankLayer, TrainableCopy
from .names import ADAPTERS



class StructloraTunerLayer(BaseTunerLayer):
    """PEFT's per-layer adapter state for a structlora layer. structlora's layers run one adapter at a time (the
    engine's fused path is for one ΔW); activating several at once is refused."""

    adapter_layer_names: tuple[str, ...] = (ADAPTERS,)
    _active_name: Optional[str] = "default"

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"structlora's layers run one adapter at a time; got {names}. Activate one "
                             f"(model.set_adapter(name)), or route rows with structlora.PeftModel's adapter_names")
        super().set_adapter(names, inference_mode=inference_mode)
        self._active_name = names[0] if names else None

    def _active(self) -> str | None:
        # Read per wrapped module and decoded token: plain attribute and dict reads only.
        name = self._active_name
        if self._disable_adapters or name is None or name not in self._modules[ADAPTERS]._modules:
            return None
        return name

    def set_active(self, name: str) -> None:  # structlora.layers' name for it
        self.set_adapter(name)


class StructloraLowRankLayer(StructloraTunerLayer, LowRankLayer):
    """LoRA / MTLoRA / LoRETTA_rep on nn.Linear, Conv1D, nn.Embedding (fused projections per `enable_lora`)."""

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW of the named (default: active) adapters to the base weight. Every merge is checked for finite
        values before it is written (so `safe_merge` is always on)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:  # merged ones are skipped (merge_and_unload merges first, then unwraps)
            LowRankLayer.merge(self, name)

    def unmerge(self) -> None:
        LowRankLayer.unmerge(self)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def get_delta_weight(self, name: str | None = None) -> Any:
        return LowRankLayer.get_delta_weight(self, name or self._active_name)

    def get_factors(self, name: str | None = None) -> dict[str, Any]:
        return LowRankLayer.get_factors(self, name or self._active_name)

    def _get_additive_delta(self, adapter_name: str = "default") -> Any:
        return LowRankLayer.get_delta_weight(self, adapter_name)


class StructloraBottleneckLayer(StructloraTunerLayer, BottleneckLayer):
    """LoRETTA_adp and dense bottleneck adapters before, after or beside a projection. Not mergeable: the adapter
    applies a non-linearity to activations."""

    other_param_names: tuple[str, ...] = ("placements",)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        if not any(name in self.adapters for name in names):
            return None  # this layer holds none of the adapters being merged (another method's adapter is)
        raise ValueError("a bottleneck adapter (LoRETTA_adp, dense adapter) applies a non-linearity to the "
                         "activations: it is not a change of the weights and cannot be merged into them")

    def unmerge(self) -> None:
        return None  # never merged

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class StructloraTrainedCopy(StructloraTunerLayer, TrainableCopy):
    """A module trained in full per adapter (LoRETTA's layer norms): the frozen original is the `base_layer`,
    each adapter's copy sits in `adapters`. Unloading keeps the active copy when merging, the original otherwise."""

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)  # TrainableCopy's own __init__ names the original `original`; PEFT needs base_layer
        self._factor_cache = FactorCache()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.compute_dtypes = {}
        self.merged_adapters = []

    @property
    def original(self) -> nn.Module:
        return self._modules["base_layer"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self._active()
        if name is None:
            return self._modules["base_layer"](*args, **kwargs)
        return self.run_copy(name, *args, **kwargs)

    def current(self) -> nn.Module:
        name = self._active()
        return self.original if name is None else self.adapters[name]

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            # Model code sometimes reads attributes of the module it calls (e.g. norm.weight, eps).
            return getattr(nn.Module.__getattr__(self, "base_layer"), name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        return None  # a copy replaces the module; nothing is added to a weight

    def unmerge(self) -> None:
        return None

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: Optional[list[str]] = None) -> nn.Module:
        """PEFT's unloading hook: the active adapter's copy when merging, else the original module."""
        return self.current() if merge else self.original

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False
