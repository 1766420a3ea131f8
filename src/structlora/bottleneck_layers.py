"""LoRETTA_adp's bottleneck adapters (down projection, activation, up projection; dense or tensor-train) and the
layer that holds them before ("input"), after ("output") or beside ("parallel") a projection. The shared adapter
state (`AdapterLayerMixin`) and the low-rank layers are in `structlora.layers`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import LorettaAdpConfig
from .inference import CachedFactorsMixin, FactorCache, scaled_dense
from .layers import AdapterLayerMixin, base_shape, plain_stored_weight
from .tensor_train import TTLinear, tt_shape_for


# Activations applied in place on the bottleneck's fresh buffer when no gradient is recorded (the same function
# as ACT2FN's module of that name); others call the module.
_IN_PLACE_ACTIVATIONS = {
    "relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_,
    "silu": lambda x: F.silu(x, inplace=True), "swish": lambda x: F.silu(x, inplace=True),
    "identity": lambda x: x, "linear": lambda x: x,
}


def _affine(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)


class BottleneckAdapter(CachedFactorsMixin, nn.Module):
    """down → non-linearity → up, scaled; tensor-train projections when `tensorized`.

    Without autograd it is two GEMMs with their biases on dense projections cached across forwards
    (`structlora.inference`), the scaling folded into the up projection and the activation applied in place.
    """

    def __init__(self, in_dim: int, out_dim: int, config: LorettaAdpConfig) -> None:
        super().__init__()
        self._factor_cache = FactorCache()
        size = config.bottleneck_size
        zero_up = config.init == "default" and config.init_weights is not False  # False: PEFT's non-zero start
        if config.tensorized:
            self.adapter_down = TTLinear(in_dim, size, tt_shape_for(in_dim, size), config.tensor_rank)
            self.adapter_up = TTLinear(size, out_dim, tt_shape_for(out_dim, size), config.tensor_rank)
            if zero_up:
                self.adapter_up.weight_tt.zero_last_core()
                nn.init.zeros_(self.adapter_up.bias)
        else:
            self.adapter_down = nn.Linear(in_dim, size)
            self.adapter_up = nn.Linear(size, out_dim)
            nn.init.normal_(self.adapter_down.weight, std=0.02)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.bias)
            if zero_up:
                nn.init.zeros_(self.adapter_up.weight)
            elif config.init == "reference":
                nn.init.normal_(self.adapter_up.weight, std=0.02)
            # else (init_weights=False): nn.Linear's own Kaiming-uniform draw, as PEFT's non-zero starts
        self.act = ACT2FN[config.non_linearity] if config.non_linearity not in ("identity", "linear") else nn.Identity()
        self._act_in_place = _IN_PLACE_ACTIVATIONS.get(config.non_linearity, self.act)
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        if config.scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones(1))
        else:
            self.adapter_scaling = float(config.scaling)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not self.drops():
            return self._forward_without_grad(hidden)
        self._factor_cache.used_with_grad()
        out = self.adapter_up(self.act(self.adapter_down(self.dropout(hidden))))
        scaling = self.adapter_scaling
        if isinstance(scaling, torch.Tensor):
            return out * scaling.to(out.dtype)
        return out if scaling == 1.0 else out * scaling  # skip a full-size multiply in the common case


    def drops(self) -> bool:
        """Whether dropout is on (training mode with a non-zero rate)."""
        dropout = self._modules["dropout"]
        return dropout.training and type(dropout) is not nn.Identity

    def _forward_without_grad(self, hidden: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's output, or `add_to` + it accumulated in place into `add_to` (a tensor the caller owns)."""
        dtype = hidden.dtype
        w_down, b_down, w_up, b_up = self._factor_cache.get(self, (dtype,), lambda: self._dense_projections(dtype))
        inner = self._act_in_place(_affine(hidden.reshape(-1, w_down.shape[0]), w_down, b_down))
        if add_to is None:
            return _affine(inner, w_up, b_up).view(*hidden.shape[:-1], w_up.shape[1])
        accumulator = add_to.view(-1, w_up.shape[1])
        if b_up is not None:
            accumulator.add_(b_up)
        accumulator.addmm_(inner, w_up)
        return add_to

    def _dense_projections(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """W_down, b_down, s·W_up, s·b_up in x @ W layout and `dtype`."""
        return (*_dense_projection(self.adapter_down, dtype, 1.0),
                *_dense_projection(self.adapter_up, dtype, self.adapter_scaling))


def _dense_projection(projection: nn.Module, dtype: torch.dtype, scaling: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(projection, TTLinear):
        return projection._dense(dtype, scaling)
    return scaled_dense(projection.weight.t(), projection.bias, scaling, dtype)


PLACEMENTS = ("input", "output", "parallel")


class BottleneckLayer(nn.Module, AdapterLayerMixin):
    """A projection with a bottleneck adapter: "input" x+ad(x) → linear (the authors' "mh" adapter),
    "output" y=linear(x), y+ad(y), "parallel" linear(x)+ad(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_shape(base_layer)
        self.adapters = nn.ModuleDict()
        self.placements: dict[str, str] = {}

    def add_adapter(self, name: str, config: LorettaAdpConfig, placement: str) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        dims = {"input": (self.in_features, self.in_features),
                "output": (self.out_features, self.out_features),
                "parallel": (self.in_features, self.out_features)}[placement]
        self.adapters[name] = BottleneckAdapter(*dims, config).to(device=self.base_layer.weight.device)
        self.placements[name] = placement

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._active()
        base = self._modules["base_layer"]
        if name is None:
            return base(x, *args, **kwargs)
        adapter, placement = self._modules["adapters"]._modules[name], self.placements[name]
        # Without autograd the sum is formed in place in a tensor made here (no second buffer, no separate add).
        lean = (not torch.is_grad_enabled() and not adapter.drops()
                and not (adapter._forward_pre_hooks or adapter._forward_hooks))
        if placement == "input":
            adapted = adapter._forward_without_grad(x).add_(x) if lean else x + adapter(x)
            return base(adapted, *args, **kwargs)
        result = base(x, *args, **kwargs)
        source = result if placement == "output" else x
        if lean and plain_stored_weight(base) is not None and result.dtype == source.dtype and result.is_contiguous():
            return adapter._forward_without_grad(source, add_to=result)  # a plain layer's output is fresh
        return result + adapter(source)
