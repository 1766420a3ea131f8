"""The shared low-rank engine: every low-rank method (LoRA, the MTLoRA structures, LoRETTA_rep) reduces
to effective factors A_eff = T·A (R x in) and B_eff = s·B (out x R), and this module does the math.

Factors are materialised once per forward (not per token); on the fast path the scaling is folded into B's
cast to the compute dtype. On a plain dense projection the fast path computes base and update in one
autograd node:

    forward:  y = x·Wᵀ + b;  h = x·A_effᵀ;  y += h·B_effᵀ      (in-place accumulate, no extra output buffer)
    saves:    x (once, however many sibling projections read it) and the r-dim h, nothing of output size
    backward: dh = dy·B_eff;  dx = dy·W + dh·A_eff (one addmm, no separate add of two input-size grads)

Everything else (embeddings, dropout > 0, quantized or custom base layers) takes the generic path, which is
the same formula in plain autograd ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _DenseLowRank(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·A_effᵀ)·Bᵀ with W in (out x in) layout (a view is fine).

    A_eff and B arrive in the adapter's dtype (fp32 masters on a bf16 model) and are cast to the compute dtype
    here, with the scaling folded into B's cast: one kernel per factor instead of a scale, two casts and
    their three backward counterparts in plain autograd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_eff: torch.Tensor,
                b: torch.Tensor, scaling: float) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        a_compute = a_eff.to(x.dtype)
        b_scaled = _scaled_to(b, scaling, x.dtype)
        hidden = x2d @ a_compute.t()
        out = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        out.addmm_(hidden, b_scaled.t())
        ctx.save_for_backward(x2d, hidden, weight, a_compute, b_scaled)
        ctx.has_bias, ctx.scaling = bias is not None, scaling
        ctx.factor_dtypes = (a_eff.dtype, b.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, hidden, weight, a_compute, b_scaled = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = grad2d @ b_scaled
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad2d @ weight).addmm_(grad_hidden, a_compute).view(*grad_out.shape[:-1], x2d.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = grad2d.t() @ x2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_hidden.t() @ x2d).to(ctx.factor_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = _scaled_to(grad2d.t() @ hidden, ctx.scaling, ctx.factor_dtypes[1])
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


def _scaled_to(tensor: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scaling·tensor in `dtype`, as one kernel (the multiply writes straight into the cast's buffer)."""
    if tensor.dtype == dtype:
        return tensor if scaling == 1.0 else tensor * scaling
    return torch.mul(tensor, scaling, out=torch.empty(tensor.shape, dtype=dtype, device=tensor.device))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for this device, or None."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device with no autocast at all (meta, for shape and memory planning)
        return None
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def dense_lowrank(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_eff: torch.Tensor,
                  b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The fused base + low-rank projection x·Wᵀ + b + scaling·(x·A_effᵀ)·Bᵀ (weight in nn.Linear layout).

    The factors may be in another dtype than x (fp32 adapters on a bf16 model): they are cast inside, and their
    gradients come back in their own dtype.
    """
    device_type = x.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return _DenseLowRank.apply(x, weight, bias, a_eff, b, scaling)
    # Under autocast, cast the input and base weights up front as autocast would for a linear, then run the
    # fused node with autocast off: its in-place accumulate is not an autocast op and would otherwise mix
    # dtypes. The factors follow x inside the node.
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    with torch.autocast(device_type, enabled=False):
        return _DenseLowRank.apply(*cast, a_eff, b, scaling)


def add_lowrank_update(base_out: torch.Tensor, x: torch.Tensor, a_eff: torch.Tensor,
                       b_eff: torch.Tensor) -> torch.Tensor:
    """base_out + (x @ a_effᵀ) @ b_effᵀ for a dense input x (..., in): the generic path."""
    out_features = base_out.shape[-1]
    hidden = x.reshape(-1, x.shape[-1]) @ a_eff.t()
    return torch.addmm(base_out.reshape(-1, out_features), hidden, b_eff.t()).view(base_out.shape)


def add_lowrank_embedding_update(base_out: torch.Tensor, ids: torch.Tensor, a_eff: torch.Tensor,
                                 b_eff: torch.Tensor, **embedding_kwargs) -> torch.Tensor:
    """base_out + A_eff[:, ids]ᵀ @ b_effᵀ for an embedding lookup (A's columns are per-token rows)."""
    out_features = base_out.shape[-1]
    hidden = F.embedding(ids, a_eff.t(), **embedding_kwargs).reshape(-1, a_eff.shape[0])
    return torch.addmm(base_out.reshape(-1, out_features), hidden, b_eff.t()).view(base_out.shape)
