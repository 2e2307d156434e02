"""Reinforced Agent Merging (RAM, arXiv 2601.13572) and its tensor-local RAM+ variant, with
mergekit 0.1.5's per-tensor semantics (arcee-ai/mergekit merge_methods/ram.py).

With τᵢ = expertᵢ − base and an entry counted for expert i where |τᵢ| > ε, let c be the number
of experts counted at an entry. RAM keeps an entry that one expert alone changes and averages
the ones several change, instead of diluting unique updates by the number of experts:

    out = base + Σᵢ [c = 1]·τᵢ + [c > 1]·[|τᵢ| > ε]·τᵢ / c

RAM+ (tensor-local) also boosts each expert's unique entries by λᵢ = 1 + r·clamp(ρᵢ, 0, α),
where ρᵢ = (its shared entries) / max(its unique entries, ε), counted over this tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from ..context import TensorContext
from ..params import MethodParams
from ..registry import MergeMethod, register

_EPSILON_DOC = "an entry counts for an expert where |τ| exceeds it"


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0, description=_EPSILON_DOC)


class RamPlusParams(MethodParams):
    r: float = Field(0.1, description="strength of the boost of an expert's unique entries")
    alpha: float = Field(0.2, ge=0, description="cap on the shared/unique ratio ρ in the boost")
    epsilon: float = Field(1e-5, gt=0, description=_EPSILON_DOC + "; also the least unique count ρ divides by")


def _overlaps(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float):
    """Flat task vectors, where each one counts, and per entry how many count (1 × n)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(dtype)
    tv = torch.stack([e.to(dtype) - b for e in experts], dim=0).view(len(experts), -1)
    counted = tv.abs() > epsilon
    counts = counted.sum(dim=0, keepdim=True)
    return b, tv, counted, counts, counts > 1, counts == 1


def merge_ram(base: torch.Tensor, experts: Sequence[torch.Tensor], p: RamParams, ctx: TensorContext) -> torch.Tensor:
    """Unique entries kept whole, shared ones averaged over the experts that change them."""
    b, tv, counted, counts, shared, unique = _overlaps(base, experts, p.epsilon)
    tv = tv * counted
    merged = ((tv * unique) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def merge_ramplus_tl(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: RamPlusParams, ctx: TensorContext
) -> torch.Tensor:
    """RAM with each expert's unique entries scaled by 1 + r·clamp(shared/unique, 0, α)."""
    b, tv, counted, counts, shared, unique = _overlaps(base, experts, p.epsilon)
    n_shared = (counted & shared).sum(dim=1)
    n_unique = (counted & unique).sum(dim=1)
    rho = n_shared / n_unique.clamp(min=p.epsilon)
    boost = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    tv = tv * counted
    merged = ((tv * unique * boost.unsqueeze(-1)) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


register(
    MergeMethod(
        name="ram",
        params=RamParams,
        doc="RAM: keep entries one expert alone changes, average those several experts change.",
        merge_tensor=merge_ram,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/ram.py; arXiv 2601.13572",
        chunkable=lambda p: True,
    )
)
register(
    MergeMethod(
        name="ramplus_tl",
        params=RamPlusParams,
        doc="RAM+ (tensor-local): RAM with each expert's unique entries boosted by its shared/unique ratio.",
        merge_tensor=merge_ramplus_tl,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/ram.py; arXiv 2601.13572",
    )
)
