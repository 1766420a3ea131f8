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
from .distributed import DTensor
from .svd_init import svd_start
from .tensor_train import FLAT_CORES, TTMatrix, share_flat_cores, tt_shape_for


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

    def initial_product(self) -> torch.Tensor | None:
        """B₀·A₀ (out x in), the frozen start a PiSSA adapter subtracts (ΔW = s·(B·T·A − B₀·A₀)); None otherwise."""
        return None

    # -- shared ------------------------------------------------------------------------------------------
    def b_matrix(self) -> torch.Tensor:
        return self._scatter_blocks(self.b_blocks())

    def _scatter_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The (out x R) B of per-slice blocks: the block itself when unfused, else block-diagonal with its rows
        scattered into the enabled slices."""
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
        """The stored tensors: trained parameters and saved frozen buffers (LoRA-XS's A and B, PiSSA's A₀, B₀)."""
        return dict(self.state_dict(keep_vars=True))

    def _slice_rows(self) -> list[torch.Tensor]:
        """The output rows each B block covers (one block unless fused)."""
        size = self.slice_size
        return [torch.arange(i * size, (i + 1) * size) for i, on in enumerate(self.enabled_slices) if on]


def _kaiming_uniform(rows: int, cols: int) -> nn.Parameter:
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


class DenseLowRank(LowRankParameterization):
    """LoRA (T = I) and MTLoRA (T = C, C·Cᵀ, C·D or C+D) with dense A and B: A Kaiming-uniform, B zero
    (Kaiming-uniform too with init_lora_weights=False)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig,
                 enabled_slices: list[bool], base_layer: nn.Module | None = None) -> None:
        super().__init__(in_features, out_features, config.r, enabled_slices)
        self.structure = getattr(config, "structure", None)
        self._init_factors(config, base_layer)
        if self.structure is not None:
            self._init_transform(config.structure, config.init)

    def _init_factors(self, config: LoraConfig, base_layer: nn.Module | None) -> None:
        self.lora_A = _kaiming_uniform(self.rank_dim, self.in_features)
        rows = self.n_enabled * self.slice_size
        # init_lora_weights=False (PEFT's): B drawn as A is, so ΔW is not zero at the start.
        self.lora_B = nn.Parameter(torch.zeros(rows, self.r)) if config.init_lora_weights else _kaiming_uniform(
            rows, self.r)

    def _init_transform(self, structure: str, init: str) -> None:
        size = self.rank_dim
        needs_d = structure in STRUCTURES_WITH_D
        if init == "reference":
            self.lora_C = _kaiming_uniform(size, size)
            if needs_d:
                self.lora_D = _kaiming_uniform(size, size)
            return
        # identity (and PiSSA's start): T = I exactly (icfm: C·Cᵀ = I; dtsm: I/2 + I/2)
        half = 0.5 if structure == "dtsm" else 1.0
        self.lora_C = nn.Parameter(torch.eye(size) * half)
        if needs_d:
            self.lora_D = nn.Parameter(torch.eye(size) * half)

    def a_matrix(self) -> torch.Tensor:
        return self.lora_A

    def b_blocks(self) -> list[torch.Tensor]:
        return self._blocks(self.lora_B)

    def _blocks(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        return [stacked] if not self.is_fused else list(stacked.split(self.slice_size, dim=0))

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


class PissaLowRank(DenseLowRank):
    """PiSSA's start (`structlora.svd_init`): A, B from the top-r singular vectors of W (s·B₀·A₀ = W_r), kept as frozen
    buffers A₀, B₀ and subtracted: ΔW = s·(B·T·A − B₀·A₀), T = I at the start (MTLoRA's identity init)."""

    def _init_factors(self, config: LoraConfig, base_layer: nn.Module | None) -> None:
        a, b = _svd_start(self, config, base_layer)
        self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        self.register_buffer("lora_A_initial", a.clone())
        self.register_buffer("lora_B_initial", b.clone())

    def initial_product(self) -> torch.Tensor:
        return self._scatter_blocks(self._blocks(self.lora_B_initial)) @ self.lora_A_initial

    def stored_factors(self) -> None:
        return None  # the start is subtracted: nothing is used as stored

    def unscaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[T·A; A₀] and [B, −B₀]: rank 2R, the start subtracted in the same product."""
        a_eff, b = super().unscaled_factors()
        b_initial = self._scatter_blocks(self._blocks(self.lora_B_initial))
        return torch.cat([a_eff, self.lora_A_initial]), torch.cat([b, -b_initial], dim=1)


class LoraXSLowRank(DenseLowRank):
    """LoRA-XS (`structlora.svd_init`): A = Σ_r·V_rᵀ and B = U_r from the SVD of W as frozen buffers (no requires_grad
    switch can train them); only T trains, from T = 0 with a non-zero gradient: shim C = 0; ctcm C·D with C = 0,
    D = I; dtsm C + D with both 0. (icfm's C·Cᵀ is refused by the config: its gradient at C = 0 is 0.)"""

    def _init_factors(self, config: LoraConfig, base_layer: nn.Module | None) -> None:
        a, b = _svd_start(self, config, base_layer)
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)

    def _init_transform(self, structure: str, init: str) -> None:
        size = self.rank_dim
        self.lora_C = nn.Parameter(torch.zeros(size, size))
        if structure in STRUCTURES_WITH_D:
            self.lora_D = nn.Parameter(torch.eye(size) if structure == "ctcm" else torch.zeros(size, size))


def _svd_start(parameterization: DenseLowRank, config: LoraConfig, base_layer: nn.Module | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if base_layer is None:
        raise ValueError(f"init {config.init!r} needs the base layer whose weight it decomposes")
    a, b = svd_start(base_layer, parameterization.in_features, config.r, config.init, config.scaling,
                     parameterization._slice_rows())
    return a.contiguous(), b.contiguous()


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
        if config.init == "default" and config.init_lora_weights:  # False: B's last core stays drawn, ΔW ≠ 0
            for block in self.lora_B:
                block.zero_last_core()
        share_flat_cores(self)

    def a_matrix(self) -> torch.Tensor:
        return self.lora_A.matrix().t()

    def b_blocks(self) -> list[torch.Tensor]:
        return [block.matrix().t() for block in self.lora_B]

    def raw_parameters(self) -> dict[str, torch.Tensor]:
        # Per core, named as in the state dict (lora_A.cores.0, ...), wherever the flat storage lives.
        return {f"{name}.cores.{k}": core for name, train in self.named_modules() if isinstance(train, TTMatrix)
                for k, core in enumerate(train.cores)}

    @torch.no_grad()
    def store_factors_apart(self) -> None:
        """Keep A's cores and B's cores in two flat parameters (`lora_A.flat_cores`, `lora_B.flat_cores`) instead of
        one, so that an optimizer can give the two factors different learning rates (LoRA+): two trainable tensors
        per adapted module, as LoRA's. Values, gradients' meaning and the state dict's per-core names are unchanged.
        Call it before the optimizer is built (its parameters are replaced)."""
        shared = self._parameters.get(FLAT_CORES)
        if shared is None:
            return  # already apart
        if isinstance(shared, DTensor):
            raise ValueError("LoRETTA_rep's tensor-train cores are sharded (FSDP2): their storage cannot be split by "
                             "factor now; build the LoRA+ optimizer before sharding the model, or train without "
                             "loraplus_lr_ratio")
        share_flat_cores(self.lora_A)
        share_flat_cores(self.lora_B)
        del self._parameters[FLAT_CORES]
        for owner in (self.lora_A, self.lora_B):
            owner.flat_cores.requires_grad_(shared.requires_grad)


def make_parameterization(in_features: int, out_features: int, config: LoraConfig,
                          enabled_slices: list[bool], base_layer: nn.Module | None = None) -> LowRankParameterization:
    """The parameterization `config` describes; `base_layer` (the adapted module) is read by SVD starts only."""
    if isinstance(config, LorettaRepConfig):
        return TensorTrainLowRank(in_features, out_features, config, enabled_slices)
    if isinstance(config, (MTLoraConfig, LoraConfig)):
        strategy = {"pissa": PissaLowRank, "lora-xs": LoraXSLowRank}.get(config.init, DenseLowRank)
        return strategy(in_features, out_features, config, enabled_slices, base_layer)
    raise TypeError(f"no low-rank parameterization for {type(config).__name__}")
