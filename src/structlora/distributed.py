"""Sharded parameters (FSDP2's `fully_shard`: DTensors outside the unsharded forward) for the code that reads
adapter weights outside a forward: the factor bank and saving."""

from __future__ import annotations

from typing import Iterable

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4 (or built without distributed): nothing can be sharded
    DTensor = ()


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """FSDP2 DTensors, or DeepSpeed ZeRO-3 parameters (`ds_id`: partitioned outside their module's forward;
    this case is untested here, DeepSpeed does not run on this CPU-only machine)."""
    return any(isinstance(tensor, DTensor) or hasattr(tensor, "ds_id") for tensor in tensors)


def gather_full(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(state with every sharded tensor gathered whole, whether any was sharded). Gathering is a collective:
    with sharded tensors every rank must call this, in the same order."""
    sharded = any_sharded(state.values())
    if not sharded:
        return state, False
    return {key: t.full_tensor() if isinstance(t, DTensor) else t for key, t in state.items()}, True


def is_writer() -> bool:
    """Rank 0 of the default process group, or the only process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
