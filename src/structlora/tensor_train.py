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
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .bank import computed
from .distributed import DTensor, distribute_tensor
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


# The parameter that holds tensor-train cores, flattened and concatenated (see `TTMatrix`).
FLAT_CORES = "flat_cores"


@dataclass(eq=False)
class _CoreHome:
    """Where a train's cores live: `owner`'s FLAT_CORES parameter, from `offset` on. A plain object (not a
    registered module), so that the owner is not a second parent of the train; deepcopy maps it to the copy."""

    owner: nn.Module
    offset: int


class TTMatrix(nn.Module):
    """A (rows x cols) matrix stored as a tensor train; `matrix()` rebuilds it (x @ matrix() layout).

    `cores` are the (r_{k-1}, n_k, r_k) tensors, as views of ONE flat parameter (`flat_cores`): the train's own, or,
    after `share_flat_cores(owner)`, its owner's, which holds the cores of all the owner's trains (LoRETTA_rep: A
    and B of one adapter). An optimizer then walks one tensor per adapter instead of one per core (a 7B model's
    2,240 cores were 2,240 tiny tensors, each with its own AdamW bookkeeping on the host). The views are sliced
    from the current parameter on every access, so `.to()`, FSDP's swapped parameters and `functional_call` are
    always seen. `state_dict()` keeps one tensor per core, named `cores.<k>` under the train as before (the
    authors' layout), and `load_state_dict()` accepts those names.
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
        self.core_shapes = [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(shape)]
        self.core_sizes = [math.prod(core_shape) for core_shape in self.core_shapes]
        self._home = _CoreHome(self, 0)
        self.flat_cores = nn.Parameter(torch.empty(sum(self.core_sizes)))
        _keep_per_core_state(self)
        self.reset_gaussian(target_std=math.sqrt(1.0 / (rows + cols)))

    @property
    def numel_cores(self) -> int:
        return sum(self.core_sizes)

    @property
    def core_storage(self) -> nn.Parameter:
        """The flat parameter that holds the cores (the train's own, or its owner's); gradients accumulate there."""
        return self._home.owner._parameters[FLAT_CORES]

    @property
    def cores(self) -> list[torch.Tensor]:
        """The cores, as views of `core_storage` (in-place writes reach it; `core_views(core_storage.grad)` are
        their gradients)."""
        return self.core_views(self.core_storage)

    def core_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """This train's cores in `flat` (*batch, owner's flat size): (*batch, r_{k-1}, n_k, r_k) views."""
        batch, start, views = flat.shape[:-1], self._home.offset, []
        for core_shape, size in zip(self.core_shapes, self.core_sizes):
            views.append(flat.narrow(-1, start, size).view(*batch, *core_shape))
            start += size
        return views

    @torch.no_grad()
    def reset_gaussian(self, target_std: float) -> None:
        """The authors' initialisation: core_k ~ N(0,1)/sqrt(r_k) * target_std**(1/order)."""
        cores = self.cores
        for core in cores:
            core.normal_().div_(math.sqrt(core.shape[-1])).mul_(target_std ** (1.0 / len(cores)))

    @torch.no_grad()
    def zero_last_core(self) -> None:
        """Make the matrix exactly zero while keeping a non-zero gradient for the zeroed core."""
        self.cores[-1].zero_()

    def matrix(self) -> torch.Tensor:
        """The full (rows x cols) matrix: this forward's banked copy (`structlora.bank`) or contracted now."""
        return computed(self)

    # -- structlora.bank: same-shaped trains of all layers are contracted in one batched chain ----------------
    # The input is the whole flat parameter (one tensor to fingerprint and stack, and a sharded one is left whole:
    # the bank sees it is sharded without slicing it); the compute slices this train's cores out of it.
    def bank_key(self) -> tuple:
        flat = self.core_storage
        return ("tensor_train", self.rows, self.cols, tuple(self.ranks), tuple(self.shape), flat.shape[-1],
                self._home.offset, flat.dtype, flat.device)

    def bank_inputs(self) -> list[torch.Tensor]:
        return [self.core_storage]

    def bank_compute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return contract_train(self.core_views(inputs[0]), self.rows, self.cols)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, shape={self.shape}, tensor_rank={self.tensor_rank}"


def owned_trains(owner: nn.Module) -> list[tuple[str, TTMatrix]]:
    """(name relative to `owner`, train) for every train whose cores `owner`'s flat parameter holds, in order."""
    return [(name, module) for name, module in owner.named_modules()
            if isinstance(module, TTMatrix) and module._home.owner is owner]


def core_tensors(owner: nn.Module, flat: torch.Tensor | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """{prefix + "<train>.cores.<k>": core} for the trains `owner` holds: views of `flat` (default: its parameter)."""
    flat = owner._parameters[FLAT_CORES] if flat is None else flat
    return {f"{prefix}{name + '.' if name else ''}cores.{k}": core
            for name, train in owned_trains(owner) for k, core in enumerate(train.core_views(flat))}


def _core_layout(owner: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """core_tensors' keys and shapes (meta tensors), whatever `owner`'s parameter holds now (a partition, say)."""
    size = sum(train.numel_cores for _, train in owned_trains(owner))
    return core_tensors(owner, torch.empty(size, device="meta"), prefix)


def parameter_values(module: nn.Module, state: dict[str, torch.Tensor],
                     prefix: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, its value) for every parameter and persistent buffer of `module` (an SVD start's frozen factors are
    buffers), from `state` keyed as `module.state_dict()` with `prefix`: a flat core parameter's value is its cores
    joined (the inverse of the per-core state dict)."""
    for name, sub in module.named_modules():
        sub_prefix = prefix + (f"{name}." if name else "")
        for buffer_name, buffer in sub._buffers.items():
            if buffer is not None and buffer_name not in sub._non_persistent_buffers_set:
                yield buffer, state[sub_prefix + buffer_name]
        for parameter_name, parameter in sub._parameters.items():
            if parameter is None:
                continue
            if parameter_name == FLAT_CORES:
                yield parameter, torch.cat([state[key].reshape(-1) for key in _core_layout(sub, sub_prefix)])
            else:
                yield parameter, state[sub_prefix + parameter_name]


@torch.no_grad()
def share_flat_cores(owner: nn.Module) -> None:
    """Move the cores of every TTMatrix inside `owner` into one flat parameter of `owner` (`flat_cores`), values
    unchanged; the trains' own flat parameters are removed. State dicts keep one tensor per core."""
    trains = [module for module in owner.modules() if isinstance(module, TTMatrix)]
    flat = torch.cat([core.reshape(-1) for train in trains for core in train.cores])
    offset = 0
    for train in trains:
        train._parameters.pop(FLAT_CORES, None)
        train._home = _CoreHome(owner, offset)
        offset += train.numel_cores
    owner.flat_cores = nn.Parameter(flat)
    if not getattr(owner, "_keeps_per_core_state", False):
        _keep_per_core_state(owner)


def _keep_per_core_state(owner: nn.Module) -> None:
    owner.register_state_dict_post_hook(_per_core_state)
    owner.register_load_state_dict_pre_hook(_joined_cores)
    owner._keeps_per_core_state = True


def _per_core_state(owner: nn.Module, state: dict, prefix: str, _metadata: Any) -> None:
    """state_dict hook: the flat parameter's entry becomes one entry per core (the authors' names)."""
    flat = state.get(prefix + FLAT_CORES)
    if flat is None:  # no longer holds cores (share_flat_cores moved them to an owner)
        return
    if isinstance(flat, DTensor):  # FSDP2 outside the forward: the per-core views of the whole (a collective)
        flat = flat.full_tensor()
    if flat.shape[-1] != sum(train.numel_cores for _, train in owned_trains(owner)):
        return  # a ZeRO-3 partition outside its gather holds no whole core: it keeps its parameter's name
    del state[prefix + FLAT_CORES]
    state.update(core_tensors(owner, flat, prefix))


def _joined_cores(owner: nn.Module, state: dict, prefix: str, _metadata: Any, _strict: bool,
                  _missing: list[str], _unexpected: list[str], errors: list[str]) -> None:
    """load_state_dict hook: per-core entries become the flat parameter's entry (when all are there and fit)."""
    target = owner._parameters.get(FLAT_CORES)
    if target is None:
        return
    expected = _core_layout(owner, prefix)
    if not all(key in state for key in expected):
        return  # left for load_state_dict to report: FLAT_CORES missing, the cores present unexpected
    for key, core in expected.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != core.shape:
            errors.append(f"size mismatch for {key}: copying a param with shape "
                          f"{tuple(getattr(state[key], 'shape', ()))}, the shape in current model is "
                          f"{tuple(core.shape)}.")
            return
    flat = torch.cat([state.pop(key).reshape(-1).to(target.dtype) for key in expected])
    if isinstance(target, DTensor):
        flat = distribute_tensor(flat.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    state[prefix + FLAT_CORES] = flat


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
            self._factor_cache.used_with_grad()
            return self._dense(dtype, scaling)
        return self._factor_cache.get(self, (dtype, scaling), lambda: self._dense(dtype, scaling))

    def _dense(self, dtype: torch.dtype, scaling: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return scaled_dense(self.weight_tt.matrix(), self.bias, scaling, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.dense(x.dtype)
        if bias is None:
            return x @ weight
        return torch.addmm(bias, x.reshape(-1, self.in_features), weight).reshape(*x.shape[:-1], self.out_features)
