"""Task vectors, the densities an analysis may override, and TIES' magnitude top-k (the
family's keep rules themselves are ops/merge_spec.py's).

All functions take float32 task vectors and return new tensors (inputs are never mutated).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..context import TensorContext
from ..params import per_expert
from .select import keep_count, topk_mask

def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τᵢ = expertᵢ − base in float32."""
    b = base.to(torch.float32)
    return [e.to(torch.float32) - b for e in experts]


def expert_densities(density: float | Sequence[float] | None, ctx: TensorContext, n: int) -> list[float]:
    """Per-expert density for this tensor: the analysis decision (TADrop) if any, else the parameter."""
    if ctx.decisions.density is not None:
        return list(ctx.decisions.density)
    return per_expert(density, n, "density")


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ⌊density·n⌋ largest |τ| (see ops.select for the tie rule)."""
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    return topk_mask(tau.abs(), keep_count(density, tau.numel()))
