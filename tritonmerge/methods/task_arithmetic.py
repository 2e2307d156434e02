"""The task-arithmetic family: linear averaging, task arithmetic, TIES, DARE, magnitude,
breadcrumbs and DELLA.

Every member computes, per tensor, with τᵢ = expertᵢ − base in float32:

    τ̃ᵢ = sparsify(τᵢ, densityᵢ)                      (none | magnitude | random | breadcrumbs | della)
    mᵢ  = [sign(wᵢτ̃ᵢ) = elected sign]                 (consensus members only; else mᵢ = 1)
    out = base + λ · Σᵢ mᵢwᵢτ̃ᵢ / D                     (D = Σᵢ wᵢmᵢ, the count of agreeing entries, or 1)

Each member *lowers* its parameters and the analysis decisions for one tensor into a
``MergeSpec`` (``lower``: per expert a keep rule, a rescale rule and a weight; for the tensor
the election, the divisor, λ and the output dtype); the torch reference (``merge_by_spec``),
the fused C loops and the Triton kernel execute that value and know no method names. Adding a
member is its parameter model and one ``_register`` call (docs/contributing.md).

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
from ..backends.cpu.merge import EXECUTOR as cpu_executor
from ..backends.triton.merge import EXECUTOR as triton_executor
from ..context import ModelDecisions, TensorContext
from ..errors import ParameterError
from ..ops.family import Family, divisor_rule
from ..ops.merge_spec import Aggregate, Divide, Elect, ExpertRule, Keep, MergeSpec, merge_by_spec
from ..ops.rng import stream_keys
from ..ops.select import keep_count
from ..ops.sparsify import expert_densities
from ..params import MethodParams, PerModel, per_expert
from ..registry import MergeMethod, register
from ..source import TensorSource, count_combiner, local_names

# mergekit builds the sign-consensus mask in int8 instead of the base dtype when asked; the
# mask is compared to a boolean before use, so its results are the same either way, and so
# are ours (no executor materialises such a mask)
_INT8_MASK_DOC = "mergekit's memory option (its sign mask in int8); the result is the same either way"


class LinearParams(MethodParams):
    weight: PerModel(1.0, "weight wᵢ of expert i")
    normalize: bool = Field(True, description="divide by Σᵢ wᵢ (a weighted mean); false gives Σᵢ wᵢ·expertᵢ")


class TaskArithmeticParams(MethodParams):
    weight: PerModel(1.0, "weight wᵢ of expert i's task vector")
    lambda_: float = Field(1.0, alias="lambda", description="scale λ of the merged task vector")
    normalize: bool = Field(False, description="divide the weighted sum of task vectors by Σᵢ wᵢ")
    int8_mask: bool = Field(False, description=_INT8_MASK_DOC)


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
    consensus: Literal["sum", "count", "unweighted_sum", "unweighted_count"] = Field(
        "sum",
        description=(
            "sign election: sign of Σᵢ wᵢτᵢ (sum, TIES paper) or majority of the signs of wᵢτᵢ (count); "
            "unweighted_sum / unweighted_count elect on the τᵢ before weighting and an entry agrees when "
            "its τᵢ has the elected sign, whatever wᵢ's sign (PEFT's total / frequency)"
        ),
    )
    disjoint: Literal["mean", "sum", "max"] = Field(
        "mean", description="combine agreeing entries by their mean, their sum, or the largest magnitude with the elected sign (max, FusionBench's merge_func max)"
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
    disjoint: Literal["mean", "sum", "max"] = Field("sum", description="combine agreeing entries by their mean, their sum, or the largest magnitude with the elected sign (max, FusionBench's merge_func max)")


class BreadcrumbsTiesParams(ConsensusMixin, BreadcrumbsParams):
    disjoint: Literal["mean", "sum", "max"] = Field("sum", description="combine agreeing entries by their mean, their sum, or the largest magnitude with the elected sign (max, FusionBench's merge_func max)")


class DellaTiesParams(ConsensusMixin, DellaParams):
    pass


def lower(
    family: Family, p: MethodParams, ctx: TensorContext, base: torch.Tensor, n_experts: int, method: str
) -> MergeSpec:
    """The merge spec of one tensor for a family member: every parameter and analysis decision
    that shapes this tensor's merge, resolved (the ``sparsify`` step above becomes one keep
    rule per expert)."""
    numel = base.numel()
    weights = per_expert(p.weight, n_experts, "weight")
    keep_flags = ctx.decisions.keep
    densities = expert_densities(p.density, ctx, n_experts) if family.sparsify is not None else [1.0] * n_experts
    thresholds = ctx.decisions.threshold if family.sparsify == "magnitude" else None
    rules = []
    for i, (weight, density) in enumerate(zip(weights, densities)):
        if keep_flags is not None and not keep_flags[i]:
            rules.append(ExpertRule(weight, Keep.NONE))
        elif thresholds is not None:
            rules.append(ExpertRule(weight, Keep.THRESHOLD, threshold=thresholds[i], density=density, rescale=p.rescale))
        elif family.sparsify is None or density >= 1.0:
            rules.append(ExpertRule(weight))
        elif family.sparsify in ("magnitude", "breadcrumbs"):
            k = keep_count(density, numel)
            outliers = min(int(p.gamma * numel), numel - k) if family.sparsify == "breadcrumbs" else 0
            rules.append(ExpertRule(weight, Keep.TOPK, k=k, outliers=outliers, density=density, rescale=p.rescale))
        else:
            keys = stream_keys(p.seed, ctx.name, i)
            if family.sparsify == "random":
                rules.append(ExpertRule(weight, Keep.RANDOM, density=density, keys=keys, rescale=p.rescale))
                continue
            if not (0 < density - p.epsilon and density + p.epsilon < 1):
                raise ParameterError(
                    f"{method}: density ± epsilon must lie in (0, 1) for tensor {ctx.name!r}, "
                    f"got density={density}, epsilon={p.epsilon}"
                )
            rules.append(
                ExpertRule(weight, Keep.RANKED_RANDOM, density=density, epsilon=p.epsilon, keys=keys, rescale=p.rescale)
            )
    elect = Elect.NONE
    if family.consensus:
        elect = _ELECT[p.consensus]
    return MergeSpec(
        experts=tuple(rules),
        elect=elect,
        divide=_DIVIDE[divisor_rule(p, family)],
        aggregate=Aggregate.MAX_MAGNITUDE if family.consensus and p.disjoint == "max" else Aggregate.SUM,
        lam=p.lambda_,
        element_offset=ctx.element_offset,
        out_dtype=base.dtype,
    )


_DIVIDE = {"none": Divide.NONE, "weight": Divide.WEIGHT, "count": Divide.COUNT}
_ELECT = {
    "sum": Elect.SUM,
    "count": Elect.COUNT,
    "unweighted_sum": Elect.UNWEIGHTED_SUM,
    "unweighted_count": Elect.UNWEIGHTED_COUNT,
}


def lower_linear(p: LinearParams, base: torch.Tensor, n_experts: int) -> MergeSpec:
    """``linear``'s merge spec: the experts themselves, weighted, over Σᵢ wᵢ when normalised."""
    weights = per_expert(p.weight, n_experts, "weight")
    divide, constant = Divide.NONE, 1.0
    if p.normalize:
        # the float32 sum of the float32 weights: the divisor mergekit divides by
        constant = float(torch.tensor(weights, dtype=torch.float32).sum())
        if abs(constant) < 1e-8:
            raise ParameterError(f"linear: the weights sum to {constant}; cannot normalise (set normalize=false)")
        divide = Divide.CONSTANT
    return MergeSpec(
        experts=tuple(ExpertRule(w) for w in weights),
        divide=divide,
        divide_constant=constant,
        task_vectors=False,
        out_dtype=base.dtype,
    )


def merge_family(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams, ctx: TensorContext, family: Family, method: str
) -> torch.Tensor:
    """The torch reference of a family member: its lowering run by ``merge_by_spec``."""
    return merge_by_spec(lower(family, p, ctx, base, len(experts), method), base, experts)


def merge_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], p: LinearParams, ctx: TensorContext) -> torch.Tensor:
    """``linear``'s torch reference."""
    return merge_by_spec(lower_linear(p, base, len(experts)), base, experts)


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

    def pairs():  # (base, experts) with pruned experts as None: a zero task vector, never read
        for name in mine:
            base, experts = source.load(name)
            keep = keep_flags(name)
            yield base, [e if keep is None or keep[i] else None for i, e in enumerate(experts)]

    thresholds = backends.run_op(
        "model_thresholds", pairs, counts, combine=count_combiner(source), device=source.device
    )
    for name in names:
        decisions.for_tensor(name).threshold = thresholds
    decisions.summary["ties_model_topk"] = {
        "elements_per_task": total,
        "keep_counts": counts,
        "thresholds": thresholds,
    }


def _register(name: str, params: type[MethodParams], family: Family, doc: str, **extra) -> MergeMethod:
    elementwise = family.sparsify in (None, "random")
    spec = register(
        MergeMethod(
            name=name,
            params=params,
            doc=doc,
            merge_tensor=lambda base, experts, p, ctx: merge_family(base, experts, p, ctx, family, name),
            reference="arcee-ai/mergekit merge_methods/generalized_task_arithmetic.py; see docs/algorithms.md §4.1",
            stochastic=family.sparsify in ("random", "della"),
            chunkable=lambda p: (
                (elementwise and getattr(p, "rescale", "none") != "l1")
                or (family.sparsify == "magnitude" and getattr(p, "topk_scope", "tensor") == "model" and p.rescale != "l1")
            ),
            family=family,
            **extra,
        )
    )
    _register_executors(spec, lambda base, experts, p, ctx: lower(family, p, ctx, base, len(experts), name))
    return spec


def _register_executors(method: MergeMethod, lowering) -> None:
    """Every fast executor of merge specs, on a method whose tensors ``lowering`` turns into one."""
    for backend, (run, supports) in (("triton", triton_executor), ("cpu", cpu_executor)):
        method.register_impl(
            backend,
            supports=lambda p, base, experts, ctx, _s=supports: _s(lowering(base, experts, p, ctx), base, experts),
        )(lambda base, experts, p, ctx, _r=run: _r(lowering(base, experts, p, ctx), base, experts))


linear = register(
    MergeMethod(
        name="linear",
        params=LinearParams,
        doc="Weighted average of the experts: Σᵢ wᵢ·expertᵢ / Σᵢ wᵢ (the base is not included).",
        merge_tensor=merge_linear,
        reference="Wortsman et al. 2022 (model soups)",
        chunkable=lambda p: True,
        base_role="unused",
    )
)
_register_executors(linear, lambda base, experts, p, ctx: lower_linear(p, base, len(experts)))
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


class SceParams(MethodParams):
    select_topk: float = Field(
        1.0, ge=0, le=1, description="fraction of entries kept: those whose task vectors vary most across the experts"
    )
    int8_mask: bool = Field(False, description=_INT8_MASK_DOC)


def merge_sce(base: torch.Tensor, experts: Sequence[torch.Tensor], p: SceParams, ctx: TensorContext) -> torch.Tensor:
    """SCE (Wan et al. 2024, arXiv 2408.07990) with mergekit 0.1.5's per-tensor semantics
    (arcee-ai/mergekit merge_methods/sce.py):

        select:    keep the ⌊k·nnz(v)⌋ entries of largest v = Var_i(τᵢ) (population variance
                   across experts, the same entries for every expert; none when that is 0)
        calculate: wᵢ = mean(τ̃ᵢ²) / Σⱼ mean(τ̃ⱼ²)  (1/n each when the sum is below 1e-6)
        erase:     mᵢ = [sign τ̃ᵢ = sign Σⱼ τ̃ⱼ]    (the sum's sign, 0 counted as +; unweighted)
        out      = base + Σᵢ mᵢwᵢτ̃ᵢ / max(Σᵢ mᵢwᵢ, 1e-6)

    It is not a ``MergeSpec``: the selection is one mask shared by all experts, decided by their
    joint variance, not a keep rule of each expert's own task vector; the weights are measured
    from the selected task vectors; and the sign is elected on the unweighted sum. So it runs
    here in torch (float32, float64 for float64 inputs), with torch.topk's choice among ties as
    in mergekit, and the fused executors never see it."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(dtype)
    tvs = torch.stack([e.to(dtype) - b for e in experts], dim=0)
    if p.select_topk < 1:
        tvs = tvs * _sce_selection(tvs, p.select_topk).unsqueeze(0)
    agree = tvs.sign() == ((tvs.sum(dim=0) >= 0).to(dtype) * 2 - 1)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *([1] * (tvs.dim() - 1)))
    kept = weights * agree
    return b + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def _sce_selection(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the ⌊fraction·(non-zero variances)⌋ entries of largest variance across experts."""
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    # mergekit rounds through a float32 product of the count and the fraction: so do we
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[top] = 1
    return mask


register(
    MergeMethod(
        name="sce",
        params=SceParams,
        doc="SCE: keep the entries that vary most across experts, weight experts by their energy, erase sign conflicts.",
        merge_tensor=merge_sce,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/sce.py; Wan et al. 2024 (arXiv 2408.07990)",
    )
)
