"""TRL's trainers for structlora models: `SFTTrainer` and `DPOTrainer`, drop-in for `trl.SFTTrainer` and
`trl.DPOTrainer` (same arguments; `pip install structlora[trl]`).

TRL has a code path for adapter models, chosen by `accelerate.utils.is_peft_model`, which recognises only
`peft.PeftModel`. A structlora model needs the same path: TRL's fused LM head must patch the wrapped causal
LM (not the wrapper, whose `base_model` is the whole causal LM rather than the backbone TRL expects), and
DPO must take its reference from the same weights instead of loading a second copy of the base model.
Importing this module therefore extends the `is_peft_model` that TRL's SFT, DPO and base trainer modules
call so that it also answers True for a structlora `PeftModel` (its answer for every other model is
unchanged). The trainers here add adapter-only checkpoints (`structlora.trainer.AdapterCheckpoints`).

DPO's reference, as TRL does for a PEFT model passed in already wrapped: TRL adds a frozen copy of the
adapter named "ref" (a few kilobytes; no second base model) and computes the reference with it. A freshly
initialised structlora adapter changes nothing (B, or the last tensor-train core, starts at zero; norm copies
equal the base norms), so that reference is exactly the adapter-disabled base model; a pre-trained adapter
keeps its starting point as the reference.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import accelerate.utils
import trl
import trl.trainer.base_trainer
import trl.trainer.dpo_trainer
import trl.trainer.sft_trainer
from torch import nn

from ..layers import AdapterLayerMixin
from ..model import PeftModel
from ..trainer import AdapterCheckpoints, LoraPlusOptimizer

_TRL_MODULES = (trl.trainer.base_trainer, trl.trainer.dpo_trainer, trl.trainer.sft_trainer)


def is_structlora_model(model: nn.Module) -> bool:
    return isinstance(accelerate.utils.extract_model_from_parallel(model), PeftModel)


def _extended(is_peft_model: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    if getattr(is_peft_model, "__structlora__", False):
        return is_peft_model

    @functools.wraps(is_peft_model)
    def is_peft_or_structlora_model(model: nn.Module) -> bool:
        return is_peft_model(model) or is_structlora_model(model)

    is_peft_or_structlora_model.__structlora__ = True
    return is_peft_or_structlora_model


for _module in _TRL_MODULES:
    _module.is_peft_model = _extended(_module.is_peft_model)


def _check_output_embeddings(model: nn.Module) -> None:
    """TRL's fused LM head multiplies by `lm_head.weight` directly: an adapter or a trained copy of the head
    would be ignored (the trained copy silently), so refuse as TRL does for PEFT."""
    if not is_structlora_model(model):
        return
    head = accelerate.utils.extract_model_from_parallel(model).get_output_embeddings()
    if isinstance(head, AdapterLayerMixin):
        raise ValueError(
            f"TRL computes log-probabilities from lm_head.weight directly, so the {type(head).__name__} on the "
            "output embeddings would never be used: remove the LM head from target_modules / modules_to_save")


class SFTTrainer(LoraPlusOptimizer, AdapterCheckpoints, trl.SFTTrainer):
    """`trl.SFTTrainer` for a structlora `PeftModel`; checkpoints hold only the adapter; `loraplus_lr_ratio` as
    AdapterTrainer's (LoRA+)."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        _check_output_embeddings(model)
        super().__init__(model, *args, **kwargs)


class DPOTrainer(LoraPlusOptimizer, AdapterCheckpoints, trl.DPOTrainer):
    """`trl.DPOTrainer` for a structlora `PeftModel`; the reference shares the base weights (see the module
    docstring); checkpoints hold only adapters; `loraplus_lr_ratio` as AdapterTrainer's (LoRA+)."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        _check_output_embeddings(model)
        super().__init__(model, *args, **kwargs)
