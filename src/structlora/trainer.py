"""`AdapterTrainer`: transformers' Trainer for a `peft.PeftModel` (structlora's methods or PEFT's own).

The stock Trainer already knows a `peft.PeftModel`: its checkpoints hold the adapter files only, it resumes from
them and loads the best one at the end, and under FSDP and DeepSpeed accelerate and transformers keep adapter-only
state. `AdapterTrainer` adds only what the stock Trainer lacks:

- a non-finite loss or gradient stops the run with `NonFiniteTrainingError` (or, with `skip_nonfinite_steps=True`,
  drops that step's gradients and counts it in `skipped_nonfinite_steps`) (`structlora.trainer_guards`);
- LoRA+ (`loraplus_lr_ratio`: the B factors at a multiple of the learning rate);
- resuming from a checkpoint that lacks the optimizer, scheduler, trainer or RNG state, or the trained adapter's
  files (which would silently give another result) is refused unless `allow_incomplete_checkpoint=True`;
- the best checkpoint is loaded adapter by adapter, each from its own folder: the stock Trainer loads only the
  checkpoint's top folder ("default"'s adapter) into the active adapter, so an adapter with another name kept its
  last weights (with a warning) or, beside a "default" one, received "default"'s;
- FSDP2 on CPU processes, DeepSpeed refusals and ZeRO-3 registration of structlora's adapter parameters
  (`structlora.sharded_trainer`); under FSDP or DeepSpeed `save_model` gathers the adapter's tensors only (the
  stock one gathers the whole model on one process first).

`GuardedTrainer` is the stock Trainer with the non-finite guard (full fine-tuning). The checkpoints of structlora's
earlier model class (BitFit still uses it) are `structlora.lookalike_trainer`'s.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from .distributed import full_cpu_copies, whole_parameters
from .sharded_trainer import before_deepspeed_prepare, deepspeed_as_requested, fsdp_as_requested
from .trainer_guards import (CHECKPOINT_STATE_FILES, SHARDED_OPTIMIZER_STATE, LoraPlusOptimizer, NonFiniteGuard,
                             NonFiniteTrainingError, missing_checkpoint_state,
                             refuse_incomplete_checkpoint)

__all__ = ["CHECKPOINT_STATE_FILES", "SHARDED_OPTIMIZER_STATE", "AdapterTrainer",
           "GuardedTrainer", "LoraPlusOptimizer", "NonFiniteGuard", "NonFiniteTrainingError",
           "missing_checkpoint_state"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class GuardedTrainer(NonFiniteGuard, Trainer):
    """transformers' Trainer with the non-finite guard (full fine-tuning)."""


def _adapter_folder(checkpoint: str, adapter_name: str) -> str:
    """Where `peft.PeftModel.save_pretrained(checkpoint)` writes adapter `adapter_name`: "default" at the top, the
    others in a sub-folder named after them."""
    return checkpoint if adapter_name == "default" else os.path.join(checkpoint, adapter_name)


class AdapterTrainer(NonFiniteGuard, LoraPlusOptimizer, Trainer):
    """transformers' Trainer for a `peft.PeftModel` (see the module docstring for what it adds to the stock one).

    Args:
        args, kwargs: those of transformers.Trainer; `model` must be a `peft.PeftModel`.
        skip_nonfinite_steps: instead of stopping with NonFiniteTrainingError, drop a non-finite step's gradients
            and count it in `skipped_nonfinite_steps`.
        allow_incomplete_checkpoint: resume from a checkpoint that lacks the optimizer, scheduler or trainer
            state (refused by default: it would not continue the same run).
        loraplus_lr_ratio: LoRA+: train the B factors at this multiple of the learning rate (`structlora.loraplus`).
        loraplus_lr_embedding: LoRA+: the learning rate of low-rank adapters on embeddings (default 1e-6, PEFT's).
    """

    def __init__(self, *args: Any, allow_incomplete_checkpoint: bool = False, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and not _is_peft_model(model):
            raise TypeError(f"{type(self).__name__} trains a peft.PeftModel (peft.get_peft_model(model, config) with "
                            f"a structlora or PEFT config), got {type(model).__name__}; a model without adapter "
                            f"trains with transformers.Trainer")
        super().__init__(*args, **kwargs)
        self.allow_incomplete_checkpoint = allow_incomplete_checkpoint

    # -- FSDP2 / DeepSpeed -------------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp_as_requested(self)
        deepspeed_as_requested(self)

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        before_deepspeed_prepare(self)
        return super()._prepare_for_training(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every process gathers (a collective), the first writes: the adapter's tensors only.
        model = self.accelerator.unwrap_model(self.model)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        with whole_parameters([p for n, p in model.named_parameters() if _saved(n, trained)]):
            # read inside the gather: state-dict hooks name whole tensors differently (per-core TT entries)
            state, _ = full_cpu_copies({n: t for n, t in model.state_dict().items() if _saved(n, trained)})
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # -- resuming and the best checkpoint ----------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        active = _unwrapped(self, model).active_adapter
        folder = os.path.relpath(_adapter_folder(resume_from_checkpoint, active), resume_from_checkpoint)
        refuse_incomplete_checkpoint(resume_from_checkpoint, folder, self.allow_incomplete_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()  # accelerate's / DeepSpeed's adapter-only state
        load_saved_adapters(_unwrapped(self, None), self.state.best_model_checkpoint)


def load_saved_adapters(model: Any, checkpoint: str) -> None:
    """Load every adapter of `model` (a peft.PeftModel) that `checkpoint` holds from its own folder; the active one
    must be there (ValueError naming the folder otherwise); it stays active and trainable."""
    active = model.active_adapter
    folder = _adapter_folder(checkpoint, active)
    if not os.path.isfile(os.path.join(folder, ADAPTER_FILES[0])):
        raise ValueError(f"checkpoint {checkpoint!r} holds no weights of the trained adapter {active!r} (no "
                         f"{ADAPTER_FILES[0]} in {folder!r}): it cannot be loaded as the best model")
    for name in [active, *(n for n in model.peft_config if n != active)]:
        folder = _adapter_folder(checkpoint, name)
        if os.path.isfile(os.path.join(folder, ADAPTER_FILES[0])):
            model.load_adapter(folder, name, is_trainable=name == active)
    model.set_adapter(active)


def _unwrapped(trainer: Trainer, model: torch.nn.Module | None) -> Any:
    return trainer.accelerator.unwrap_model(model if model is not None else trainer.model)


def _is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _saved(name: str, trained: set[str]) -> bool:
    """Whether PEFT may save the state-dict entry `name`: what trains, and every tensor inside an adapter layer or a
    trained copy (frozen factors of SVD starts, other adapters)."""
    return name in trained or any(marker in name for marker in (".adapters.", ".modules_to_save.", "lora_",
                                                                  "prompt_encoder"))
