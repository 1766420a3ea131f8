"""Trainable norms that keep less for the backward.

LoRETTA trains the model's norms (`train_norms`). Llama-family RMSNorms are written in plain ops, so once their
weight is trainable autograd keeps, per norm call, an fp32 copy of the input and the normalised output in the
model dtype: 3x the input's size in bf16 (65 norm calls on Llama-2-7B: about 6 GiB at batch 4 x 1024).
`LeanRMSNorm` computes the same function in one autograd node that keeps only the input and the per-token
reciprocal RMS, and recomputes the rest in the backward (one cheap elementwise pass). Without autograd
(evaluation, generation) it is transformers' computation itself, with no autograd Function around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# transformers classes whose forward is exactly Llama's:
#   weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
# (Gemma's (1 + w) and OLMo-2's cast-after-multiply are different functions and keep the plain copy.)
# tests/test_norms.py checks every name here against the installed transformers.
LLAMA_STYLE_RMSNORMS = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Phi3RMSNorm", "GraniteRMSNorm",
})


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        width = x.shape[-1]
        x32, grad32 = x.float(), grad_out.float()  # no copies in fp32
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            # Σ over tokens of grad·x·rstd: the per-token rstd times grad·x as one vector-matrix product.
            grad_weight = (rstd.reshape(1, -1) @ (grad32 * x32).reshape(-1, width)).reshape(width).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of x·rsqrt(mean(x²) + eps), per token: rstd·g − x·rstd³·mean(g·x), g = grad·weight; in place
            # on one buffer (4 passes over it instead of the 9 of the plain-ops backward).
            scaled = grad32 * weight
            coefficient = (scaled * x32).sum(-1, keepdim=True).mul_(rstd.pow(3))
            grad_x = scaled.mul_(rstd).addcmul_(x32, coefficient, value=-1.0 / width).to(x.dtype)
        return grad_x, grad_weight, None


class LeanRMSNorm(nn.Module):
    """A Llama-style RMSNorm with the same parameter (`weight`) and the same outputs, and less saved memory."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
        return llama_rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), as transformers' Llama computes it.

    In fp32 the casts are no-ops and `F.rms_norm` is these same operations in one call (tests/test_norms.py
    checks it is equal); in other dtypes it rounds once where Llama rounds twice, so the ops are spelled out.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def lean_norm_copy(module: nn.Module) -> nn.Module | None:
    """A LeanRMSNorm computing the same as `module`, or None when `module` is not a known Llama-style RMSNorm."""
    if type(module).__name__ not in LLAMA_STYLE_RMSNORMS:
        return None
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return None
    return LeanRMSNorm(weight, eps)
