"""LoRA+ (Hayou, Ghosh & Yu 2024): B trained at `loraplus_lr_ratio` times A's learning rate.

The paper's argument is about width: A reads the width-n input, so its update moves A·x by a sum over n terms,
while B's update acts on the r-dimensional A·x; for both to learn features efficiently as n grows, B's learning
rate must be larger than A's by a factor that grows with n (in practice a ratio of 2-16).

Which tensors are "B" (the fast group):
- LoRA and MTLoRA: `lora_B`. MTLoRA's T (its C, and D) stays at the base rate, with A: T is r x r, neither of
  its dimensions grows with the width, so the argument that speeds up B says nothing about it, and a larger
  rate on T would be a plain learning-rate change of the structure, not LoRA+.
- LoRETTA_rep: the tensor-train cores that build B; A's cores stay at the base rate. Their cores are stored as one
  flat parameter per adapter (`structlora.tensor_train`); building the groups first splits that storage into one
  flat parameter per factor (`lora_A.flat_cores`, `lora_B.flat_cores`), values unchanged.
- One-dimensional trained tensors (biases, norm weights) go with B, as in the LoRA+ authors' code and PEFT's
  `create_loraplus_optimizer`; without weight decay where the Trainer would not decay them.
- Low-rank adapters on embeddings (A and B) train at `loraplus_lr_embedding` (default 1e-6), as PEFT's.
- Everything else trained (A, T, tensor-train cores of A, heads' matrices, modules_to_save) at the base rate.

An adapter with no trained B (LoRA-XS: A and B frozen; bottleneck adapters) is refused: the ratio would change
nothing the user asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import LowRankLayer
from .parameterizations import TensorTrainLowRank
from .tensor_train import FLAT_CORES

LORAPLUS_GROUPS = ("A", "B", "B_no_decay", "embedding")


def check_loraplus_lr_ratio(value: Any) -> float:
    """The ratio as a float, or a ValueError naming what is valid (a finite number > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"loraplus_lr_ratio must be a positive number (B's learning rate over A's, e.g. 16), "
                         f"got {value!r}")
    return float(value)


def _embedding_adapter_parameters(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LowRankLayer) and module.kind == "embedding":
            ids.update(id(p) for p in module.adapters.parameters())
    return ids


def _is_b_factor(name: str) -> bool:
    return ".lora_B" in name or name.startswith("lora_B")


def loraplus_parameter_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, weight_decay: float = 0.0,
                              loraplus_lr_embedding: float = 1e-6, decay_parameter_names: set[str] | None = None
                              ) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for LoRA+ (see the module docstring), each with a `name` from
    LORAPLUS_GROUPS, its `params`, `lr` and `weight_decay`; empty groups are left out.

    Args:
        model: the PeftModel (or any module) whose trainable parameters are grouped.
        lr: the base learning rate (A's).
        loraplus_lr_ratio: B's learning rate over A's (> 0).
        weight_decay: for every group but B_no_decay.
        loraplus_lr_embedding: the learning rate of low-rank adapters on embeddings.
        decay_parameter_names: the trainable names that are decayed (Trainer's `get_decay_parameter_names`);
            None: every parameter of more than one dimension.
    Raises:
        ValueError: a ratio that is not a positive number, or no trainable B factor in the model.
    """
    check_loraplus_lr_ratio(loraplus_lr_ratio)
    for module in model.modules():
        if isinstance(module, TensorTrainLowRank):
            module.store_factors_apart()  # one flat parameter per factor, so that each gets its rate
    embedding_ids = _embedding_adapter_parameters(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in LORAPLUS_GROUPS}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        matrix = parameter.ndim > 1 or name.endswith("." + FLAT_CORES)  # flat tensor-train cores are factors
        decayed = matrix if decay_parameter_names is None else name in decay_parameter_names
        if id(parameter) in embedding_ids:
            groups["embedding"].append(parameter)
        elif _is_b_factor(name) or not matrix:
            groups["B" if decayed else "B_no_decay"].append(parameter)
        else:
            groups["A"].append(parameter)
    if not any(_is_b_factor(name) and p.requires_grad for name, p in model.named_parameters()):
        raise ValueError("LoRA+ (loraplus_lr_ratio) speeds up the low-rank B factors, but this model trains none "
                         "(LoRA-XS freezes A and B; bottleneck adapters have no B): the ratio would change nothing. "
                         "Leave loraplus_lr_ratio unset")
    settings = {"A": (lr, weight_decay), "B": (lr * loraplus_lr_ratio, weight_decay),
                "B_no_decay": (lr * loraplus_lr_ratio, 0.0), "embedding": (loraplus_lr_embedding, weight_decay)}
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer],
                              optimizer_kwargs: dict[str, Any], loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6,
                              decay_parameter_names: set[str] | None = None) -> torch.optim.Optimizer:
    """An optimizer over LoRA+'s parameter groups (PEFT's `create_loraplus_optimizer` signature).

    Args:
        model: the PeftModel to train.
        optimizer_cls: the optimizer class, e.g. torch.optim.AdamW.
        optimizer_kwargs: its keyword arguments: `lr` (the base, A's, learning rate; required), `weight_decay`, ….
        loraplus_lr_ratio: B's learning rate over A's.
        loraplus_lr_embedding: the learning rate of low-rank adapters on embeddings.
        decay_parameter_names: as loraplus_parameter_groups'.
    Raises:
        ValueError: no `lr`, or as loraplus_parameter_groups.
    """
    kwargs = dict(optimizer_kwargs)
    if "lr" not in kwargs:
        raise ValueError("create_loraplus_optimizer needs optimizer_kwargs['lr'], the base (A) learning rate")
    lr, weight_decay = kwargs.pop("lr"), kwargs.pop("weight_decay", 0.0)
    groups = loraplus_parameter_groups(model, lr, loraplus_lr_ratio, weight_decay, loraplus_lr_embedding,
                                       decay_parameter_names)
    return optimizer_cls(groups, lr=lr, **kwargs)
