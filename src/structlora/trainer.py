"""`AdapterTrainer`: transformers' Trainer with checkpoints that hold only the adapter folder.

The stock Trainer saves a full state dict for models it does not recognise; `AdapterCheckpoints` saves
`save_pretrained()`'s adapter folder instead and reloads it for `resume_from_checkpoint` and
`load_best_model_at_end`. It is a mixin so that Trainer subclasses (TRL's, `structlora.integrations.trl`)
get the same checkpoints.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .model import PeftModel


class AdapterCheckpoints:
    """Mixin for a transformers Trainer (sub)class: checkpoints hold the adapter folder only."""

    def _peft_model(self, model: torch.nn.Module | None = None) -> PeftModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, PeftModel):
            raise TypeError(f"{type(self).__name__} trains a structlora PeftModel, got {type(unwrapped).__name__}")
        return unwrapped

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._peft_model().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._peft_model(model)
        peft_model.load_adapter_weights(resume_from_checkpoint, peft_model.active_adapter)

    def _load_best_model(self) -> None:
        peft_model = self._peft_model()
        peft_model.load_adapter_weights(self.state.best_model_checkpoint, peft_model.active_adapter)


class AdapterTrainer(AdapterCheckpoints, Trainer):
    pass
