"""`AdapterTrainer`: transformers' Trainer with checkpoints that hold only the adapter folder.

The stock Trainer saves a full state dict for models it does not recognise; this subclass saves
`save_pretrained()`'s adapter folder instead and reloads it for `resume_from_checkpoint` and
`load_best_model_at_end`. `AdapterCheckpoints` is that part alone, a mixin for other Trainer subclasses
(TRL's, `structlora.integrations.trl`).

`AdapterTrainer` also refuses to go on silently when something is wrong: a non-finite loss or gradient stops the
run with `NonFiniteTrainingError` (or, with `skip_nonfinite_steps=True`, drops that step's gradients and counts it in
`skipped_nonfinite_steps`), and resuming from a checkpoint that lacks the optimizer, scheduler, trainer or RNG state
(which would silently give another result) is refused unless `allow_incomplete_checkpoint=True`.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import torch
from transformers import Trainer

from .distributed import any_sharded
from .config import CONFIG_NAME
from .loraplus import check_loraplus_lr_ratio, create_loraplus_optimizer
from .model import WEIGHTS_NAME, PeftModel, adapter_folder
from .sharded_trainer import (adapter_only_sharded_checkpoints, before_deepspeed_prepare, deepspeed_as_requested,
                              fsdp_as_requested)

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


class GuardedTrainer(NonFiniteGuard, Trainer):
    """transformers' Trainer with the non-finite guard (full fine-tuning)."""


class AdapterCheckpoints:
    """Mixin for a transformers Trainer (sub)class: checkpoints hold the adapter folder only (the TRL trainers of
    `structlora.integrations.trl` use it too). Under FSDP2 or DeepSpeed the adapter is gathered on every process
    and written by the first; `fsdp` shards on CPU processes too (see `structlora.sharded_trainer`)."""

    allow_incomplete_checkpoint = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp_as_requested(self)
        deepspeed_as_requested(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        # transformers would first gather the whole model on one process; the adapter is all we save.
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        with adapter_only_sharded_checkpoints(self):
            super()._save_optimizer_and_scheduler(output_dir)

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        before_deepspeed_prepare(self)
        with adapter_only_sharded_checkpoints(self):  # DeepSpeed resumes from its adapter-only checkpoint
            return super()._prepare_for_training(*args, **kwargs)

    def _peft_model(self, model: torch.nn.Module | None = None) -> PeftModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, PeftModel):
            raise TypeError(f"{type(self).__name__} trains a structlora PeftModel, got {type(unwrapped).__name__}")
        return unwrapped

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        peft_model = self._peft_model()
        # Sharded weights are gathered by a collective: every process saves, the first one writes.
        if not self.args.should_save and not any_sharded(peft_model.parameters()):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        peft_model.save_pretrained(output_dir)  # refuses non-finite weights
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._peft_model(model)
        # The trained (active) adapter's folder: the checkpoint itself for "default", else its sub-folder.
        folder = os.path.relpath(adapter_folder(resume_from_checkpoint, peft_model.active_adapter),
                                 resume_from_checkpoint)
        weights = tuple(os.path.normpath(os.path.join(folder, name)) for name in (WEIGHTS_NAME, CONFIG_NAME))
        missing = missing_checkpoint_state(resume_from_checkpoint, weights)
        if missing and not (self.allow_incomplete_checkpoint and weights[0] not in missing):
            raise ValueError(
                f"checkpoint {resume_from_checkpoint!r} lacks {', '.join(missing)}: resuming it would not continue "
                f"the same run. Resume from a complete checkpoint"
                f"{'' if weights[0] in missing else ' (or allow_incomplete_checkpoint=True)'}")
        _load_saved_adapters(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _load_saved_adapters(self._peft_model(), self.state.best_model_checkpoint)


def _load_saved_adapters(peft_model: PeftModel, checkpoint: str) -> None:
    """Load the weights of every adapter of `peft_model` that the checkpoint holds (the Trainer saves them all; only
    the active one trains, and it must be there)."""
    for name in [peft_model.active_adapter, *(n for n in peft_model.peft_config if n != peft_model.active_adapter)]:
        folder = adapter_folder(checkpoint, name)
        if name == peft_model.active_adapter or os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            peft_model.load_adapter_weights(folder, name)


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


class AdapterTrainer(NonFiniteGuard, LoraPlusOptimizer, AdapterCheckpoints, Trainer):
    """transformers' Trainer for a structlora PeftModel: checkpoints hold the adapter folder only (and are reloaded
    for resume_from_checkpoint and load_best_model_at_end), and a non-finite loss or gradient stops the run.

    Args:
        args, kwargs: those of transformers.Trainer.
        skip_nonfinite_steps: instead of stopping with NonFiniteTrainingError, drop a non-finite step's gradients
            and count it in `skipped_nonfinite_steps`.
        allow_incomplete_checkpoint: resume from a checkpoint that lacks the optimizer, scheduler or trainer
            state (refused by default: it would not continue the same run).
        loraplus_lr_ratio: LoRA+: train the B factors at this multiple of the learning rate (`structlora.loraplus`).
        loraplus_lr_embedding: LoRA+: the learning rate of low-rank adapters on embeddings (default 1e-6, PEFT's).
    """

    def __init__(self, *args: Any, allow_incomplete_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_incomplete_checkpoint = allow_incomplete_checkpoint


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
