"""Adapter layers. Each wraps the base module it adapts (kept intact as `base_layer`) and holds one
adapter per name; merge/unmerge sit beside forward, as in loralib.

- `LowRankLayer`: LoRA / MTLoRA / LoRETTA_rep on nn.Linear, transformers Conv1D, nn.Embedding, and fused
  projections (per-slice `enable_lora`).
- (`BottleneckLayer`, LoRETTA_adp's bottleneck adapters, is in `structlora.bottleneck_layers`.)
- `TrainableCopy`: a per-adapter trainable copy of a base module (norms, classification heads).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig, LorettaRepConfig
from .engine import _scaled_to, add_lowrank_embedding_update, add_lowrank_update, dense_lowrank
from .inference import CachedFactorsMixin, FactorCache
from .norms import LeanRMSNorm, lean_norm_copy, llama_rms_norm
from .parameterizations import LowRankParameterization, make_parameterization


class AdapterLayerMixin:
    """State shared by every adapter-holding module: which adapter is active, and whether disabled."""

    active_adapter: str = "default"
    adapters_disabled: bool = False

    def set_active(self, name: str) -> None:
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name` and what is kept per adapter (placements, compute dtypes); the caller makes another
        adapter active (a merged adapter is refused before this, by the adapter state)."""
        if name in getattr(self, "merged_adapters", ()):
            raise ValueError(f"adapter {name!r} is merged into this layer: unmerge it first")
        del self._modules["adapters"][name]
        for per_adapter in ("placements", "compute_dtypes"):
            getattr(self, per_adapter, {}).pop(name, None)

    def _active(self) -> str | None:
        # Through the module dicts: nn.Module.__getattr__ and ModuleDict's methods are Python calls, and this runs
        # per wrapped module and decoded token.
        name = self.active_adapter
        if self.adapters_disabled or name not in self._modules["adapters"]._modules:
            return None
        return name


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding' or None when the module cannot carry a low-rank adapter."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module, whatever its storage layout."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"{type(module).__name__} is not an adaptable layer (nn.Linear, Conv1D or nn.Embedding)")


class LowRankAdapter(CachedFactorsMixin, nn.Module):
    """One named low-rank adapter: its parameterization, scaling and dropout."""

    def __init__(self, parameterization: LowRankParameterization, scaling: float, dropout: float) -> None:
        super().__init__()
        self._factor_cache = FactorCache()
        self.parameterization = parameterization
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def effective_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        self._factor_cache.used_with_grad()
        a_eff, b_eff = self.parameterization.effective_factors(self.scaling)
        return a_eff.to(dtype), b_eff.to(dtype)

    def inference_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(T·A)ᵀ (in x R), Bᵀ (R x out) in `dtype` and the scaling still to apply, for s'·(x @ a_t @ b_t)
        without autograd.

        Plain LoRA whose parameters are already in `dtype` computes nothing: its parameters are read as they are
        (so every write to them is seen) and the scaling is returned. Otherwise the factors are computed, with
        the scaling folded into Bᵀ, and cached (`structlora.inference`) until a parameter, the dtype or the
        scaling changes.
        """
        stored = self._modules["parameterization"].stored_factors()
        if stored is not None and stored[0].dtype == dtype and stored[1].dtype == dtype:
            return stored[0].t(), stored[1].t(), self.scaling
        a_t, b_t = self._factor_cache.get(self, (dtype, self.scaling), lambda: self._transposed_factors(dtype))
        return a_t, b_t, 1.0

    def _transposed_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a_eff, b = self.parameterization.unscaled_factors()
        return a_eff.t().to(dtype), _scaled_to(b, self.scaling, dtype).t()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·T·A in (out x in) layout."""
        self._factor_cache.used_with_grad()
        a_eff, b_eff = self.parameterization.effective_factors(self.scaling)
        return b_eff @ a_eff


class LowRankLayer(nn.Module, AdapterLayerMixin):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = layer_kind(base_layer)
        if self.kind is None:
            raise TypeError(f"cannot put a low-rank adapter on {type(base_layer).__name__}")
        self.in_features, self.out_features = base_shape(base_layer)
        self.adapters = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        # Frozen copies of the merged adapters as they were merged (a plain dict: not parameters of the model).
        self._merged_as: dict[str, LowRankAdapter] = {}

    # -- construction ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, enabled_slices: list[bool] | None) -> None:
        # An embedding is a linear map from one-hot(num_embeddings) to embedding_dim, so it takes the
        # same (in, out) factors; only the tensor-train method is limited to dense projections.
        if self.kind == "embedding" and isinstance(config, LorettaRepConfig):
            raise ValueError("LoRETTA_rep does not support nn.Embedding targets (LoRA and MTLoRA do)")
        parameterization = make_parameterization(self.in_features, self.out_features, config,
                                                 enabled_slices or [True], self.base_layer)
        adapter = LowRankAdapter(parameterization, config.scaling, float(config.lora_dropout))
        self.adapters[name] = adapter.to(device=self.base_layer.weight.device)

    # -- forward --------------------------------------------------------------------------------------
    def _fast_path_weight(self, adapter: LowRankAdapter) -> torch.Tensor | None:
        """The base weight in (out x in) layout when the fused path applies: a plain nn.Linear or Conv1D
        (not a subclass such as a quantized layer, whose forward we must call) and no dropout copy."""
        return self._plain_weight() if isinstance(adapter.dropout, nn.Identity) else None

    def _plain_weight(self) -> torch.Tensor | None:
        """The base weight in (out x in) layout when the base is a plain nn.Linear or Conv1D, else None."""
        weight = plain_stored_weight(self.base_layer)
        return weight if weight is None or type(self.base_layer) is nn.Linear else weight.t()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._active()
        if name is None or name in self.merged_adapters:
            return self._modules["base_layer"](x, *args, **kwargs)
        adapter = self._modules["adapters"]._modules[name]
        if not torch.is_grad_enabled():
            return self._forward_without_grad(adapter, x, args, kwargs)
        weight = None if args or kwargs else self._fast_path_weight(adapter)
        if weight is not None:
            adapter._factor_cache.used_with_grad()
            a_eff, b = adapter.parameterization.unscaled_factors()
            return dense_lowrank(x, weight, self.base_layer.bias, a_eff, b, adapter.scaling)
        result = self.base_layer(x, *args, **kwargs)
        a_eff, b_eff = adapter.effective_factors(result.dtype)
        if self.kind == "embedding":
            base = self.base_layer
            return add_lowrank_embedding_update(result, x, a_eff, b_eff, padding_idx=base.padding_idx,
                                                max_norm=base.max_norm, norm_type=base.norm_type,
                                                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        return add_lowrank_update(result, adapter.dropout(x).to(result.dtype), a_eff, b_eff)

    def _forward_without_grad(self, adapter: LowRankAdapter, x: torch.Tensor, args: tuple, kwargs: dict
                              ) -> torch.Tensor:
        """The same sum as `forward` with no autograd node: plain matmuls on the cached factors, accumulated in
        place into the base output where we made that output ourselves. This runs per adapted layer and decoded
        token, so its Python is kept to a few dictionary reads."""
        base = self._modules["base_layer"]
        dropout = adapter._modules["dropout"]
        dropout_off = not dropout.training or type(dropout) is nn.Identity
        stored = plain_stored_weight(base) if dropout_off and not (args or kwargs) else None
        if stored is not None:
            weight_t = stored.t() if type(base) is nn.Linear else stored  # (in x out): x @ it
            x2d = x.reshape(-1, x.shape[-1])
            bias = base._parameters.get("bias")
            out = x2d @ weight_t if bias is None else torch.addmm(bias, x2d, weight_t)
            a_t, b_t, scaling = adapter.inference_factors(out.dtype)  # out's dtype: autocast's where it is on
            out.addmm_(x2d @ a_t, b_t, alpha=scaling)
            return out.view(*x.shape[:-1], out.shape[-1])
        result = base(x, *args, **kwargs)
        a_t, b_t, scaling = adapter.inference_factors(result.dtype)
        if self.kind == "embedding":
            hidden = F.embedding(x, a_t, padding_idx=base.padding_idx, max_norm=base.max_norm,
                                 norm_type=base.norm_type).reshape(-1, a_t.shape[1])
        else:
            hidden = dropout(x).to(result.dtype).reshape(-1, a_t.shape[0]) @ a_t
        return torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b_t, alpha=scaling).view(result.shape)

    # -- merging --------------------------------------------------------------------------------------
    def get_delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW of the named (default: active) adapter in nn.Linear layout (out x in), scaling included.

        For an embedding, "in" is the vocabulary: ΔW is (embedding_dim x num_embeddings).
        """
        return self.adapters[name or self.active_adapter].delta_weight()

    def get_factors(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Effective A (R x in), T (R x R), B (out x R), the scaling, and the raw parameters (and saved buffers).

        ΔW = scaling · B · T · A; for a PiSSA start (init "pissa") ΔW = scaling · (B·T·A − B_initial·A_initial).
        """
        adapter = self.adapters[name or self.active_adapter]
        a, t, b = adapter.parameterization.factors()
        if t is None:
            t = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        factors = {"A": a, "T": t, "B": b, "scaling": torch.tensor(adapter.scaling)}
        for raw_name, tensor in adapter.parameterization.raw_parameters().items():
            factors[raw_name.replace("lora_", "")] = tensor
        return factors

    def _storage_delta(self, adapter: LowRankAdapter) -> torch.Tensor:
        delta = adapter.delta_weight()
        return delta if self.kind == "linear" else delta.t()  # Conv1D and Embedding store (in, out)

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """The base weight plus the adapter's ΔW, in the base weight's dtype and layout. ValueError (and nothing
        written) when the base weight is not a float tensor or ΔW or the sum is not finite in that dtype."""
        return self._checked_sum(self.adapters[name], name)

    def _checked_sum(self, adapter: LowRankAdapter, name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise ValueError(f"the base weight is {weight.dtype} (quantized?): ΔW cannot be added to it; keep the "
                             f"adapter unmerged")
        delta = self._storage_delta(adapter).to(device=weight.device, dtype=weight.dtype)
        if not torch.isfinite(delta).all():
            raise ValueError(f"ΔW of adapter {name!r} is not finite in {weight.dtype} (NaN/inf in the adapter, or "
                             f"beyond the dtype's range)")
        merged = weight + delta
        if not torch.isfinite(merged).all():
            where = "the base weight itself" if not torch.isfinite(weight).all() else "base weight + ΔW"
            raise ValueError(f"{where} is not finite in {weight.dtype} (overflow)")
        return merged

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add ΔW to the base weight; checked first (see merged_weight), so a refusal writes nothing.

        A frozen copy of the adapter as merged is kept (its small parameters only), and `unmerge` subtracts the ΔW
        of that copy: whatever is written to the adapter while it is merged (`load_state_dict`, an optimizer step,
        `param.data = …`), unmerging gives back the base weight that was merged into."""
        if name in self.merged_adapters or name not in self.adapters:
            return
        self.merge_checked(name, _frozen_copy(self.adapters[name]))

    def merge_checked(self, name: str, merged_as: LowRankAdapter) -> None:
        """Add the ΔW of `merged_as` (a frozen copy of adapter `name`) to the base weight and record it."""
        self.base_layer.weight.data.copy_(self._checked_sum(merged_as, name))
        self._merged_as[name] = merged_as
        self.merged_adapters.append(name)
        self.adapters[name]._factor_cache.clear()  # not read while merged

    @torch.no_grad()
    def unmerge(self, last: int | None = None) -> list[tuple[str, LowRankAdapter]]:
        """Subtract the ΔW of every merged adapter (of the `last` merged ones) as it was merged (see merge).
        Returns the (name, frozen copy) pairs taken out, last merged first: `merge_checked` puts them back."""
        weight, removed = self.base_layer.weight, []
        while self.merged_adapters and (last is None or len(removed) < last):
            name = self.merged_adapters[-1]
            merged_as = self._merged_as.get(name)
            if merged_as is None:  # merged without a copy (set by hand): the adapter's current ΔW
                merged_as = self.adapters[name]
            weight.data -= self._storage_delta(merged_as).to(device=weight.device, dtype=weight.dtype)
            self.merged_adapters.pop()
            self._merged_as.pop(name, None)
            removed.append((name, merged_as))
        return removed

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}"


class TrainableCopy(CachedFactorsMixin, nn.Module, AdapterLayerMixin):
    """A base module (norm, classification head) with one trainable copy per adapter.

    The original stays frozen and is used when adapters are disabled, so `disable_adapter()` gives the
    base model's outputs exactly. A copy of a low-precision module keeps fp32 masters and computes with them
    cast to the module's dtype; without autograd the cast weights are cached like an adapter's factors
    (`structlora.inference`), and a Llama-style norm is computed directly on them.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self._factor_cache = FactorCache()
        self.original = original
        self.adapters = nn.ModuleDict()
        # Copies of a low-precision (fp16/bf16) module train fp32 masters and compute in this dtype: in bf16 an
        # AdamW update of 1e-4 rounds away and the copy would never change.
        self.compute_dtypes: dict[str, torch.dtype] = {}

    def add_copy(self, name: str, module: nn.Module | None = None) -> nn.Module:
        if module is None:  # a lean norm when it computes the same function, else an exact copy
            module = lean_norm_copy(self.original) or copy.deepcopy(self.original)
        low = [p.dtype for p in module.parameters() if p.dtype in (torch.float16, torch.bfloat16)]
        if low:
            self.compute_dtypes[name] = low[0]
            module.float()
        self.adapters[name] = module
        for parameter in self.adapters[name].parameters():
            parameter.requires_grad_(True)
        return self.adapters[name]

    def current(self) -> nn.Module:
        name = self._active()
        return self.original if name is None else self.adapters[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self._active()
        if name is None:
            return self._modules["original"](*args, **kwargs)
        return self.run_copy(name, *args, **kwargs)

    def run_copy(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Adapter `name`'s copy on these inputs, as the model computes it (fp32 masters in the module's dtype)."""
        module = self._modules["adapters"]._modules[name]
        dtype = self.compute_dtypes.get(name)
        if dtype is None:
            return module(*args, **kwargs)
        if torch.is_grad_enabled():
            self._factor_cache.used_with_grad()
            return torch.func.functional_call(module, _cast_parameters(module, dtype), args, kwargs)
        cast = self._factor_cache.get(module, (name, dtype), lambda: _cast_parameters(module, dtype))
        if type(module) is LeanRMSNorm and len(args) == 1 and not kwargs:
            # What LeanRMSNorm computes without autograd, on the cast weight: functional_call costs 3x the norm.
            return llama_rms_norm(args[0], cast["weight"], module.variance_epsilon)
        return torch.func.functional_call(module, cast, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code sometimes reads attributes of the module it calls (e.g. norm.weight, eps).
            return getattr(super().__getattr__("original"), name)


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def plain_stored_weight(base: nn.Module) -> torch.Tensor | None:
    """The weight as stored ((out x in) for nn.Linear, (in x out) for Conv1D) when `base` is exactly one of the
    two with a plain floating-point tensor: a layer whose forward we may compute ourselves. Anything else runs
    its own forward: quantized layers (bitsandbytes subclasses, torchao tensor subclasses), FSDP's and
    parametrize's generated subclasses, user subclasses, and a layer with its own forward hooks."""
    kind = type(base)
    if (kind is not nn.Linear and kind is not Conv1D) or base._forward_pre_hooks or base._forward_hooks:
        return None
    weight = base._parameters.get("weight")
    if type(weight) not in _PLAIN_TENSOR_TYPES or not weight.is_floating_point():
        return None
    return weight


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) for key, value in module.named_parameters()}


def dense_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out x in) weight and bias of an nn.Linear or Conv1D, for exporting."""
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return module.weight, getattr(module, "bias", None)


def _frozen_copy(adapter: nn.Module) -> nn.Module:
    """A detached copy of an adapter's parameters and buffers (small: the factors, not the base weight)."""
    frozen = copy.deepcopy(adapter)
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen


def merge_all(layers: list[LowRankLayer], names: str | Sequence[str]) -> None:
    """Merge adapter `names` (one name or several) into every layer of `layers` or into none: on any exception, an
    interrupt or an out-of-memory error included, the merges done so far are unmerged again, last first (their
    weights are then what a merge/unmerge round trip gives: W + ΔW − ΔW, the same ΔW) and the exception is raised.
    Layers without an adapter of a name, or with it merged already, are left as they are."""
    names = [names] if isinstance(names, str) else list(names)
    done: list[LowRankLayer] = []
    try:
        for layer in layers:
            for name in names:
                if name in layer.adapters and name not in layer.merged_adapters:
                    LowRankLayer.merge(layer, name)  # LowRankLayer's own: PEFT's layers take (safe_merge, names)
                    done.append(layer)
    except BaseException:
        for layer in reversed(done):
            LowRankLayer.unmerge(layer, last=1)
        raise


def unmerge_all(layers: list[LowRankLayer]) -> None:
    """Unmerge every layer of `layers` or none: on any exception the layers unmerged so far get their merged
    adapters back (the same frozen copies) and the exception is raised."""
    done: list[tuple[LowRankLayer, list[tuple[str, LowRankAdapter]]]] = []
    try:
        for layer in layers:
            done.append((layer, LowRankLayer.unmerge(layer)))
    except BaseException:
        for layer, removed in reversed(done):
            for name, merged_as in reversed(removed):
                layer.merge_checked(name, merged_as)
        raise
