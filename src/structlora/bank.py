"""One forward's factors, computed together for all layers.

Some parameterizations compute a factor from several small tensors every forward: a tensor train contracts
its cores (a handful of tiny matmuls forward, twice that backward), MTLoRA multiplies T·A (and C·Cᵀ or C·D
first). On a GPU each of those is a kernel launch, and a 32-layer model has 64-200 of them per step. The
same projection in every layer has the same shapes, so `bank` stacks their inputs and computes all of them
in one batched chain; each member's forward then takes its slice.

`PeftModel` banks the active adapters before each forward of the base model, outside any checkpointed layer,
so a layer recomputed by activation checkpointing takes the same slice as its first pass did. A slice is
used only while it is certainly the member's current value: same grad mode, inputs unchanged since
(version and storage of each), and the batched chain not yet back-propagated through (after that its
buffers are freed). Otherwise the member computes its factor itself, as it always can.

A member implements `bank_key()` (equal keys = stackable; None = nothing to compute), `bank_inputs()` (the
tensors to stack, in order) and `bank_compute(inputs)` (the factor from its inputs, with or without a
leading member dimension).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import torch

from .distributed import any_sharded


class Bankable(Protocol):
    def bank_key(self) -> tuple | None: ...

    def bank_inputs(self) -> list[torch.Tensor]: ...

    def bank_compute(self, inputs: list[torch.Tensor]) -> torch.Tensor: ...


@dataclass(eq=False)
class _Bank:
    grad_enabled: bool
    spent: bool = False  # the batched chain has been back-propagated through


@dataclass(eq=False)
class _Slot:
    bank: _Bank
    value: torch.Tensor
    fingerprint: tuple[tuple[int, int], ...]


_SLOTS: "weakref.WeakKeyDictionary[Any, _Slot]" = weakref.WeakKeyDictionary()


def _fingerprint(inputs: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """Changes whenever an input is written in place (optimizer step, load) or replaced (.to(), .data =)."""
    return tuple((tensor._version, tensor.data_ptr()) for tensor in inputs)


def computed(member: Bankable) -> torch.Tensor:
    """The member's factor: its slice of this forward's bank when that is certainly current, else computed now."""
    inputs = member.bank_inputs()
    if not torch.compiler.is_compiling():  # compiled graphs fuse the chain themselves; no Python state inside
        slot = _SLOTS.get(member)
        if (slot is not None and not slot.bank.spent and slot.bank.grad_enabled == torch.is_grad_enabled()
                and slot.fingerprint == _fingerprint(inputs)):
            return slot.value
    return member.bank_compute(inputs)


def _mark_spent(bank: _Bank) -> None:
    bank.spent = True


def bank(members: Iterable[Bankable]) -> int:
    """Compute the members' factors for the coming forward, one batched chain per group of same-shaped members;
    return how many were banked (a group of one is left to compute itself)."""
    groups: dict[tuple, list[tuple[Bankable, list[torch.Tensor]]]] = {}
    for member in members:
        key = member.bank_key()
        if key is None:
            continue
        inputs = member.bank_inputs()
        if any_sharded(inputs):
            # FSDP2 shards the parameters outside their layer's forward: the member computes its factor inside
            # that forward, from the gathered parameters.
            _SLOTS.pop(member, None)
            continue
        groups.setdefault(key, []).append((member, inputs))
    current, banked = _Bank(grad_enabled=torch.is_grad_enabled()), 0
    for group in groups.values():
        if len(group) < 2:
            _SLOTS.pop(group[0][0], None)
            continue
        stacked = [torch.stack(same_position) for same_position in zip(*(inputs for _, inputs in group))]
        values = group[0][0].bank_compute(stacked)
        if values.requires_grad:
            # Fires once the gradients of every slice have reached the stack: the chain is spent.
            values.register_hook(lambda grad, spent=current: _mark_spent(spent))
        for (member, inputs), value in zip(group, values.unbind(0)):
            _SLOTS[member] = _Slot(current, value, _fingerprint(inputs))
        banked += len(group)
    return banked
