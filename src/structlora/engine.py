"""The shared low-rank engine: every low-rank method (LoRA, the MTLoRA structures, LoRETTA_rep) reduces
to effective factors A_eff = T·A (R x in) and B_eff = s·B (out x R), and this module does the math.

Factors are materialised once per forward (not per token), the scaling is folded into B_eff, and the
update is accumulated into the base output with one addmm instead of separate multiply/add passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_lowrank_update(base_out: torch.Tensor, x: torch.Tensor, a_eff: torch.Tensor,
                       b_eff: torch.Tensor) -> torch.Tensor:
    """base_out + (x @ a_effᵀ) @ b_effᵀ for a dense input x (..., in)."""
    out_features = base_out.shape[-1]
    hidden = x.reshape(-1, x.shape[-1]) @ a_eff.t()
    return torch.addmm(base_out.reshape(-1, out_features), hidden, b_eff.t()).view(base_out.shape)


def add_lowrank_embedding_update(base_out: torch.Tensor, ids: torch.Tensor, a_eff: torch.Tensor,
                                 b_eff: torch.Tensor, **embedding_kwargs) -> torch.Tensor:
    """base_out + A_eff[:, ids]ᵀ @ b_effᵀ for an embedding lookup (A's columns are per-token rows)."""
    out_features = base_out.shape[-1]
    hidden = F.embedding(ids, a_eff.t(), **embedding_kwargs).reshape(-1, a_eff.shape[0])
    return torch.addmm(base_out.reshape(-1, out_features), hidden, b_eff.t()).view(base_out.shape)
