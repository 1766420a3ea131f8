"""Sharded parameters for the code that reads or writes adapter weights outside a forward (the factor bank,
saving, loading): FSDP2's `fully_shard` (DTensors outside the unsharded forward) and DeepSpeed ZeRO-3
(parameters carrying `ds_id`, partitioned outside their module's forward).

Gathering is a collective: with sharded parameters every rank must run the same gathers in the same order
(`PeftModel.save_pretrained` and `load_adapter_weights` on every rank; rank 0 alone writes files)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch < 2.4 (or built without distributed): nothing can be sharded
    DTensor = ()
    distribute_tensor = None


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """FSDP2 DTensors, or DeepSpeed ZeRO-3 parameters (`ds_id`)."""
    return any(isinstance(tensor, DTensor) or hasattr(tensor, "ds_id") for tensor in tensors)


@contextlib.contextmanager
def whole_parameters(parameters: Iterable[torch.Tensor], modify: bool = False) -> Iterator[bool]:
    """Inside the block, the ZeRO-3 partitioned ones among `parameters` hold their whole values
    (deepspeed.zero.GatheredParameters; with `modify`, what rank 0 writes is partitioned again on exit). Yields
    whether any was partitioned. FSDP2 DTensors need no block: see `full_cpu_copies` / `copy_whole`."""
    partitioned = [parameter for parameter in parameters if hasattr(parameter, "ds_id")]
    if not partitioned:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield True


def full_cpu_copies(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(CPU copies of `state` with FSDP2 DTensors gathered whole, whether any was a DTensor)."""
    sharded = any(isinstance(tensor, DTensor) for tensor in state.values())
    full = {key: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True).contiguous()
            for key, t in state.items()}
    return full, sharded


def copy_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """target.copy_(value) where `target` may be an FSDP2 DTensor and `value` the whole tensor (present on every
    rank: each keeps its own shard, no communication)."""
    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def is_writer() -> bool:
    """Rank 0 of the default process group, or the only process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def end_process_group() -> None:
    """Destroys the default process group, if one was started (by torchrun + accelerate, or by the caller).
    A gloo group left alive at interpreter exit can abort the process (SIGABRT, "terminate called without an
    active exception") after a run that succeeded. Local: no collective, so it cannot hang after a failure."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
