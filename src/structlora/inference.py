"""Inference without autograd: factors cached across forwards.

When no gradient is recorded (`torch.no_grad`, `torch.inference_mode`: `generate()`, evaluation) an adapter's
effective factors are the same from one forward to the next: LoRA's s·B, MTLoRA's T·A, LoRETTA's tensor-train
reconstructions, LoRETTA_adp's dense projections. A `FactorCache` keeps them, in the compute dtype and in the
layout the matmuls read, and computes them again only when something they are made of may have changed. Each
cache watches its own module's tensors only: structlora installs no process-wide hook, so nothing of it runs for
the user's other modules and optimizers. It notices:

- a tensor written in place (`load_state_dict`, `copy_`, an optimizer that moves version counters): the version
  counter of one of the owner's parameters or buffers (an SVD start's frozen factors) moves;
- an optimizer step, fused ones included (torch's fused AdamW, Trainer's default `adamw_torch_fused` on a GPU,
  writes parameters without moving their version counters). A step needs gradients, so:
  - while any of the owner's parameters holds a gradient (`.grad` not None: a step may be pending) nothing is
    served or kept: the factors are computed in that forward (also after `zero_grad(set_to_none=False)`, which
    keeps zero gradients: every no-grad forward then computes its factors, until they are set to None);
  - every use of the adapter with autograd on (its forward in training, also the recompute of activation
    checkpointing; `delta_weight()`) empties its cache, so a step after it and after `zero_grad()` is never
    answered from a value computed before it;
- a parameter registered anew (`module.weight = nn.Parameter(...)`, anywhere inside the owner; a buffer too): the
  `_parameters` dicts of the owner and its submodules (and the `_buffers` dicts that hold any) are read in every
  forward and the tensors keyed by identity; `param.data = ...`: its data pointer moves;
- a dtype or device move (`.to()`, `.half()`): the owner's `_apply` clears the cache (`CachedFactorsMixin`);
- the compute dtype or the scaling: part of the key.

The bank (`structlora.bank`) uses the same version and storage guards within one forward. Which adapter runs, and
whether it is merged or disabled, the layer decides before it asks, and every adapter has its own cache; merging
clears the merged adapter's cache (it is not read while merged); any adapter-state transition clears them all.

Plain LoRA whose parameters are in the compute dtype computes nothing and caches nothing: it reads its
parameters in every forward. A trained norm or head copy with fp32 masters on a low-precision model caches its
cast weights the same way (`TrainableCopy`).

Not seen; call `model.clear_factor_caches()` (or `clear_factor_caches(model)`) after one:
- a write that bypasses the version counter (`param.data.copy_(...)`, `.numpy()`, DLPack);
- a step of an optimizer that moves no version counter (fused AdamW) on gradients that no use of the adapter with
  autograd produced (a loss on its parameters alone), set to None before the next no-grad forward;
- a submodule of an adapter replaced by another module (`adapter.parameterization = ...`), until the next clear;
- with FSDP2, whose gradients live on the sharded parameters and whose all-gathers into the module's parameters
  keep their version counters, the cache cannot tell a write to the sharded parameters: a no-grad forward
  between `backward()` and the optimizer step, or a `load_state_dict` into the sharded parameters after the
  cache was filled, may leave it stale. A training forward still empties the caches, so evaluation after a step
  (Trainer's order) is current. DeepSpeed ZeRO can keep gradients in its own buffers: the same holds for a
  no-grad forward between backward and step there.
"""

from __future__ import annotations

import weakref
from collections.abc import ValuesView
from typing import Any, Callable, TypeVar

import torch
from torch import nn

Value = TypeVar("Value")


def tensor_slots(module: nn.Module) -> list[ValuesView]:
    """Live views of the `_parameters` dicts of the module and its submodules, and of their `_buffers` dicts that
    hold any: a parameter (or buffer) registered anew in one of them shows in its view."""
    subs = list(module.modules())
    return [sub._parameters.values() for sub in subs] + [sub._buffers.values() for sub in subs if sub._buffers]


class FactorCache:
    """One value computed from a module's parameters and buffers, reused while they are certainly unchanged."""

    __slots__ = ("_owner", "_slots", "_tensors", "_key", "_value")

    def __init__(self) -> None:
        self.clear()

    def __reduce__(self) -> tuple:
        return FactorCache, ()  # copied or pickled empty: cached values belong to the original's parameters

    def clear(self) -> None:
        """Forget the value. Every forward with autograd on calls it: an optimizer step may follow it unseen."""
        self._owner: weakref.ref | None = None  # weak: the owner usually holds this cache
        self._slots: list[ValuesView] = []
        self._tensors: list[torch.Tensor] = []  # held, so that the ids in the key stay theirs
        self._key: tuple | None = None
        self._value: Any = None

    def used_with_grad(self) -> None:
        """Where the owner's parameters are used: with autograd on, an optimizer step may follow that writes them
        without moving their version counters (fused AdamW), so the value is dropped."""
        if torch.is_grad_enabled():
            self.clear()

    def get(self, owner: nn.Module, key: tuple, compute: Callable[[], Value]) -> Value:
        """`compute()`'s value for `owner`'s current tensors and `key` (dtype, scaling...): cached or new."""
        if torch.compiler.is_compiling():  # a compiled graph computes the factors itself; no Python state inside
            return compute()
        if self._owner is None or self._owner() is not owner:
            self.clear()
            self._owner, self._slots = weakref.ref(owner), tensor_slots(owner)
        try:
            state = [(id(t), t._version, t.data_ptr(), t.grad is None)
                     for tensors in self._slots for t in tensors if t is not None]
        except RuntimeError:  # inference tensors have no version counter: nothing tells a change, so no cache
            return compute()
        full_key = (key, state)
        if full_key == self._key:  # a key is kept only without gradients: none now either
            return self._value
        if not all(entry[3] for entry in state):  # a gradient: a step may be pending, and would write unseen
            self.clear()
            return compute()
        self._value, self._key = compute(), full_key
        self._tensors = [t for tensors in self._slots for t in tensors if t is not None]
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
