"""The task-arithmetic family: linear averaging, task arithmetic, TIES, DARE, magnitude,
breadcrumbs and DELLA.

Every member computes, per tensor, with τᵢ = expertᵢ − base in float32:

    τ̃ᵢ = sparsify(τᵢ, densityᵢ)                      (none | magnitude | random | breadcrumbs | della)
    mᵢ  = [sign(wᵢτ̃ᵢ) = elected sign]                 (consensus members only; else mᵢ = 1)
    out = base + λ · Σᵢ mᵢwᵢτ̃ᵢ / D                     (D = Σᵢ wᵢmᵢ, the count of agreeing entries, or 1)

Names and defaults follow the papers; mergekit's semantics are reachable through parameters
(``topk_scope="tensor"``, ``rescale="l1"``, ``normalize``), and the config loader maps mergekit
YAML onto them. References: Ilharco et al. 2023 (task arithmetic), Yadav et al. 2023 (TIES),
Yu et al. 2024 (DARE), Davari & Belilovsky 2024 (breadcrumbs), Deep et al. 2024 (DELLA);
arcee-ai/mergekit generalized_task_arithmetic.py and sparsify.py for the per-tensor rules.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from .. import backends
from ..context import ModelDecisions, TensorContext
from ..errors import ParameterError
from ..ops.consensus import combine
from ..backends.cpu import merge as cpu_merge
from ..backends.triton import merge as fused_merge
from ..ops.family import Family, divisor_rule
from ..ops.sparsify import (
    bernoulli_mask,
    breadcrumbs_mask,
    della_keep_prob,
    expert_densities,
    magnitude_mask,
    rescale,
    task_vectors,
)
from ..params import MethodParams, PerModel, per_expert
from ..registry import MergeMethod, register
from ..source import TensorSource, count_combiner, local_names

class LinearParams(MethodParams):
    weight: PerModel(1.0, "weight wᵢ of expert i")
    normalize: bool = Field(True, description="divide by Σᵢ wᵢ (a weighted mean); false gives Σᵢ wᵢ·expertᵢ")


class TaskArithmeticParams(MethodParams):
    weight: PerModel(1.0, "weight wᵢ of expert i's task vector")
    lambda_: float = Field(1.0, alias="lambda", description="scale λ of the merged task vector")
    normalize: bool = Field(False, description="divide the weighted sum of task vectors by Σᵢ wᵢ")


class MagnitudeParams(TaskArithmeticParams):
    density: PerModel(0.2, "fraction of each task vector kept (largest |τ| per tensor)", gt=0, le=1)
    rescale: Literal["keep_prob", "l1", "none"] = Field(
        "none", description="rescale kept entries: none, 1/density (keep_prob) or match the L1 norm (l1)"
    )


class BreadcrumbsParams(MagnitudeParams):
    density: PerModel(0.9, "fraction of each task vector kept after dropping outliers and small entries", gt=0, le=1)
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of largest-|τ| outliers dropped per tensor")


class DareParams(TaskArithmeticParams):
    density: PerModel(0.5, "keep probability of each task-vector entry (drop rate 1 − density)", gt=0, le=1)
    rescale: Literal["keep_prob", "l1", "none"] = Field(
        "keep_prob",
        description="keep_prob: divide kept entries by density (DARE paper); l1: match the tensor's L1 norm (mergekit); none",
    )
    seed: int = Field(0, ge=0, description="random seed; masks depend only on (seed, tensor name, expert)")


class DellaParams(DareParams):
    epsilon: float = Field(0.15, gt=0, lt=1, description="spread ε of keep probabilities around density (rank-based)")


class ConsensusMixin(MethodParams):
    consensus: Literal["sum", "count"] = Field(
        "sum", description="sign election: sign of Σᵢ wᵢτᵢ (sum, TIES paper) or majority of signs (count)"
    )
    disjoint: Literal["mean", "sum"] = Field(
        "mean", description="combine agreeing entries by their mean or their sum"
    )
    normalize: bool = Field(
        True,
        description="with disjoint=mean: divide by Σ of agreeing weights (true, mergekit) or by their count (false, paper/PEFT)",
    )


class TiesParams(ConsensusMixin, MagnitudeParams):
    topk_scope: Literal["tensor", "model"] = Field(
        "tensor",
        description="tensor: keep exactly ⌊density·n⌋ per tensor (mergekit); model: one threshold per task over the whole model, ties kept (paper)",
    )

    def needs_analysis(self) -> bool:
        return self.topk_scope == "model"


class DareTiesParams(ConsensusMixin, DareParams):
    disjoint: Literal["mean", "sum"] = Field("sum", description="combine agreeing entries by their mean or their sum")


class BreadcrumbsTiesParams(ConsensusMixin, BreadcrumbsParams):
    disjoint: Literal["mean", "sum"] = Field("sum", description="combine agreeing entries by their mean or their sum")


class DellaTiesParams(ConsensusMixin, DellaParams):
    pass


def sparsify_task_vector(
    tau: torch.Tensor, density: float, expert: int, family: Family, p: MethodParams, ctx: TensorContext, method: str
) -> torch.Tensor:
    """One expert's sparsified task vector for this tensor (the ``sparsify`` step above)."""
    threshold = ctx.decisions.threshold
    if family.sparsify == "magnitude" and threshold is not None:
        return rescale(tau, tau.abs() >= threshold[expert], p.rescale, density)
    if density >= 1.0:
        return tau
    if family.sparsify == "magnitude":
        return rescale(tau, magnitude_mask(tau, density), p.rescale, density)
    if family.sparsify == "breadcrumbs":
        return rescale(tau, breadcrumbs_mask(tau, density, p.gamma), p.rescale, density)
    if family.sparsify == "random":
        return rescale(tau, bernoulli_mask(tau, density, p.seed, ctx, expert), p.rescale, density)
    if family.sparsify == "della":
        if not (0 < density - p.epsilon and density + p.epsilon < 1):
            raise ParameterError(
                f"{method}: density ± epsilon must lie in (0, 1) for tensor {ctx.name!r}, "
                f"got density={density}, epsilon={p.epsilon}"
            )
        prob = della_keep_prob(tau, density, p.epsilon)
        return rescale(tau, bernoulli_mask(tau, prob, p.seed, ctx, expert), p.rescale, prob)
    raise AssertionError(family.sparsify)


def merge_family(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams, ctx: TensorContext, family: Family, method: str
) -> torch.Tensor:
    n = len(experts)
    taus = task_vectors(base, experts)
    weights = per_expert(p.weight, n, "weight")
    if family.sparsify is not None:
        densities = expert_densities(p.density, ctx, n)
        taus = [sparsify_task_vector(t, d, i, family, p, ctx, method) for i, (t, d) in enumerate(zip(taus, densities))]
    weighted = [t * w for t, w in zip(taus, weights)]
    merged = combine(
        weighted,
        weights,
        election=p.consensus if family.consensus else None,
        divide_by=divisor_rule(p, family),
    )
    return base.to(torch.float32) + p.lambda_ * merged


def merge_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], p: LinearParams, ctx: TensorContext) -> torch.Tensor:
    weights = per_expert(p.weight, len(experts), "weight")
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for e, w in zip(experts, weights):
        total += w * e.to(torch.float32)
    if p.normalize:
        denominator = sum(weights)
        if abs(denominator) < 1e-8:
            raise ParameterError(f"linear: the weights sum to {denominator}; cannot normalise (set normalize=false)")
        total /= denominator
    return total


def analyze_model_topk(p: TiesParams, source: TensorSource, decisions: ModelDecisions) -> None:
    """TIES with ``topk_scope="model"``: one |τ| threshold per expert over every float tensor."""
    if p.topk_scope != "model":
        return
    if any(d.density is not None for d in decisions.tensors.values()):
        raise ParameterError(
            "ties: topk_scope='model' takes one density per task over the whole model and cannot be "
            "combined with per-tensor densities (TADrop); use topk_scope='tensor'"
        )
    names = [n for n in source.names if source.dtype(n).is_floating_point]
    total = 0
    for name in names:
        numel = 1
        for s in source.shape(name):
            numel *= s
        total += numel
    densities = per_expert(p.density, source.n_experts, "density")
    # The official code keeps |τ| >= the (n − ⌊d·n⌋)-th smallest, i.e. ⌊d·n⌋ + 1 entries before ties.
    counts = [min(total, int(d * total) + 1) for d in densities]

    def keep_flags(name: str) -> list[bool] | None:
        return decisions.tensors[name].keep if name in decisions.tensors else None

    # this process's share of the tensors; the histograms are summed over every process's share
    mine = local_names(source, names)

    def magnitudes():
        for name in mine:
            base, experts = source.load(name)
            keep = keep_flags(name)
            taus = task_vectors(base, experts)
            yield [t.abs() if keep is None or keep[i] else torch.zeros_like(t) for i, t in enumerate(taus)]

    def pairs():  # (base, experts) with pruned experts as None: the fused CPU histograms form τ themselves
        for name in mine:
            base, experts = source.load(name)
            keep = keep_flags(name)
            yield base, [e if keep is None or keep[i] else None for i, e in enumerate(experts)]

    combine = count_combiner(source)
    device = getattr(source, "device", None)
    if device is None:  # a source that does not say where it loads to: look at the first tensor
        device = source.load(mine[0])[0].device if mine else torch.device("cpu")
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and backends.cpu_status() is None and backends.requested_backend() in ("auto", "cpu"):
        thresholds = cpu_merge.model_thresholds_cpu(pairs, counts, combine)
    else:
        thresholds = fused_merge.model_thresholds(magnitudes, counts, combine=combine, device=device)
    for name in names:
        decisions.for_tensor(name).threshold = thresholds
    decisions.summary["ties_model_topk"] = {
        "elements_per_task": total,
        "keep_counts": counts,
        "thresholds": thresholds,
    }


def _register(name: str, params: type[MethodParams], family: Family, doc: str, **extra) -> MergeMethod:
    def merge_tensor(base, experts, p, ctx, _family=family, _name=name):
        return merge_family(base, experts, p, ctx, _family, _name)

    elementwise = family.sparsify in (None, "random")
    spec = register(
        MergeMethod(
            name=name,
            params=params,
            doc=doc,
            merge_tensor=merge_tensor,
            reference="arcee-ai/mergekit merge_methods/generalized_task_arithmetic.py; see docs/algorithms.md §4.1",
            stochastic=family.sparsify in ("random", "della"),
            chunkable=lambda p, _e=elementwise, _f=family: (
                (_e and getattr(p, "rescale", "none") != "l1")
                or (_f.sparsify == "magnitude" and getattr(p, "topk_scope", "tensor") == "model" and p.rescale != "l1")
            ),
            family=family,
            **extra,
        )
    )
    if family.sparsify != "della":  # DELLA's per-row ranks need a sort: torch only
        fn, supports = fused_merge.triton_impl(family, name)
        spec.register_impl("triton", supports=supports)(fn)
    # the fused C loops (compiled on first use) take every member on CPU tensors
    cpu_merge.register_cpu_impl(spec, family)
    return spec


linear = register(
    MergeMethod(
        name="linear",
        params=LinearParams,
        doc="Weighted average of the experts: Σᵢ wᵢ·expertᵢ / Σᵢ wᵢ (the base is not included).",
        merge_tensor=merge_linear,
        reference="Wortsman et al. 2022 (model soups)",
        chunkable=lambda p: True,
    )
)
linear.register_impl("triton", supports=fused_merge.linear_triton_supports)(fused_merge.linear_triton)
linear.register_impl("cpu", supports=cpu_merge.linear_cpu_supports)(cpu_merge.linear_cpu)
_register(
    "task_arithmetic",
    TaskArithmeticParams,
    Family(None, False, mergekit_defaults=(False, False, False)),
    "Task arithmetic: base + λ·Σᵢ wᵢτᵢ.",
)
_register(
    "ties",
    TiesParams,
    Family("magnitude", True, mergekit_defaults=(True, True, False)),
    "TIES: keep the largest |τ| (per tensor or per model), elect a sign, average agreeing entries.",
    analyze=analyze_model_topk,
)
_register(
    "magnitude",
    MagnitudeParams,
    Family("magnitude", False),
    "Magnitude pruning: keep the largest ⌊density·n⌋ |τ| per tensor, then task arithmetic.",
)
_register(
    "dare_linear",
    DareParams,
    Family("random", False, mergekit_defaults=(False, False, True)),
    "DARE: drop task-vector entries at random (rate 1 − density), rescale, then task arithmetic.",
)
_register(
    "dare_ties",
    DareTiesParams,
    Family("random", True, mergekit_defaults=(True, False, True)),
    "DARE drops followed by TIES sign election and disjoint merge.",
)
_register(
    "breadcrumbs",
    BreadcrumbsParams,
    Family("breadcrumbs", False, mergekit_defaults=(False, False, False)),
    "Model Breadcrumbs: drop the largest γ outliers and the smallest entries per tensor, then task arithmetic.",
)
_register(
    "breadcrumbs_ties",
    BreadcrumbsTiesParams,
    Family("breadcrumbs", True, mergekit_defaults=(True, False, False)),
    "Breadcrumbs sparsification followed by TIES sign election.",
)
_register(
    "della",
    DellaTiesParams,
    Family("della", True, mergekit_defaults=(True, True, True)),
    "DELLA: rank-based random drops (MagPrune) with TIES sign election and disjoint mean.",
)
_register(
    "della_linear",
    DellaParams,
    Family("della", False, mergekit_defaults=(False, False, True)),
    "DELLA's MagPrune drops followed by task arithmetic.",
)
