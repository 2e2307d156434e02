"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression", arXiv 2405.07813; official code nik-dim/tall_masks).

Per tensor, with τᵢ = expertᵢ − base in float32:

    τ_MTL = Σᵢ τᵢ                      (mtl="sum", task arithmetic without scaling)
          | TIES(τ₁..τ_T)              (mtl="ties": top-k trim, sign election, disjoint sum or mean)
    mₜ    = [ |τₜ| > λₜ·|τ_MTL − τₜ| ]  (task t's TALL mask, strict inequality as in the reference)
    c     = [ Σₜ mₜ ≥ k ]              (consensus: entries at least k tasks rely on)
    out   = base + α·(τ_MTL ⊙ c)

Defaults and where they come from (docs/algorithms.md §4.2):
- ``tall_lambda`` (λₜ) = 0.4, the centre of the reference grid {0.2, 0.3, 0.4, 0.5, 0.6}; the paper
  picks λₜ per task on validation data, which a data-free merge cannot do, so pass your own per
  task where you have them.
- ``k`` = 2 (the reference ``prun_thre_k``): drops both "catastrophic" (no task) and "selfish" (one
  task) weights; k=1 drops only the former, k=0 gives back τ_MTL unmasked.
- ``lambda`` (α) = 1.0, the scale convention of every task-arithmetic method here (mergekit's);
  the paper tunes α in {0.1, ..., 1.0} on validation — with a plain sum of many task vectors a value
  near 0.3 is typical.
- With mtl="ties" the trim defaults to the reference's global top-20% per task
  (``ties_topk_scope="model"``, one threshold per task over the whole model, ties kept) and the
  disjoint *sum* used by the reference's consensus path. A zero sign sum elects + (mergekit's rule;
  the reference falls back to the majority sign, which only matters where every kept entry is 0).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from ..context import ModelDecisions, TensorContext
from ..ops.consensus import combine
from ..ops.sparsify import magnitude_mask, task_vectors
from ..params import MethodParams, PerModel, per_expert
from ..registry import MergeMethod, register
from ..source import TensorSource


class ConsensusParams(MethodParams):
    lambda_: float = Field(
        1.0, alias="lambda", description="scale α of the masked multi-task vector (the paper tunes it in 0.1–1.0)"
    )
    tall_lambda: PerModel(
        0.4,
        "λₜ of task t's TALL mask, kept where |τₜ| > λₜ·|τ_MTL − τₜ| (the paper picks it per task from 0.2–0.6)",
        ge=0,
    )
    k: int = Field(2, ge=0, description="keep entries that at least k TALL masks select (0: no masking)")
    mtl: Literal["sum", "ties"] = Field(
        "sum", description="multi-task vector τ_MTL: the plain sum of task vectors, or their TIES merge"
    )
    ties_density: float = Field(
        0.2, gt=0, le=1, description="with mtl=ties: fraction of each task vector kept by the TIES trim"
    )
    ties_topk_scope: Literal["tensor", "model"] = Field(
        "model",
        description="with mtl=ties: one trim threshold per task over the whole model (reference) or exact top-k per tensor",
    )
    ties_disjoint: Literal["sum", "mean"] = Field(
        "sum", description="with mtl=ties: combine sign-agreeing entries by their sum (reference) or mean"
    )

    def needs_analysis(self) -> bool:
        return self.mtl == "ties" and self.ties_topk_scope == "model"


def multi_task_vector(
    taus: Sequence[torch.Tensor], p: ConsensusParams, ctx: TensorContext
) -> torch.Tensor:
    """τ_MTL for this tensor: Σᵢ τᵢ, or TIES (trim, elect by sum, disjoint sum/mean, unit weights)."""
    if p.mtl == "sum":
        total = torch.zeros_like(taus[0])
        for tau in taus:
            total += tau
        return total
    thresholds = ctx.decisions.threshold
    if thresholds is not None:
        trimmed = [torch.where(t.abs() >= thr, t, 0.0) for t, thr in zip(taus, thresholds)]
    else:
        trimmed = [torch.where(magnitude_mask(t, p.ties_density), t, 0.0) for t in taus]
    return combine(
        trimmed,
        [1.0] * len(taus),
        election="sum",
        divide_by="none" if p.ties_disjoint == "sum" else "count",
    )


def consensus_mask(
    taus: Sequence[torch.Tensor], mtl: torch.Tensor, tall_lambdas: Sequence[float], k: int
) -> torch.Tensor:
    """Boolean [Σₜ mₜ ≥ k] with mₜ = |τₜ| > λₜ·|τ_MTL − τₜ| (counted without stacking T masks)."""
    if k <= 0:
        return torch.ones_like(mtl, dtype=torch.bool)
    votes = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
    for tau, lam in zip(taus, tall_lambdas):
        votes += (tau.abs() > lam * (mtl - tau).abs()).to(torch.int32)
    return votes >= k


def merge_consensus(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: ConsensusParams, ctx: TensorContext
) -> torch.Tensor:
    """base + α·(τ_MTL ⊙ [Σₜ mₜ ≥ k]) in float32 (see the module docstring)."""
    taus = task_vectors(base, experts)
    lambdas = per_expert(p.tall_lambda, len(taus), "tall_lambda")
    mtl = multi_task_vector(taus, p, ctx)
    keep = consensus_mask(taus, mtl, lambdas, p.k)
    return base.to(torch.float32) + p.lambda_ * torch.where(keep, mtl, 0.0)


def analyze_consensus(p: ConsensusParams, source: TensorSource, decisions: ModelDecisions) -> None:
    """mtl="ties" with a model-wide trim: one |τ| threshold per task, shared with ``ties``."""
    if not p.needs_analysis():
        return
    from .task_arithmetic import TiesParams, analyze_model_topk

    analyze_model_topk(TiesParams(density=p.ties_density, topk_scope="model"), source, decisions)


register(
    MergeMethod(
        name="consensus",
        params=ConsensusParams,
        doc="Consensus merging: keep τ_MTL only where at least k tasks' TALL masks agree it matters.",
        merge_tensor=merge_consensus,
        reference="nik-dim/tall_masks src/utils/tallmask_utils.py, src/eval/aggregation.py; arXiv 2405.07813",
        analyze=analyze_consensus,
        min_experts=2,
        # elementwise once the (optional) TIES thresholds are known
        chunkable=lambda p: p.mtl == "sum" or p.ties_topk_scope == "model",
    )
)
