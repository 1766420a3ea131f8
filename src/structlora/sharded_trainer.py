"""transformers' Trainer with FSDP2 or DeepSpeed for `structlora.AdapterTrainer` (a `peft.PeftModel`).

FSDP on CPU. transformers hands `fsdp` / `fsdp_config` to accelerate as a `FullyShardedDataParallelPlugin`, but
accelerate 1.15 turns FSDP on only for accelerator devices: `AcceleratorState.__init__` (accelerate/state.py,
the `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch, lines 986-1016) sets
`DistributedType.FSDP` and keeps the plugin only for MULTI_GPU/XPU/NPU/MLU/SDAA/MUSA/HPU/NEURON. CPU processes
(MULTI_CPU, gloo) keep the plugin nowhere, so `Trainer.is_fsdp_enabled` is False and accelerate wraps the model
in DDP: every process trains an unsharded copy, silently. FSDP2's `fully_shard` itself runs on CPU with gloo,
so `fsdp_as_requested` switches the accelerator to FSDP there (accelerate's own FSDP2 preparation then shards
the model), and refuses where FSDP was asked for and cannot be applied.

DeepSpeed on CPU. DeepSpeed's CPU accelerator runs here (gloo) and transformers + accelerate launch it with
`use_cpu=True` (2 processes, DistributedType.DEEPSPEED). Without `use_cpu` on a machine without an accelerator,
transformers passes accelerate no backend for DeepSpeed (transformers/training_args.py:1886-1888) and accelerate
finds no device backend (accelerate/state.py:768-801), so every process believes it is the only one
(`num_processes == 1`, state.py:290-294): each would train on the same batches and write the same checkpoint.
`deepspeed_as_requested` refuses that. (On GPUs `deepspeed=` alone is right.)

ZeRO-3 gathers a module's parameters in that module's forward and backward; structlora's adapters compute their
factors from their parameters without calling their sub-modules' forward (a tensor train's cores are read by the
layer), so `zero3_register_adapter_parameters` registers every adapter parameter as an external parameter of its
adapter layer (deepspeed.zero.register_external_parameter): the layer's forward and backward gather them.

Checkpoints. For a `peft.PeftModel` transformers and accelerate keep adapter-only state themselves: FSDP's
`pytorch_model_fsdp.bin` holds the adapter's tensors (accelerate's `adapter_only`), DeepSpeed's checkpoint only the
trainable parameters (`exclude_frozen_parameters`); both are what a resumed run reads back. Where
`fsdp_as_requested` turns FSDP on (CPU processes), the model state is sharded (`SHARDED_STATE_DICT`) unless
`fsdp_config` names a `state_dict_type`: accelerate's resume of a full adapter-only state waits forever there.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def fsdp_as_requested(trainer: Any) -> None:
    """Make `trainer` shard as its `fsdp` arguments ask (see the module docstring), or say why it cannot."""
    if trainer.args.fsdp_plugin_args is None or trainer.is_fsdp_enabled:
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state, plugin_args = trainer.accelerator.state, trainer.args.fsdp_plugin_args
    if state.distributed_type == DistributedType.NO:
        return  # transformers refuses FSDP in one process itself ("Using fsdp only works in distributed training")
    if state.distributed_type != DistributedType.MULTI_CPU or plugin_args.get("fsdp_version") != 2:
        raise ValueError(
            f"fsdp is set but accelerate did not enable it ({state.distributed_type}, fsdp_config version "
            f"{plugin_args.get('fsdp_version')}): training would run unsharded. Sharding CPU processes needs "
            f"fsdp_config version 2")
    if "state_dict_type" not in (trainer.args.fsdp_config or {}):
        # accelerate's adapter-only resume of a FULL_STATE_DICT checkpoint waits forever on CPU processes (rank 0
        # broadcasts the state that the others, holding none, never ask for; accelerate 1.16): checkpoints are
        # sharded (torch.distributed.checkpoint, adapter tensors only) unless fsdp_config names a state_dict_type.
        plugin_args = {**plugin_args, "state_dict_type": "SHARDED_STATE_DICT"}
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    trainer.is_fsdp_enabled = True


def deepspeed_as_requested(trainer: Any) -> None:
    """Refuse a DeepSpeed run that accelerate would silently drop or run as several single-process runs."""
    if not trainer.args.deepspeed:
        return
    if not trainer.is_deepspeed_enabled:
        raise ValueError("deepspeed is set but accelerate did not enable it: training would run without DeepSpeed")
    import torch.distributed

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if trainer.accelerator.num_processes != world:
        raise ValueError(
            f"DeepSpeed runs {world} processes but accelerate sees {trainer.accelerator.num_processes}: each would "
            f"train on the same batches and write the same checkpoint. On CPU processes, set use_cpu=True")


def zero3_register_adapter_parameters(model: Any) -> None:
    """With ZeRO-3: every structlora adapter layer gathers its adapters' parameters in its own forward and backward
    (see the module docstring). Call it yourself before deepspeed.initialize when you do not use the Trainer."""
    import deepspeed

    from .layers import AdapterLayerMixin

    for module in model.modules():
        if isinstance(module, AdapterLayerMixin):
            base = getattr(module, "base_layer", None)
            base_parameters = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
            for parameter in module.parameters():
                if id(parameter) not in base_parameters:
                    deepspeed.zero.register_external_parameter(module, parameter)


def before_deepspeed_prepare(trainer: Any) -> None:
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    if plugin is not None and plugin.zero_stage == 3:
        zero3_register_adapter_parameters(trainer.model)
