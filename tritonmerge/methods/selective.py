"""Two-model merges that move the base toward one expert only where a per-entry test says so:
NearSwap and Arcee Fusion, with mergekit 0.1.5's semantics (arcee-ai/mergekit
merge_methods/nearswap.py, arcee_fusion.py). Both need the base and exactly one expert.

NearSwap, with a = base and b = expert:

    w   = clamp(t / max(|a − b|, 1e-6), 0, 1)
    out = w·b + (1 − w)·a                  (entries closer than t take b, the others move by t/|a − b|)

Arcee Fusion, with δ = expert − base and softmax over the last axis:

    p, q  = softmax(expert) + 1e-8, softmax(base) + 1e-8
    s     = |δ| · Σ p·log(p/q)             (each row's KL divergence, per entry)
    out   = base + δ·[s ≥ median(s) + 1.5·(Q₃(s) − Q₁(s))]

The quantiles are order statistics at index ⌊q·(n − 1)⌋ of the sorted scores. mergekit sorts a
random sample of 1,000,000 scores (with replacement) for larger tensors; we sort them all, so
there the two tools' thresholds differ by the sampling error and ours is deterministic.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from ..context import TensorContext
from ..errors import ParameterError
from ..params import MethodParams
from ..registry import MergeMethod, register


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class NearSwapParams(MethodParams):
    config_required: ClassVar[tuple[str, ...]] = ("t",)

    t: float | None = Field(
        None, description="distance below which an entry takes the expert's value (required)"
    )


def merge_nearswap(base: torch.Tensor, experts: Sequence[torch.Tensor], p: NearSwapParams, ctx: TensorContext) -> torch.Tensor:
    """The base moved toward the expert by min(1, t/|base − expert|) per entry."""
    if p.t is None:
        raise ParameterError("nearswap: parameter 't' is required (mergekit gives it no default)")
    dtype = _compute_dtype(base)
    a, b = base.to(dtype), experts[0].to(dtype)
    weight = (p.t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


class ArceeFusionParams(MethodParams):
    pass


QUANTILE_SAMPLE = 1_000_000  # mergekit's sample size: below it both tools sort every score


def _order_statistics(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q₁, median and Q₃ at sorted index ⌊q·(n − 1)⌋ (exact integer arithmetic: mergekit's
    float32 q·(n − 1) is exact for every n it sorts)."""
    ordered, _ = torch.sort(scores.reshape(-1))
    last = ordered.numel() - 1
    return ordered[last // 4], ordered[last // 2], ordered[(3 * last) // 4]


def merge_arcee_fusion(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: ArceeFusionParams, ctx: TensorContext
) -> torch.Tensor:
    """The base plus the expert's offset where its importance score is an upper outlier."""
    dtype = _compute_dtype(base)
    b, e = base.to(dtype), experts[0].to(dtype)
    if b.numel() == 0:
        return b
    pe = F.softmax(e, dim=-1) + 1e-8
    pb = F.softmax(b, dim=-1) + 1e-8
    kl = torch.sum(pe * torch.log(pe / pb), dim=-1, keepdim=True)
    scores = (e - b).abs() * kl
    q1, median, q3 = _order_statistics(scores)
    threshold = median + 1.5 * (q3 - q1)
    mask = (scores >= threshold).to(dtype)
    return b + (e - b) * mask


register(
    MergeMethod(
        name="nearswap",
        params=NearSwapParams,
        doc="NearSwap: take the expert's value where it is within t of the base, else move toward it by t/|Δ|.",
        merge_tensor=merge_nearswap,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/nearswap.py; huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        min_experts=1,
        max_experts=1,
        chunkable=lambda p: True,
    )
)
register(
    MergeMethod(
        name="arcee_fusion",
        params=ArceeFusionParams,
        doc="Arcee Fusion: add the expert's offset where |Δ|·KL(softmax) exceeds median + 1.5·IQR of the tensor.",
        merge_tensor=merge_arcee_fusion,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/arcee_fusion.py",
        min_experts=1,
        max_experts=1,
    )
)
