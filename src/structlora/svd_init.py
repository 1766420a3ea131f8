"""SVD starts: A and B of a low-rank adapter taken from the singular value decomposition of the base weight.

- PiSSA (Meng et al. 2024, `init="pissa"`, LoRA and MTLoRA): with W = U·S·Vᵀ (out x in) and scaling s,
  B₀ = U_r·√S_r / √s and A₀ = √S_r·V_rᵀ / √s, so that s·B₀·A₀ = W_r, the best rank-r approximation of W. A and B
  train from there; the model is the residual W − s·B₀·A₀ plus s·B·T·A.
- LoRA-XS (Bałazy et al. 2024, `init="lora-xs"`, MTLoRA): B = U_r and A = S_r·V_rᵀ (the authors' code puts the
  singular values on A's side), both frozen; only T (its C, and D) trains, starting at T = 0.

Where the residual lives. PEFT writes W − s·B₀·A₀ into the base weight. structlora leaves the base weight alone
and gives the adapter a frozen offset instead: ΔW = s·(B·T·A − B₀·A₀), with B₀, A₀ stored as buffers and saved with
the adapter. The model is the same function of the same trained tensors, so training follows PiSSA's (same
gradients); and because the base weights stay the base model's, `disable_adapter()` gives the base model, other
adapters on the same layers and mixed batches are unaffected, the adapter loads onto the original base model, and
`export_to_peft` writes the rank-2r LoRA relative to the original base that PEFT's `convert_pissa_to_lora`
(`path_initial_model_for_weight_conversion`) gives: A' = [T·A; A₀], B' = [s·B, −s·B₀]. The cost is a rank-2r
instead of rank-r product in the forward, and at the start the outputs equal the base model's to float rounding
(W·x + s·B·A·x − s·B₀·A₀·x; 1e-7 on the tests' models), not bit for bit. Dropout on the adapter's input would also
drop the offset, which PiSSA keeps in the weight, so PiSSA needs `lora_dropout=0` (the config refuses otherwise).
`pissa_residual` gives the residual weight PEFT would have written.

The SVD is computed in float32 on the weight's device (full SVD; PEFT's randomized `pissa_niter_N` is not
offered). Quantized weights (bitsandbytes 4/8-bit, torchao) are refused: their SVD would be that of the
dequantized weight, and PiSSA's residual could not be stored back without re-quantizing. Dequantize the model first
(`structlora.quantized.dequantize_model`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

from .distributed import any_sharded
from .names import SVD_INITS
from .quantized import describe, is_quantized

_FACTORS_FOLLOW = contextvars.ContextVar("structlora_saved_factors_follow", default=False)


@contextlib.contextmanager
def saved_factors_follow() -> Iterator[None]:
    """Inside: adapters built with an SVD start get zero factors of the right shapes instead of an SVD, because
    their saved factors (A, B and PiSSA's A₀, B₀) are loaded next (strictly: every tensor, or nothing). Loading a
    large model's adapter then costs no SVD per layer."""
    token = _FACTORS_FOLLOW.set(True)
    try:
        yield
    finally:
        _FACTORS_FOLLOW.reset(token)


def _refuse_quantized(base_layer: nn.Module) -> None:
    if is_quantized(base_layer):
        raise ValueError(
            f"an SVD start (init 'pissa' or 'lora-xs') needs the full-precision weight, but this layer is a "
            f"{describe(base_layer)}: the SVD of the quantized weight is not that of the model's weight, and the "
            f"start cannot be written back into it. Dequantize the base first (structlora.quantized."
            f"dequantize_model(model)), or use init 'default' / 'reference' on the quantized base")


def weight_out_by_in(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as the (out x in) matrix ΔW is added to, in float32: nn.Linear's as stored, Conv1D's and
    nn.Embedding's transposed (an embedding maps one-hot(num_embeddings) to embedding_dim).

    Raises:
        ValueError: a quantized weight (dequantize first), or a sharded one (DeepSpeed ZeRO-3, FSDP2).
    """
    _refuse_quantized(base_layer)
    if any_sharded([base_layer.weight]):
        raise ValueError("an SVD start (init 'pissa' or 'lora-xs') needs the whole weight, but this layer's weight is "
                         "sharded (DeepSpeed ZeRO-3 or FSDP2): add the adapter before the model is sharded")
    weight = base_layer.weight.detach()
    weight = weight if isinstance(base_layer, nn.Linear) else weight.t()
    return weight.float()


def _check_rank(shape: tuple[int, int], r: int) -> None:
    if r > min(shape):
        raise ValueError(f"an SVD start of rank r={r} needs r <= min(out, in) = {min(shape)} for a {tuple(shape)} "
                         f"weight; lower r")


def _top_singular(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (out x r), S_r (r), V_rᵀ (r x in) of `weight`."""
    _check_rank(tuple(weight.shape), r)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def svd_start(base_layer: nn.Module, in_features: int, r: int, init: str, scaling: float,
              row_blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (len(row_blocks)·r x in) and B (sum of block rows x r, blocks stacked) for `init`, from `base_layer`'s
    weight; zeros of those shapes inside `saved_factors_follow` (the weight is then not read: it may be sharded).

    `row_blocks` are the row indices of W that each B block covers: one block for an ordinary projection, one per
    enabled slice for a fused one (GPT-2's c_attn), each slice's own SVD (B is block-diagonal there).

    Raises:
        ValueError: a quantized or sharded weight, r above a block's min(out, in), or an unknown init.
    """
    if init not in SVD_INITS:
        raise ValueError(f"unknown SVD start {init!r}; valid: {', '.join(SVD_INITS)}")
    _refuse_quantized(base_layer)
    for rows in row_blocks:
        _check_rank((len(rows), in_features), r)
    device = base_layer.weight.device
    if _FACTORS_FOLLOW.get():
        return (torch.zeros(len(row_blocks) * r, in_features, device=device),
                torch.zeros(sum(map(len, row_blocks)), r, device=device))
    weight = weight_out_by_in(base_layer)
    a_blocks, b_blocks = [], []
    for rows in row_blocks:
        u, s, vh = _top_singular(weight.index_select(0, rows.to(weight.device)), r)
        if init == "pissa":
            root = (s / scaling).sqrt()
            a_blocks.append(root[:, None] * vh)
            b_blocks.append(u * root[None, :])
        else:  # lora-xs
            a_blocks.append(s[:, None] * vh)
            b_blocks.append(u)
    return torch.cat(a_blocks), torch.cat(b_blocks)


@torch.no_grad()
def pissa_residual(layer: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """W − s·B₀·A₀ (out x in, float32) of a `LowRankLayer`'s PiSSA adapter: the base weight PEFT's PiSSA would have
    written (structlora keeps W and the offset instead; see the module docstring).

    Raises:
        ValueError: the adapter is not a PiSSA one, or it is merged.
    """
    adapter = layer.adapters[adapter_name]
    offset = adapter.parameterization.initial_product()
    if offset is None:
        raise ValueError(f"adapter {adapter_name!r} is not a PiSSA adapter (init 'pissa'): it has no residual")
    if adapter_name in layer.merged_adapters:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weight: unmerge it to read the residual")
    return weight_out_by_in(layer.base_layer) - adapter.scaling * offset
