"""How each method produces its factors. A parameterization owns the trainable tensors and returns the
effective matrices A (R x in), T (R x R, or None for the identity) and B (out x R); the engine
(`structlora.engine`) and the layers do the rest.

For a fused projection of k slices (GPT-2 `c_attn` = q,k,v) with e enabled slices, R = e·r: A maps the
input to the concatenated rank space, T (MTLoRA) mixes the whole e·r space as in the authors' GPT-2
code, and B is block-diagonal (one out_slice x r block per enabled slice, rows scattered into the
enabled slices).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bank import computed
from .config import LoraConfig, LorettaRepConfig, MTLoraConfig
from .tensor_train import TTMatrix, core_tensors, share_flat_cores, tt_shape_for


# MTLoRA structures whose T uses a second r x r matrix D besides C.
STRUCTURES_WITH_D = ("ctcm", "dtsm")


class LowRankParameterization(nn.Module):
    """Base class: subclasses define `a_matrix()`, `b_blocks()` and optionally `t_matrix()`."""

    def __init__(self, in_features: int, out_features: int, r: int, enabled_slices: list[bool]) -> None:
        super().__init__()
        n_slices = len(enabled_slices)
        if out_features % n_slices != 0:
            raise ValueError(
                f"enable_lora has {n_slices} slices, which does not divide out_features={out_features}; "
                f"use a list whose length divides {out_features}"
            )
        if not any(enabled_slices):
            raise ValueError("enable_lora enables no slice; enable at least one (e.g. [True, False, True])")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.enabled_slices = list(enabled_slices)
        self.slice_size = out_features // n_slices
        self.n_enabled = sum(enabled_slices)
        self.rank_dim = self.n_enabled * r
        self.is_fused = n_slices > 1
        if self.is_fused:
            rows = [torch.arange(i * self.slice_size, (i + 1) * self.slice_size)
                    for i, on in enumerate(enabled_slices) if on]
            self.register_buffer("enabled_rows", torch.cat(rows), persistent=False)

    # -- to override -----------------------------------------------------------------------------------
    def a_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def b_blocks(self) -> list[torch.Tensor]:
        """One (slice_size x r) block per enabled slice (a single (out x r) block when unfused)."""
        raise NotImplementedError

    def t_matrix(self) -> torch.Tensor | None:
        return None

    # -- shared ------------------------------------------------------------------------------------------
    def b_matrix(self) -> torch.Tensor:
        blocks = self.b_blocks()
        if not self.is_fused:
            return blocks[0]
        dense = torch.block_diag(*blocks)  # (out_enabled x R)
        full = dense.new_zeros(self.out_features, self.rank_dim)
        return full.index_copy(0, self.enabled_rows, dense)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return self.a_matrix(), self.t_matrix(), self.b_matrix()

    def unscaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T·A, B): the fused path scales B while casting it to the compute dtype."""
        a, t, b = self.factors()
        return (a if t is None else t @ a), b

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) as stored parameters when the method computes nothing from them (plain LoRA, one slice),
        else None."""
        return None

    def effective_factors(self, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(T·A, s·B): what the engine multiplies with."""
        a_eff, b = self.unscaled_factors()
        return a_eff, b * scaling

    def raw_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters()}


def _kaiming_uniform(rows: int, cols: int) -> nn.Parameter:
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


class DenseLowRank(LowRankParameterization):
    """LoRA (T = I) and MTLoRA (T = C, C·Cᵀ, C·D or C+D) with dense A and B."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig,
                 enabled_slices: list[bool]) -> None:
        super().__init__(in_features, out_features, config.r, enabled_slices)
        self.lora_A = _kaiming_uniform(self.rank_dim, in_features)
        self.lora_B = nn.Parameter(torch.zeros(self.n_enabled * self.slice_size, self.r))
        self.structure = getattr(config, "structure", None)
        if self.structure is not None:
            self._init_transform(config.structure, config.init)

    def _init_transform(self, structure: str, init: str) -> None:
        size = self.rank_dim
        needs_d = structure in STRUCTURES_WITH_D
        if init == "reference":
            self.lora_C = _kaiming_uniform(size, size)
            if needs_d:
                self.lora_D = _kaiming_uniform(size, size)
            return
        # identity: T = I exactly (icfm: C·Cᵀ = I; dtsm: I/2 + I/2)
        half = 0.5 if structure == "dtsm" else 1.0
        self.lora_C = nn.Parameter(torch.eye(size) * half)
        if needs_d:
            self.lora_D = nn.Parameter(torch.eye(size) * half)

    def a_matrix(self) -> torch.Tensor:
        return self.lora_A

    def b_blocks(self) -> list[torch.Tensor]:
        if not self.is_fused:
            return [self.lora_B]
        return list(self.lora_B.split(self.slice_size, dim=0))

    def t_matrix(self) -> torch.Tensor | None:
        if self.structure is None:
            return None
        return _transform(self.structure, *self._transform_parameters())

    def _transform_parameters(self) -> list[torch.Tensor]:
        """C, and D for the structures that have one: what T is made of."""
        return [self.lora_C] + ([self.lora_D] if self.structure in STRUCTURES_WITH_D else [])

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.structure is not None or self.is_fused:
            return None
        return self._parameters["lora_A"], self._parameters["lora_B"]

    def unscaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # T·A is this forward's banked slice when the bank holds a current one (structlora.bank).
        return (self.lora_A if self.structure is None else computed(self)), self.b_matrix()

    # -- structlora.bank: T·A of the same projection in all layers in one batched chain -------------------
    def bank_key(self) -> tuple | None:
        if self.structure is None:
            return None  # plain LoRA: A is used as it is
        return ("mtlora", self.structure, tuple(self.lora_A.shape), self.lora_A.dtype, self.lora_A.device)

    def bank_inputs(self) -> list[torch.Tensor]:
        return [self.lora_A, *self._transform_parameters()]

    def bank_compute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        a, *transform_parameters = inputs
        return _transform(self.structure, *transform_parameters) @ a


def _transform(structure: str, c: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """T from C (and D), for one matrix or a stack of them."""
    if structure == "shim":
        return c
    if structure == "icfm":
        return c @ c.mT
    if structure == "ctcm":
        return c @ d
    return c + d  # dtsm


class TensorTrainLowRank(LowRankParameterization):
    """LoRETTA_rep: A (in → R) and each B block (r → slice) are tensor trains.

    The cores of all of them are views of one flat parameter (`flat_cores`, see `structlora.tensor_train`): one
    trainable tensor per adapted module, as LoRA's A and B are two.
    """

    def __init__(self, in_features: int, out_features: int, config: LorettaRepConfig,
                 enabled_slices: list[bool]) -> None:
        super().__init__(in_features, out_features, config.r, enabled_slices)
        rank = config.tensor_rank
        # x @ W layouts, as the reference: A is (in x R), each B block (r x slice).
        self.lora_A = TTMatrix(in_features, self.rank_dim, tt_shape_for(in_features, self.rank_dim), rank)
        self.lora_B = nn.ModuleList(
            TTMatrix(self.r, self.slice_size, tt_shape_for(self.slice_size, self.r), rank)
            for _ in range(self.n_enabled)
        )
        if config.init == "default":
            for block in self.lora_B:
                block.zero_last_core()
        share_flat_cores(self)

    def a_matrix(self) -> torch.Tensor:
        return self.lora_A.matrix().t()

    def b_blocks(self) -> list[torch.Tensor]:
        return [block.matrix().t() for block in self.lora_B]

    def raw_parameters(self) -> dict[str, torch.Tensor]:
        return core_tensors(self)  # per core, named as in the state dict (lora_A.cores.0, ...)


def make_parameterization(in_features: int, out_features: int, config: LoraConfig,
                          enabled_slices: list[bool]) -> LowRankParameterization:
    if isinstance(config, LorettaRepConfig):
        return TensorTrainLowRank(in_features, out_features, config, enabled_slices)
    if isinstance(config, (MTLoraConfig, LoraConfig)):
        return DenseLowRank(in_features, out_features, config, enabled_slices)
    raise TypeError(f"no low-rank parameterization for {type(config).__name__}")
