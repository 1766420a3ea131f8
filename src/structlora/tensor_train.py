"""Tensor-train (TT) matrices: the LoRETTA parameterization of a weight.

A matrix of shape (rows, cols) is stored as a tensor train over the row-major flattening of its
rows*cols entries: cores G_k of shape (r_{k-1}, n_k, r_k) with prod(n_k) == rows*cols and
r_0 = r_K = 1. This is exactly the layout of the authors' `loretta` package (their
`TensorizedLinear_module` contracts all cores and reshapes to (in_features, out_features)), so
their checkpoints load bit-for-bit.

The factor shapes n_k come from the authors' tables where they list the size (so parameter counts
reproduce the paper) and from an automatic balanced factorisation everywhere else (the reference
crashes on hidden 2048; we never do).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bank import computed
from .inference import CachedFactorsMixin, FactorCache, scaled_dense

# The authors' shape tables (loretta 0.1.0, utils/tensor_util.py): TT_SHAPES[r][hidden] factorises
# hidden*r, for the low-rank (r) and bottleneck projections of a hidden-size layer.
REFERENCE_TT_SHAPES: dict[int, dict[int, list[int]]] = {
    5: {768: [5, 8, 12, 8], 1024: [4, 8, 5, 8, 4], 1280: [4, 8, 5, 8, 5], 1536: [4, 8, 5, 8, 6],
        1600: [5, 8, 5, 8, 5], 2304: [5, 8, 8, 4, 9], 4096: [16, 16, 5, 4, 4], 5120: [5, 8, 10, 8, 8],
        8192: [4, 16, 16, 10, 4]},
    8: {768: [8, 8, 12, 8], 1024: [4, 8, 8, 8, 4], 1280: [4, 8, 8, 8, 5], 1536: [4, 8, 8, 8, 6],
        1600: [5, 8, 8, 8, 5], 2304: [8, 8, 8, 4, 9], 4096: [16, 16, 8, 4, 4], 5120: [8, 8, 10, 8, 8],
        8192: [4, 16, 16, 16, 4]},
    16: {768: [8, 16, 12, 8], 1024: [4, 8, 16, 8, 4], 1280: [4, 8, 16, 8, 5], 1536: [4, 8, 16, 8, 6],
         1600: [5, 8, 16, 8, 5], 2304: [8, 8, 8, 8, 9], 4096: [16, 16, 16, 4, 4], 5120: [8, 16, 10, 8, 8],
         8192: [4, 16, 16, 16, 8]},
    32: {768: [4, 8, 12, 8, 8], 1024: [4, 8, 16, 8, 4], 1280: [4, 8, 16, 8, 5], 1536: [4, 8, 16, 8, 6],
         1600: [5, 8, 16, 8, 5], 2304: [8, 8, 16, 8, 9], 4096: [16, 16, 16, 4, 4], 5120: [8, 16, 10, 8, 8],
         8192: [4, 16, 16, 16, 8]},
    64: {768: [8, 8, 12, 8, 8], 1024: [4, 8, 8, 8, 8, 4], 1280: [4, 8, 8, 8, 8, 5], 1536: [4, 8, 8, 8, 8, 6],
         1600: [5, 8, 8, 8, 8, 5], 2304: [8, 8, 8, 8, 8, 9], 4096: [16, 16, 16, 4, 4, 4],
         5120: [5, 8, 8, 16, 8, 8], 8192: [4, 16, 16, 16, 8, 4]},
    128: {768: [8, 16, 12, 8, 8], 1024: [4, 8, 16, 8, 8, 4], 1280: [4, 8, 16, 8, 8, 5],
          1536: [4, 8, 16, 8, 8, 6], 1600: [5, 8, 16, 8, 8, 5], 4096: [16, 16, 16, 8, 4, 4],
          5120: [5, 8, 16, 16, 8, 8], 8192: [4, 16, 16, 16, 16, 4]},
}

# The authors' shapes for the square (hidden x hidden) tensorized classifier dense layer.
REFERENCE_CLASSIFIER_TT_SHAPES: dict[int, list[int]] = {
    768: [8, 8, 12, 12, 8, 8], 1024: [4, 8, 8, 16, 8, 8, 4], 1280: [4, 4, 8, 8, 8, 8, 5, 5],
    1536: [4, 4, 8, 8, 8, 8, 6, 6], 1600: [5, 5, 8, 8, 8, 8, 5, 5], 2304: [4, 4, 8, 8, 8, 8, 9, 9],
    4096: [4, 4, 16, 16, 16, 16, 4, 4], 5120: [8, 8, 8, 10, 10, 8, 8], 8192: [4, 4, 16, 16, 16, 16, 8, 8],
}

# Target size of one mode: the tables use 4..16, so automatic shapes aim at the same range.
_TARGET_MODE_SIZE = 8.0


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(total: int) -> list[int]:
    """A balanced factorisation of `total` into modes of size ~8 (largest primes placed first).

    Works for every positive size, primes included (a prime becomes one large mode).
    """
    if total < 1:
        raise ValueError(f"cannot factorise a tensor of size {total}: it must be >= 1")
    primes = sorted(_prime_factors(total), reverse=True)
    if not primes:
        return [1]
    order = max(1, round(math.log(total) / math.log(_TARGET_MODE_SIZE)))
    order = min(order, len(primes))
    modes = [1] * order
    for p in primes:  # greedy bin packing on log-size keeps the modes balanced
        smallest = min(range(order), key=lambda i: modes[i])
        modes[smallest] *= p
    return sorted(modes, reverse=True)


def tt_shape_for(hidden: int, rank_dim: int) -> list[int]:
    """Modes for a (hidden x rank_dim) matrix: the authors' table when it lists the size, else automatic."""
    table = REFERENCE_TT_SHAPES.get(rank_dim, {})
    return list(table[hidden]) if hidden in table else factorize(hidden * rank_dim)


def classifier_tt_shape(hidden: int) -> list[int]:
    """Modes for the square tensorized classifier of a hidden-size model."""
    if hidden in REFERENCE_CLASSIFIER_TT_SHAPES:
        return list(REFERENCE_CLASSIFIER_TT_SHAPES[hidden])
    return factorize(hidden * hidden)


class TTMatrix(nn.Module):
    """A (rows x cols) matrix stored as a tensor train; `matrix()` rebuilds it (x @ matrix() layout).

    Attributes `cores` is a ParameterList of (r_{k-1}, n_k, r_k) tensors.
    """

    def __init__(self, rows: int, cols: int, shape: list[int], tensor_rank: int) -> None:
        super().__init__()
        if tensor_rank <= 0:
            raise ValueError(f"tensor_rank must be a positive integer, got {tensor_rank}")
        if math.prod(shape) != rows * cols:
            raise ValueError(
                f"tensor-train shape {shape} has {math.prod(shape)} entries but a {rows}x{cols} matrix "
                f"needs {rows * cols}; pass modes whose product is rows*cols"
            )
        self.rows, self.cols, self.shape, self.tensor_rank = rows, cols, list(shape), tensor_rank
        ranks = [1] + [tensor_rank] * (len(shape) - 1) + [1]
        self.ranks = ranks
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], n, ranks[k + 1])) for k, n in enumerate(shape)
        )
        self.reset_gaussian(target_std=math.sqrt(1.0 / (rows + cols)))

    @torch.no_grad()
    def reset_gaussian(self, target_std: float) -> None:
        """The authors' initialisation: core_k ~ N(0,1)/sqrt(r_k) * target_std**(1/order)."""
        order = len(self.cores)
        for core in self.cores:
            core.normal_().div_(math.sqrt(core.shape[-1])).mul_(target_std ** (1.0 / order))

    @torch.no_grad()
    def zero_last_core(self) -> None:
        """Make the matrix exactly zero while keeping a non-zero gradient for the zeroed core."""
        self.cores[-1].zero_()

    def matrix(self) -> torch.Tensor:
        """The full (rows x cols) matrix: this forward's banked copy (`structlora.bank`) or contracted now."""
        return computed(self)

    # -- structlora.bank: same-shaped trains of all layers are contracted in one batched chain ----------------
    def bank_key(self) -> tuple:
        first = self.cores[0]
        return ("tensor_train", self.rows, self.cols, tuple(self.ranks), tuple(self.shape), first.dtype, first.device)

    def bank_inputs(self) -> list[torch.Tensor]:
        return list(self.cores._parameters.values())  # the ParameterList's own indexing is slow per call

    def bank_compute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return contract_train(inputs, self.rows, self.cols)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, shape={self.shape}, tensor_rank={self.tensor_rank}"


def contract_train(cores: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Contract cores (*batch, r_{k-1}, n_k, r_k) into (*batch, rows, cols): matmuls over the batch dims, so one
    chain of batched products rebuilds a whole stack of same-shaped trains. Cost O(rows*cols*rank)."""
    batch = cores[0].shape[:-3]
    full = cores[0].reshape(*batch, -1, cores[0].shape[-1])
    for core in cores[1:]:
        full = (full @ core.reshape(*batch, core.shape[-3], -1)).reshape(*batch, -1, core.shape[-1])
    return full.reshape(*batch, rows, cols)


class TTLinear(CachedFactorsMixin, nn.Module):
    """A linear layer whose (in x out) weight is a tensor train, with an optional bias: y = x @ W + b.

    Used for LoRETTA_adp projections and the tensorized classifier. Without autograd the contracted weight is
    cached across forwards (`structlora.inference`).
    """

    def __init__(self, in_features: int, out_features: int, shape: list[int], tensor_rank: int,
                 bias: bool = True) -> None:
        super().__init__()
        self._factor_cache = FactorCache()
        self.in_features, self.out_features = in_features, out_features
        self.weight_tt = TTMatrix(in_features, out_features, shape, tensor_rank)
        if bias:
            bound = 1.0 / math.sqrt(out_features)  # the reference: U(-1/sqrt(out), 1/sqrt(out))
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def dense(self, dtype: torch.dtype, scaling: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """scaling·W (in x out) and scaling·b in `dtype`; without autograd, cached until a core or bias changes."""
        if torch.is_grad_enabled():
            return self._dense(dtype, scaling)
        return self._factor_cache.get(self, (dtype, scaling), lambda: self._dense(dtype, scaling))

    def _dense(self, dtype: torch.dtype, scaling: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return scaled_dense(self.weight_tt.matrix(), self.bias, scaling, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.dense(x.dtype)
        if bias is None:
            return x @ weight
        return torch.addmm(bias, x.reshape(-1, self.in_features), weight).reshape(*x.shape[:-1], self.out_features)
