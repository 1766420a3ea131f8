"""The parts of structlora's Trainer classes that the stock Trainer lacks, as mixins (`structlora.trainer` combines
them into `AdapterTrainer` and `GuardedTrainer`):

- `NonFiniteGuard`: a non-finite loss or gradient stops the run with `NonFiniteTrainingError` (or, with
  `skip_nonfinite_steps=True`, drops that step's gradients and counts it in `skipped_nonfinite_steps`); under
  torch.distributed all processes decide together.
- `LoraPlusOptimizer`: LoRA+'s parameter groups (`loraplus_lr_ratio`).
- `missing_checkpoint_state`: what a checkpoint lacks to continue the same run (optimizer, scheduler, trainer and
  RNG state, the adapter's files), for the refusal to resume from an incomplete checkpoint.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import torch

from .loraplus import check_loraplus_lr_ratio, create_loraplus_optimizer

# What a checkpoint needs so that resuming it continues the same run (Trainer file names).
CHECKPOINT_STATE_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


class NonFiniteTrainingError(ValueError):
    """The loss or a gradient became NaN/inf: the run stopped instead of training (and saving) garbage."""


# Where a sharded run keeps its optimizer instead of optimizer.pt: FSDP (full / sharded state dict), DeepSpeed.
SHARDED_OPTIMIZER_STATE = ("optimizer.bin", "optimizer_0", "latest")


def missing_checkpoint_state(checkpoint: str, weights: Sequence[str] = ("adapter_model.safetensors",
                                                                        "adapter_config.json")) -> list[str]:
    """The files of CHECKPOINT_STATE_FILES, the RNG state and the ``weights`` files that `checkpoint` lacks
    (without the RNG state a resumed run draws other batches and dropout masks: another result)."""
    sharded_optimizer = any(os.path.exists(os.path.join(checkpoint, name)) for name in SHARDED_OPTIMIZER_STATE)
    missing = [name for name in (*weights, *CHECKPOINT_STATE_FILES) if not os.path.isfile(os.path.join(checkpoint, name))
               and not (name == "optimizer.pt" and sharded_optimizer)]
    # Trainer writes rng_state.pth, or rng_state_<rank>.pth per process of a distributed run.
    if not glob.glob(os.path.join(glob.escape(checkpoint), "rng_state*.pth")):
        missing.append("rng_state.pth")
    return missing


def refuse_incomplete_checkpoint(checkpoint: str, adapter_folder: str, allow_incomplete: bool) -> None:
    """ValueError when `checkpoint` lacks what resuming the same run needs (`missing_checkpoint_state`) for the trained
    adapter saved in its sub-folder `adapter_folder` ("." for the top); `allow_incomplete` lets a checkpoint without
    the optimizer, scheduler, trainer or RNG state through, never one without the adapter's weights."""
    weights = tuple(os.path.normpath(os.path.join(adapter_folder, name))
                    for name in ("adapter_model.safetensors", "adapter_config.json"))
    missing = missing_checkpoint_state(checkpoint, weights)
    if missing and not (allow_incomplete and weights[0] not in missing):
        raise ValueError(f"checkpoint {checkpoint!r} lacks {', '.join(missing)}: resuming it would not continue the "
                         f"same run. Resume from a complete checkpoint"
                         f"{'' if weights[0] in missing else ' (or allow_incomplete_checkpoint=True)'}")


class NonFiniteGuard:
    """Trainer mixin: stop (or skip and count) on a non-finite loss or gradient."""

    def __init__(self, *args: Any, skip_nonfinite_steps: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped_nonfinite_steps = 0

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        problem = _nonfinite_problem(model, loss)
        if problem is None:
            return loss
        step = self.state.global_step + 1
        if not self.skip_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"step {step}: {problem}; training stopped (the learning rate may be too high). Checkpoints "
                f"saved before this step are kept; skip such steps instead with skip_nonfinite_steps "
                f"(--skip-nonfinite-steps)")
        self.skipped_nonfinite_steps += 1
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        return loss.detach().new_zeros(())


class LoraPlusOptimizer:
    """Trainer mixin: with `loraplus_lr_ratio`, the optimizer `args.optim` names (or `optimizer_cls_and_kwargs`) over
    LoRA+'s parameter groups (`structlora.loraplus`: B at lr·ratio, A and T at lr, adapters on embeddings at
    `loraplus_lr_embedding`); without it, the Trainer's own optimizer."""

    def __init__(self, *args: Any, loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6,
                 **kwargs: Any) -> None:
        if loraplus_lr_ratio is not None:
            check_loraplus_lr_ratio(loraplus_lr_ratio)
            if (kwargs.get("optimizers") or (None, None))[0] is not None:
                raise ValueError("loraplus_lr_ratio builds the optimizer's parameter groups, but an optimizer was "
                                 "given (optimizers=...): pass one or the other (structlora.create_loraplus_optimizer "
                                 "builds a LoRA+ optimizer to pass)")
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio, self.loraplus_lr_embedding = loraplus_lr_ratio, loraplus_lr_embedding

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.loraplus_lr_ratio is not None:
            opt_model = self.model if model is None else model
            chosen = getattr(self, "optimizer_cls_and_kwargs", None)  # Trainer(optimizer_cls_and_kwargs=...)
            optimizer_cls, optimizer_kwargs = chosen or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            decayed = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = create_loraplus_optimizer(
                opt_model, optimizer_cls, {**optimizer_kwargs, "weight_decay": self.args.weight_decay},
                self.loraplus_lr_ratio, self.loraplus_lr_embedding, decay_parameter_names=decayed)
        return super().create_optimizer(model) if model is not None else super().create_optimizer()


def _nonfinite_problem(model: torch.nn.Module, loss: torch.Tensor) -> str | None:
    """What is not finite after a backward (the loss, else the first gradient), or None. Under torch.distributed
    every process gets the same answer (one tiny all-reduce), so all stop or skip together instead of some
    waiting forever in the next collective (sharded gradients differ between processes)."""
    problem = _local_nonfinite_problem(model, loss)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([0.0 if problem is None else 1.0], device=loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and problem is None:
            problem = "another process saw a non-finite loss or gradient"
    return problem


def _local_nonfinite_problem(model: torch.nn.Module, loss: torch.Tensor) -> str | None:
    if not torch.isfinite(loss.detach()).all():
        return f"the loss is {float(loss.detach().float().mean())}"
    named = []
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if grad is not None:
            named.append((name, grad.to_local() if hasattr(grad, "to_local") else grad))  # DTensor: own shard
    if not named:
        return None
    norms = torch._foreach_norm([grad for _, grad in named])
    finite = torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]))
    if bool(finite.all()):
        return None
    # A low-precision norm can overflow for finite gradients: confirm element-wise.
    bad = [name for (name, grad), ok in zip(named, finite.tolist()) if not ok and not torch.isfinite(grad).all()]
    return f"the gradient of {bad[0]} is not finite ({len(bad)} parameter(s) affected)" if bad else None
