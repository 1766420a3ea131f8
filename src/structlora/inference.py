"""Inference without autograd: factors cached across forwards.

When no gradient is recorded (`torch.no_grad`, `torch.inference_mode`: `generate()`, evaluation) an adapter's
effective factors are the same from one forward to the next: LoRA's s·B, MTLoRA's T·A, LoRETTA's tensor-train
reconstructions, LoRETTA_adp's dense projections. A `FactorCache` keeps them, in the compute dtype and in the
layout the matmuls read, and computes them again only when something they are made of has changed:

- a parameter written in place (optimizer step, `load_state_dict`, `copy_`): its version counter moves;
- any optimizer step: a process-wide step hook counts them (fused optimizers, e.g. Trainer's default
  `adamw_torch_fused`, write parameters without moving their version counters);
- a parameter's storage replaced (`param.data = ...`): its data pointer moves;
- a dtype or device move (`.to()`, `.half()`): the owner's `_apply` clears the cache (`CachedFactorsMixin`);
- a parameter registered anew anywhere (`module.weight = nn.Parameter(...)`): a process-wide registration hook
  makes every cache re-read its owner's parameters;
- the compute dtype or the scaling: part of the key.

These are the bank's guards (`structlora.bank`), kept across forwards. Which adapter runs, and whether it is
merged or disabled, the layer decides before it asks, and every adapter has its own cache; merging clears the
merged adapter's cache (it is not read while merged); any adapter-state transition clears them all.

Plain LoRA whose parameters are in the compute dtype computes nothing and caches nothing: it reads its
parameters in every forward. A trained norm or head copy with fp32 masters on a low-precision model caches its
cast weights the same way (`TrainableCopy`).

A write that bypasses the version counter (`param.data.copy_(...)`, `.numpy()`, DLPack) is not seen: call
`model.clear_factor_caches()` (or `clear_factor_caches(model)`) after one.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

Value = TypeVar("Value")

# Bumped whenever any module registers a parameter: cached parameter lists are then read again.
_registrations = 0


def _count_registration(_module: nn.Module, _name: str, _parameter: Any) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)

# Bumped after every optimizer step in the process: torch's fused AdamW leaves `_version` unchanged.
_optimizer_steps = 0


def _count_optimizer_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def parameters_of(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters, recursively (`parameters()` without its generator and de-duplication: 4x faster)."""
    found = [tensor for tensor in module._parameters.values() if tensor is not None]
    for child in module._modules.values():
        if child is not None:
            found += parameters_of(child)
    return found


class FactorCache:
    """One value computed from a module's parameters, reused while they are certainly unchanged."""

    __slots__ = ("_owner", "_parameters", "_registrations", "_key", "_value")

    def __init__(self) -> None:
        self.clear()

    def __reduce__(self) -> tuple:
        return FactorCache, ()  # copied or pickled empty: cached values belong to the original's parameters

    def clear(self) -> None:
        self._owner: weakref.ref | None = None  # weak: the owner usually holds this cache
        self._parameters: list[torch.Tensor] | None = None
        self._registrations = -1
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, owner: nn.Module, key: tuple, compute: Callable[[], Value]) -> Value:
        """`compute()`'s value for `owner`'s current parameters and `key` (dtype, scaling...): cached or new."""
        if torch.compiler.is_compiling():  # a compiled graph computes the factors itself; no Python state inside
            return compute()
        if self._registrations != _registrations or self._owner is None or self._owner() is not owner:
            self._owner, self._parameters = weakref.ref(owner), parameters_of(owner)
            self._registrations, self._key = _registrations, None
        try:
            full_key = (key, _optimizer_steps, tuple([(t._version, t.data_ptr()) for t in self._parameters]))
        except RuntimeError:  # inference tensors have no version counter: nothing tells a change, so no cache
            return compute()
        if full_key != self._key:
            self._value, self._key = compute(), full_key
        return self._value


class CachedFactorsMixin:
    """For modules holding a `FactorCache` in `_factor_cache`: a dtype or device move clears it."""

    _factor_cache: FactorCache

    def _apply(self, fn: Callable, recurse: bool = True) -> Any:
        self._factor_cache.clear()
        return super()._apply(fn, recurse)  # type: ignore[misc]


def scaled_dense(weight: torch.Tensor, bias: torch.Tensor | None, scaling: float | torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scaling·weight and scaling·bias in `dtype` (a learned scaling stays a tensor: no host sync)."""
    if isinstance(scaling, torch.Tensor) or scaling != 1.0:
        weight, bias = weight * scaling, (None if bias is None else bias * scaling)
    return weight.to(dtype), (None if bias is None else bias.to(dtype))


def clear_factor_caches(model: nn.Module) -> int:
    """Drop every cached factor in `model`; returns how many caches were dropped (`PeftModel.clear_factor_caches`).

    Call it after writing adapter weights behind autograd's back: `param.data.copy_(...)`, `param.data[...] = ...`,
    writes through `.numpy()`, DLPack or `untyped_storage()`. `param.data` is a new tensor with its own version
    counter, so such a write changes neither the parameter's version nor its storage pointer; only comparing
    values would see it, which costs 3-4x a cache hit per adapter and forward (and a device sync on a GPU), so
    it is not done. Plain LoRA in the compute dtype caches nothing and needs no clear."""
    caches = [m._factor_cache for m in model.modules() if isinstance(getattr(m, "_factor_cache", None), FactorCache)]
    for cache in caches:
        cache.clear()
    return len(caches)
