"""Checkpoints for structlora's own look-alike `structlora.model.PeftModel`, which transformers' Trainer does not
know as a PEFT model: today only BitFit, which has no PEFT tuner (it injects no layer), and LoRETTA_adp with the
tensorized DeBERTa pooler (`structlora.peft_model.has_peft_tuner`). Everything else trains as a `peft.PeftModel` with `structlora.AdapterTrainer`, whose
checkpoints are the stock Trainer's. This module goes with the look-alike.

`AdapterCheckpoints` (a Trainer mixin) saves `save_pretrained()`'s adapter folder into every checkpoint instead of
a full state dict and reloads it for `resume_from_checkpoint` and `load_best_model_at_end`; under FSDP2 or DeepSpeed
the adapter is gathered on every process and written by the first (`adapter_only_sharded_checkpoints`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator
from unittest import mock

import torch
import transformers.trainer
from transformers import Trainer

from .distributed import any_sharded
from .model import WEIGHTS_NAME, PeftModel, adapter_folder
from .sharded_trainer import before_deepspeed_prepare, deepspeed_as_requested, fsdp_as_requested
from .trainer_guards import LoraPlusOptimizer, NonFiniteGuard, refuse_incomplete_checkpoint


class AdapterCheckpoints:
    """Mixin for a transformers Trainer (sub)class training a look-alike `structlora.model.PeftModel`: checkpoints
    hold the adapter folder only."""

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
            raise TypeError(f"{type(self).__name__} trains a structlora.model.PeftModel, got {type(unwrapped).__name__}")
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
        refuse_incomplete_checkpoint(resume_from_checkpoint, folder, self.allow_incomplete_checkpoint)
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


class LookAlikeAdapterTrainer(NonFiniteGuard, LoraPlusOptimizer, AdapterCheckpoints, Trainer):
    """The recipes' trainer for BitFit (a look-alike `structlora.model.PeftModel`): `structlora.AdapterTrainer`'s
    guards with `AdapterCheckpoints`."""

    def __init__(self, *args: Any, allow_incomplete_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_incomplete_checkpoint = allow_incomplete_checkpoint


@contextlib.contextmanager
def adapter_only_sharded_checkpoints(trainer: Any) -> Iterator[None]:
    """Inside the block, transformers' checkpoint code saves and resumes only what trains of a look-alike model:
    FSDP writes no whole-model copy beside the adapter folder, DeepSpeed treats the model as PEFT's
    (`exclude_frozen_parameters`)."""
    with contextlib.ExitStack() as stack:
        if trainer.is_fsdp_enabled:
            stack.enter_context(mock.patch.object(transformers.trainer, "save_fsdp_model", _skip))
        if trainer.is_deepspeed_enabled:
            is_peft_model = transformers.trainer._is_peft_model
            stack.enter_context(mock.patch.object(
                transformers.trainer, "_is_peft_model",
                lambda model: is_peft_model(model) or _is_look_alike_model(model)))
        yield


def _skip(*_: Any, **__: Any) -> None:
    return None


def _is_look_alike_model(model: Any) -> bool:
    from accelerate.utils import extract_model_from_parallel

    return isinstance(extract_model_from_parallel(model), PeftModel)
