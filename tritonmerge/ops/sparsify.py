"""Sparsification of task vectors: magnitude top-k, breadcrumbs, DARE and DELLA drops, rescaling.

All functions take float32 task vectors and return new tensors (inputs are never mutated).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from ..context import TensorContext
from ..params import per_expert
from . import rng
from .select import keep_count, topk_mask

Rescale = Literal["keep_prob", "l1", "none"]


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


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (mergekit's per-tensor rule): drop the ⌊γ·n⌋ largest |τ| (outliers) and
    the smallest ones, keeping ⌊density·n⌋ in the middle. When density + γ > 1 fewer outliers
    are dropped so that the density is met. Unlike mergekit, γ·n < 1 drops no outliers (mergekit's
    empty slice would zero the whole tensor)."""
    n = tau.numel()
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    keep = keep_count(density, n)
    n_top = min(int(gamma * n), n - keep)
    magnitude = tau.abs()
    below_outliers = ~topk_mask(magnitude, n_top) if n_top > 0 else torch.ones_like(tau, dtype=torch.bool)
    return topk_mask(magnitude, keep + n_top) & below_outliers


def bernoulli_mask(
    tau: torch.Tensor, keep_prob: float | torch.Tensor, seed: int, ctx: TensorContext, expert: int
) -> torch.Tensor:
    """Keep each entry with probability ``keep_prob`` (scalar or per entry), from the counter-based
    stream of (seed, tensor name, expert): independent of processing order and chunking."""
    u = rng.uniform(tau.numel(), seed, ctx.name, expert, offset=ctx.element_offset, device=tau.device)
    return (u.view(tau.shape) < keep_prob)


def della_keep_prob(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune probabilities: within each row (a 1-D tensor is one row), rank |τ|
    ascending, normalise ranks to [0, 1] and keep with probability density − ε + 2ε·rank."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.flatten(1)
    width = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    rank_norm = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + 2 * epsilon * rank_norm).reshape(tau.shape)


def rescale(
    tau: torch.Tensor, mask: torch.Tensor, mode: Rescale, keep_prob: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Apply a mask and rescale what is kept.

    keep_prob: divide each kept entry by its keep probability (DARE's 1/density; DELLA paper).
    l1:        match the L1 norm of the unmasked tensor (mergekit's current rule).
    none:      only mask.
    """
    masked = torch.where(mask, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    if mode == "none":
        return masked
    if mode == "keep_prob":
        if keep_prob is None:
            raise ValueError("keep_prob rescaling needs the keep probabilities")
        return masked / keep_prob
    before = tau.abs().sum(dtype=torch.float64)
    after = masked.abs().sum(dtype=torch.float64)
    if before < 1e-7 or after < 1e-7:  # mergekit's guard: nothing meaningful to match
        return masked
    return masked * float(before / after)
