"""TADrop: tensor-wise adaptive densities handed to a sparsifying merge method.

**This is a reconstruction, not a reproduction.** TADrop (Luo et al., "One Size Does Not Fit
All", arXiv 2508.06163) is public only as an abstract: sparsity is chosen *per parameter tensor*
from its "distributional properties", so that "tensors with denser, more redundant distributions
can be pruned aggressively, while sparser, more critical ones are preserved", and the result is
plugged into existing merging methods. The statistic, the mapping to a drop rate, its bounds and
whether a global budget is kept are not public. This module implements the reading of
docs/algorithms.md §2 with every one of those choices exposed as a parameter, so that a quality
benchmark (benchmarks/quality) can choose the defaults; see docs/modifiers.md.

For every task i and adapted tensor j (float, ``numel >= min_numel``, and not 1-D unless
``adapt_1d``), with d̄ᵢ the inner method's ``density`` for task i:

    sᵢⱼ = statistic of τᵢⱼ (pool="task") or of the mean task vector (pool="pooled"), oriented so
          that larger = more concentrated / heavier-tailed / "sparser, more critical" (spectral
          statistics of a 2-D τ: 1 − effective rank / min(m, n) or 1 − stable rank / min(m, n);
          cross-task: 1 − the share of τᵢⱼ's top-d̄ᵢ entries whose sign agrees with the other
          tasks' summed τ, so that redundancy with the other tasks scores low);
          then ``transform`` (log1p of the distance to the statistic's lower bound, or none)
    uᵢⱼ = z-score of sᵢⱼ over task i's adapted tensors (mapping zscore, zscore_additive), or its
          rank mapped linearly onto [−1, 1] (mapping rank); u = 0 where the statistic is undefined;
          with ``scope="model"`` over all (task, tensor) pairs of the model together
    rawᵢⱼ = d̄ᵢ·(1 + σβuᵢⱼ)   (zscore, rank)      or   d̄ᵢ + σβuᵢⱼ   (zscore_additive)
          σ = +1 for direction="keep_concentrated" (the abstract's reading), −1 for "keep_diffuse"
    dᵢⱼ = clip(rawᵢⱼ + cᵢ, min_density, max_density)

where the shift cᵢ is 0 without ``preserve_mean`` and otherwise solved (bisection on a monotone
piecewise-linear function) so that Σⱼ nⱼdᵢⱼ / Σⱼ nⱼ = d̄ᵢ over the adapted tensors, to 1e-9.
Tensors that are not adapted keep d̄ᵢ, so the mean over every float tensor is d̄ᵢ as well.
The densities go to the inner method through ``TensorDecisions.density`` (read by
``ops.sparsify.expert_densities``): per-tensor top-k for TIES / magnitude / breadcrumbs,
Bernoulli keep probability for DARE, the centre of DELLA's keep probabilities.

The analysis is one streaming read of every float tensor (``backends.run_op("task_vector_stats")``, plus a
magnitude histogram only for ``statistic="entropy"``, an SVD per (task, tensor) for the spectral
statistics, a top-k mask per (task, tensor) for ``sign_agreement``); the decision step is the pure
function ``decide_densities`` on the resulting small table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, ValidationInfo, field_validator

from ..context import ModelDecisions, TensorContext
from ..errors import ParameterError, UnknownMethodError
from .. import backends
from ..ops.stats import STAT_COLUMNS
from ..params import MethodParams, per_expert
from ..registry import Composite, MergeMethod, get_method, method_table, register
from ..source import TensorSource, gathered, local_names

from . import task_arithmetic  # noqa: F401  (registers the family, whose sparsifiers TADrop wraps)

# Methods whose ``density`` TADrop can adapt per tensor: the task-arithmetic family's sparsifiers.
SPARSIFYING = tuple(
    name for name, m in method_table().items() if m.family is not None and m.family.sparsify is not None
)

Statistic = Literal[
    "kurtosis", "l1_l2", "cv", "max_ratio", "entropy", "effective_rank", "stable_rank_ratio", "sign_agreement"
]
Mapping = Literal["zscore", "zscore_additive", "rank"]

# Statistics of a 2-D task vector's singular values (an SVD per (task, tensor)); other shapes
# have none and count as average (score 0).
SPECTRAL = ("effective_rank", "stable_rank_ratio")
# Statistics that compare a task's vector with the other tasks' (all experts of a tensor at once).
CROSS_TASK = ("sign_agreement",)

# The smallest value each (oriented) statistic can take; ``transform="log"`` uses log1p(s − bound).
STATISTIC_LOWER_BOUND = {
    "kurtosis": -2.0,
    "l1_l2": 1.0,
    "cv": 0.0,
    "max_ratio": 1.0,
    "entropy": 0.0,
    "effective_rank": 0.0,
    "stable_rank_ratio": 0.0,
    "sign_agreement": 0.0,
}

_COL = {name: i for i, name in enumerate(STAT_COLUMNS)}

# Keeps DELLA's keep probabilities density ± ε strictly inside (0, 1).
_DELLA_MARGIN = 1e-6


class TadropParams(MethodParams):
    merge_method: str = Field(
        description="the sparsifying method whose density is adapted per tensor: " + ", ".join(SPARSIFYING)
    )
    statistic: Statistic = Field(
        "sign_agreement",
        description=(
            "the default, sign_agreement, won the quality benchmark's validation sweep (within noise of its "
            "hosts; docs/modifiers.md). Distribution statistic of τ per tensor, larger = more concentrated: kurtosis (excess), "
            "l1_l2 (√n·‖τ‖₂/‖τ‖₁), cv (std/mean of |τ|), max_ratio (max|τ|/RMS), entropy (negentropy of the |τ| histogram); "
            "2-D only, from τ's singular values (one SVD per task and tensor; other shapes count as average): "
            "effective_rank (1 − erank/min(m,n), erank = exp of the entropy of σ/Σσ), "
            "stable_rank_ratio (1 − (‖τ‖_F²/σ_max²)/min(m,n)); "
            "across tasks: sign_agreement (1 − share of task i's top-density entries whose sign agrees with the "
            "other tasks' summed τ: redundant with the others = low = pruned harder; with a single expert "
            "there are no others and every tensor keeps the asked density)"
        ),
    )
    transform: Literal["log", "none"] = Field(
        "log", description="applied to the statistic before mapping: log1p(s − lower bound) tames heavy tails, or none"
    )
    mapping: Mapping = Field(
        "rank",  # best validation average over ties and dare_ties in benchmarks/results/quality_ablation.md
        description="zscore: d̄·(1+β·z); zscore_additive: d̄+β·z; rank: d̄·(1+β·(2r−1)), r the rank in [0,1] across tensors",
    )
    direction: Literal["keep_concentrated", "keep_diffuse"] = Field(
        "keep_concentrated",
        description="keep_concentrated: heavy-tailed (sparse, critical) tensors get higher density (the abstract's reading); keep_diffuse: the reverse",
    )
    strength: float = Field(0.25, ge=0, description="β: how far densities move away from the asked density")
    min_density: float = Field(0.01, gt=0, le=1, description="lower clip of every adapted density")
    max_density: float = Field(1.0, gt=0, le=1, description="upper clip of every adapted density")
    preserve_mean: bool = Field(
        True, description="shift densities so the parameter-count-weighted mean per task equals the asked density"
    )
    pool: Literal["task", "pooled"] = Field(
        "task", description="task: statistic per (task, tensor); pooled: one statistic per tensor from the mean task vector"
    )
    scope: Literal["task", "model"] = Field(
        "task",
        description=(
            "task: scores centred (z-score or rank) over each task's own tensors; model: over all (task, tensor) pairs "
            "of the model together (the per-task mean is still preserved with preserve_mean)"
        ),
    )
    min_numel: int = Field(1024, ge=1, description="tensors with fewer elements keep the asked density")
    adapt_1d: bool = Field(False, description="also adapt 1-D tensors (biases, norms) that have at least min_numel elements")
    bins: int = Field(64, ge=2, le=65536, description="histogram bins of |τ|/max|τ| for statistic=entropy")

    @field_validator("merge_method")
    @classmethod
    def _sparsifying(cls, value: str) -> str:
        if value not in SPARSIFYING:
            try:
                get_method(value)
            except UnknownMethodError as exc:  # keep the close-match suggestions, name the parameter
                raise ValueError(str(exc)) from None
            raise ValueError(
                f"{value!r} has no density to adapt; tadrop wraps one of {', '.join(SPARSIFYING)} "
                "(to combine with lwptv, put lwptv outside: lwptv(merge_method='tadrop', ...))"
            )
        return value

    @field_validator("max_density")
    @classmethod
    def _ordered(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min_density")
        if low is not None and value < low:
            raise ValueError(f"max_density must be >= min_density ({low})")
        return value

    @field_validator("pool")
    @classmethod
    def _pool_needs_a_per_task_statistic(cls, value: str, info: ValidationInfo) -> str:
        statistic = info.data.get("statistic")
        if value == "pooled" and statistic in CROSS_TASK:
            raise ValueError(
                f"pool='pooled' needs a distribution statistic: statistic={statistic!r} (the default unless "
                "set) compares each task with the others and has no pooled value; pass e.g. statistic='kurtosis'"
            )
        return value


# ---------------------------------------------------------------------------------------------
# statistics (pure)


def _moments(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row mean, variance, central 4th moment, mean |x|, mean x², max |x| from [..., 7] sums."""
    s = stats.to(torch.float64)
    n = s[..., _COL["count"]].clamp_min(1.0)
    mean = s[..., _COL["sum"]] / n
    m2 = s[..., _COL["sum_sq"]] / n
    m3 = s[..., _COL["sum_cube"]] / n
    m4 = s[..., _COL["sum_quad"]] / n
    var = (m2 - mean * mean).clamp_min(0.0)
    central4 = (m4 - 4 * mean * m3 + 6 * mean * mean * m2 - 3 * mean**4).clamp_min(0.0)
    return {
        "n": s[..., _COL["count"]],
        "var": var,
        "central4": central4,
        "mean_abs": s[..., _COL["sum_abs"]] / n,
        "mean_sq": m2,
        "max_abs": s[..., _COL["max_abs"]],
    }


def statistic_from_stats(stats: torch.Tensor, statistic: str) -> torch.Tensor:
    """Oriented statistic (larger = more concentrated) from ``task_vector_stats`` rows [..., 7].

    NaN where it is undefined (empty or zero task vector, or a constant one for kurtosis).
    ``entropy`` needs a histogram: use ``negentropy_from_histogram``.
    """
    m = _moments(stats)
    nan = torch.full_like(m["var"], float("nan"))
    nonzero = (m["n"] > 0) & (m["mean_sq"] > 0)
    if statistic == "kurtosis":
        ok = nonzero & (m["var"] > 1e-300)
        return torch.where(ok, m["central4"] / m["var"].clamp_min(1e-300) ** 2 - 3.0, nan)
    if statistic == "l1_l2":
        # √n·‖x‖₂/‖x‖₁ = sqrt(E[x²]) / E|x|: 1 for equal magnitudes, √(π/2) for a Gaussian, √n for one spike
        return torch.where(nonzero, m["mean_sq"].sqrt() / m["mean_abs"].clamp_min(1e-300), nan)
    if statistic == "cv":
        var_abs = (m["mean_sq"] - m["mean_abs"] ** 2).clamp_min(0.0)
        return torch.where(nonzero, var_abs.sqrt() / m["mean_abs"].clamp_min(1e-300), nan)
    if statistic == "max_ratio":
        return torch.where(nonzero, m["max_abs"] / m["mean_sq"].sqrt().clamp_min(1e-300), nan)
    raise ValueError(f"statistic {statistic!r} is not computed from moments")


def magnitude_histogram(tau: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of |τ|/max|τ| in ``bins`` equal bins over [0, 1] (float64, CPU); zeros if τ is 0."""
    flat = tau.detach().reshape(-1).abs().to(torch.float32)
    top = flat.max() if flat.numel() else torch.zeros(())
    if flat.numel() == 0 or float(top) == 0.0:
        return torch.zeros(bins, dtype=torch.float64)
    idx = (flat / top * bins).to(torch.int64).clamp_(0, bins - 1)
    return torch.bincount(idx, minlength=bins).to(torch.float64).cpu()


def negentropy_from_histogram(hist: torch.Tensor) -> torch.Tensor:
    """log(bins) − H(p) of the normalised histogram(s) [..., bins]: 0 for a flat histogram, larger
    when the magnitudes pile up in few bins (heavy tail: most entries tiny next to the maximum)."""
    h = hist.to(torch.float64)
    total = h.sum(-1, keepdim=True)
    p = h / total.clamp_min(1e-300)
    entropy = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)
    out = math.log(h.shape[-1]) - entropy
    return torch.where(total.squeeze(-1) > 0, out, torch.full_like(out, float("nan")))


def _spectral_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when the inputs are float64 (exact references), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def singular_values(tau: torch.Tensor) -> torch.Tensor | None:
    """Singular values of a 2-D task vector (``torch.linalg.svdvals`` in float32, float64 for
    float64 input), returned in float64; None for other shapes or a zero / degenerate matrix."""
    if tau.dim() != 2 or min(tau.shape) < 2:
        return None
    x = tau.detach().to(_spectral_dtype(tau))
    if not bool(torch.isfinite(x).all()):
        return None
    sv = torch.linalg.svdvals(x).to(torch.float64)
    if float(sv.sum()) <= 0.0:
        return None
    return sv


def effective_rank(tau: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ/Σσ (float64): 1 for a rank-1 matrix, n for
    the n×n identity. NaN where ``singular_values`` gives none."""
    sv = singular_values(tau)
    if sv is None:
        return float("nan")
    p = sv / sv.sum()
    entropy = -float(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum())
    return math.exp(entropy)


def stable_rank(tau: torch.Tensor) -> float:
    """‖τ‖_F² / σ_max² (float64): 1 for rank 1, n for the n×n identity. NaN as ``effective_rank``."""
    sv = singular_values(tau)
    if sv is None:
        return float("nan")
    return float((sv * sv).sum() / (sv[0] * sv[0]))


def spectral_statistic(tau: torch.Tensor, statistic: str) -> float:
    """Oriented spectral statistic, larger = more concentrated spectrum ("sparser, more
    critical"): 1 − rank/min(m, n) for ``effective_rank`` or ``stable_rank``, in [0, 1 − 1/min(m, n)];
    0 for a flat spectrum (identity), 1 − 1/min(m, n) for rank 1. NaN if not 2-D or zero."""
    if statistic == "effective_rank":
        rank = effective_rank(tau)
    elif statistic == "stable_rank_ratio":
        rank = stable_rank(tau)
    else:
        raise ValueError(f"statistic {statistic!r} is not spectral")
    if not math.isfinite(rank):
        return float("nan")
    return 1.0 - rank / min(tau.shape)


def transform_statistic(values: torch.Tensor, statistic: str, transform: str) -> torch.Tensor:
    """``log``: log1p(s − lower bound of the statistic), monotone, compresses heavy right tails."""
    if transform == "none":
        return values
    return torch.log1p((values - STATISTIC_LOWER_BOUND[statistic]).clamp_min(0.0))


# ---------------------------------------------------------------------------------------------
# decision (pure)


def _centred_scores(values: torch.Tensor, mapping: str) -> torch.Tensor:
    """z-score (population std) or rank mapped to [−1, 1] (average rank for ties); 0 where NaN
    or when every value is equal."""
    out = torch.zeros_like(values)
    finite = torch.isfinite(values)
    v = values[finite]
    if v.numel() < 2:
        return out
    if mapping == "rank":
        order = torch.argsort(v, stable=True)
        ranks = torch.empty_like(v)
        ranks[order] = torch.arange(v.numel(), dtype=v.dtype)
        # equal values share their average rank, so ties do not depend on tensor order
        uniq, inverse = torch.unique(v, return_inverse=True)
        mean_rank = torch.zeros(uniq.numel(), dtype=v.dtype).index_add_(0, inverse, ranks)
        mean_rank /= torch.bincount(inverse, minlength=uniq.numel()).to(v.dtype)
        out[finite] = 2.0 * mean_rank[inverse] / (v.numel() - 1) - 1.0
        return out
    std = v.std(unbiased=False)
    if float(std) == 0.0:
        return out
    out[finite] = (v - v.mean()) / std
    return out


def fit_weighted_mean(
    raw: torch.Tensor, weights: torch.Tensor, target: float, low: float, high: float, *, tol: float = 1e-12
) -> torch.Tensor:
    """clip(raw + c, low, high) with the shift c chosen so that the ``weights``-weighted mean
    equals ``target`` (requires low <= target <= high). The mean is monotone and piecewise linear
    in c, so bisection converges to the exact shift."""
    if not (low - 1e-12 <= target <= high + 1e-12):
        raise ValueError(f"target mean {target} is outside [{low}, {high}]")
    w = weights.to(torch.float64)
    r = raw.to(torch.float64)
    total = float(w.sum())
    if r.numel() == 0 or total <= 0:
        return r.clamp(low, high)

    def mean_at(c: float) -> float:
        return float((w * (r + c).clamp(low, high)).sum()) / total

    lo_c, hi_c = low - float(r.max()), high - float(r.min())
    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        if mean_at(mid) < target:
            lo_c = mid
        else:
            hi_c = mid
        if hi_c - lo_c <= tol:
            break
    shift = 0.5 * (lo_c + hi_c)
    # exact on the final linear piece: spread the residual over the unclipped entries
    out = (r + shift).clamp(low, high)
    free = (r + shift > low) & (r + shift < high)
    residual = target * total - float((w * out).sum())
    free_weight = float(w[free].sum())
    if free_weight > 0 and residual != 0.0:
        adjusted = (out[free] + residual / free_weight).clamp(low, high)
        out = out.clone()
        out[free] = adjusted
    return out


def decide_densities(
    values: torch.Tensor,
    numels: Sequence[int] | torch.Tensor,
    asked: Sequence[float],
    *,
    mapping: str = "zscore",
    direction: str = "keep_concentrated",
    strength: float = 0.25,
    min_density: float = 0.01,
    max_density: float = 1.0,
    preserve_mean: bool = True,
    active: torch.Tensor | None = None,
    scope: str = "task",
) -> torch.Tensor:
    """Per-(task, tensor) densities [N, T] from an oriented (and transformed) statistic table
    [N, T] (NaN = undefined), the tensors' element counts [T] and the asked density per task.

    ``active`` [N, T] (default all True) marks the entries that take part; inactive entries
    (tensors a preceding LwPTV pruned for that task) get the asked density and are left out of
    the scores and of the mean. A task whose asked density is 1 keeps density 1 everywhere.

    ``scope="model"`` centres the scores (z-score or rank) over every active (task, tensor)
    entry of the table together (tasks asking density 1 left out) instead of over each task's
    row; the mapping, the clip and the per-task mean-preserving shift are unchanged.
    """
    values = values.to(torch.float64)
    n_tasks, n_tensors = values.shape
    weights = torch.as_tensor(numels, dtype=torch.float64).reshape(-1)
    if weights.numel() != n_tensors:
        raise ValueError(f"{weights.numel()} element counts for {n_tensors} tensors")
    if len(asked) != n_tasks:
        raise ValueError(f"{len(asked)} asked densities for {n_tasks} tasks")
    if active is None:
        active = torch.ones(n_tasks, n_tensors, dtype=torch.bool)
    sign = 1.0 if direction == "keep_concentrated" else -1.0
    out = torch.tensor(asked, dtype=torch.float64).reshape(-1, 1).repeat(1, n_tensors)
    centring = "rank" if mapping == "rank" else "zscore"
    if scope == "model":
        pooled = active.to(torch.bool) & (torch.tensor(asked, dtype=torch.float64).reshape(-1, 1) < 1.0)
        model_u = torch.zeros_like(values)
        model_u[pooled] = _centred_scores(values[pooled], centring)
    elif scope != "task":
        raise ValueError(f"scope must be 'task' or 'model', not {scope!r}")
    for i in range(n_tasks):
        target = float(asked[i])
        cols = active[i].nonzero().flatten()
        if target >= 1.0 or cols.numel() == 0:
            continue
        if preserve_mean and not (min_density - 1e-12 <= target <= max_density + 1e-12):
            raise ParameterError(
                f"tadrop: the asked density {target} of expert {i} lies outside "
                f"[min_density, max_density] = [{min_density}, {max_density}], so the mean cannot be preserved; "
                "widen the bounds or set preserve_mean=false"
            )
        u = model_u[i, cols] if scope == "model" else _centred_scores(values[i, cols], centring)
        if strength == 0 or not bool((u != 0).any()):
            # nothing to adapt: exactly the asked density, not a bisection's approximation of it
            out[i, cols] = min(max(target, min_density), max_density)
            continue
        if mapping == "zscore_additive":
            raw = target + sign * strength * u
        else:
            raw = target * (1.0 + sign * strength * u)
        if preserve_mean:
            dens = fit_weighted_mean(raw, weights[cols], target, min_density, max_density)
        else:
            dens = raw.clamp(min_density, max_density)
        out[i, cols] = dens
    return out


def weighted_mean_density(densities: torch.Tensor, numels: Sequence[int] | torch.Tensor) -> list[float]:
    """Parameter-count-weighted mean density per task (row) of a [N, T] table."""
    w = torch.as_tensor(numels, dtype=torch.float64).reshape(1, -1)
    total = float(w.sum())
    if total == 0:
        return [float("nan")] * densities.shape[0]
    return [float(x) for x in (densities.to(torch.float64) * w).sum(1) / total]


# ---------------------------------------------------------------------------------------------
# analysis (the streaming pass)


def is_adapted(name: str, shape: Sequence[int], dtype: torch.dtype, p: TadropParams) -> bool:
    """Whether a tensor gets its own densities (float, big enough, not 1-D unless ``adapt_1d``)."""
    if not dtype.is_floating_point:
        return False
    numel = math.prod(shape)
    return numel >= p.min_numel and (len(shape) >= 2 or p.adapt_1d)


def _density_bounds(p: TadropParams, inner_name: str, inner_params: Any) -> tuple[float, float]:
    low, high = p.min_density, p.max_density
    if inner_name in ("della", "della_linear"):
        # DELLA keeps with probability density ± ε, which must stay inside (0, 1)
        eps = inner_params.epsilon
        low = max(low, eps + _DELLA_MARGIN)
        high = min(high, 1.0 - eps - _DELLA_MARGIN)
        if low > high:
            raise ParameterError(
                f"tadrop: with {inner_name}'s epsilon={eps} no density keeps density ± epsilon inside (0, 1); lower epsilon"
            )
    return low, high


def collect_statistics(
    p: TadropParams,
    source: TensorSource,
    decisions: ModelDecisions,
    names: Sequence[str],
    asked: Sequence[float] | None = None,
) -> torch.Tensor:
    """One streaming read of ``names``: the oriented statistic [N, T] (row per task; in pooled
    mode every row is the pooled value). Pruned experts (LwPTV keep=False) contribute nothing.
    Each tensor's column is computed from that tensor alone, by the process that holds it (the
    spectral statistics: one SVD per kept task vector of that tensor; ``sign_agreement``: the
    tensor's kept task vectors together, with ``asked`` the top-k density per expert)."""
    n = source.n_experts
    table = torch.full((n, len(names)), float("nan"), dtype=torch.float64)
    columns: dict[str, tuple[list[int], torch.Tensor]] = {}
    for name in local_names(source, names):
        base, experts = source.load(name)
        keep = decisions.tensors[name].keep if name in decisions.tensors else None
        kept = [i for i in range(n) if keep is None or keep[i]]
        if not kept:
            continue
        if p.pool == "pooled":
            b = base.to(torch.float32)
            mean_tau = sum(experts[i].to(torch.float32) - b for i in kept) / len(kept)
            zero, kept_experts = torch.zeros_like(mean_tau), [mean_tau]
        else:
            zero, kept_experts = base, [experts[i] for i in kept]
        if p.statistic == "entropy":
            b = zero.to(torch.float32)
            hists = [magnitude_histogram(e.to(torch.float32) - b, p.bins) for e in kept_experts]
            values = negentropy_from_histogram(torch.stack(hists))
        elif p.statistic in SPECTRAL:
            dt = _spectral_dtype(zero, *kept_experts)
            b = zero.to(dt)
            values = torch.tensor(
                [spectral_statistic(e.to(dt) - b, p.statistic) for e in kept_experts], dtype=torch.float64
            )
        elif p.statistic in CROSS_TASK:
            dens = [1.0] * n if asked is None else asked
            # 1 − agreement: a task whose important entries the others already push the same way
            # is redundant ("denser") and scores low
            values = 1.0 - backends.run_op("sign_agreement", zero, kept_experts, [dens[i] for i in kept])
        else:
            values = statistic_from_stats(backends.run_op("task_vector_stats", zero, kept_experts), p.statistic)
        columns[name] = (kept, values[0].expand(len(kept)) if p.pool == "pooled" else values)
    position = {name: j for j, name in enumerate(names)}
    for name, (kept, values) in gathered(source, columns).items():
        table[kept, position[name]] = values.cpu().to(torch.float64)
    return table


def analyze_tadrop(p: Composite, source: TensorSource, decisions: ModelDecisions) -> None:
    """Stream the statistics, decide per-(task, tensor) densities and write them to ``decisions``."""
    own: TadropParams = p.own
    inner_name, inner_params = own.merge_method, p.inner_params
    if inner_name == "ties" and getattr(inner_params, "topk_scope", "tensor") == "model":
        raise ParameterError(
            "tadrop: ties with topk_scope='model' keeps one threshold per task over the whole model, which "
            "per-tensor densities cannot change; use topk_scope='tensor'"
        )
    n = source.n_experts
    if own.statistic in CROSS_TASK and n < 2:
        # no other task to compare with: the statistic is undefined everywhere, so every tensor
        # keeps the asked density (decide_densities' rule for undefined statistics)
        warnings.warn(
            f"tadrop: statistic={own.statistic!r} compares each task with the others; with one expert every "
            f"tensor keeps the asked density {inner_params.density}",
            stacklevel=2,
        )
    asked = per_expert(inner_params.density, n, "density")
    low, high = _density_bounds(own, inner_name, inner_params)
    names = [nm for nm in source.names if is_adapted(nm, source.shape(nm), source.dtype(nm), own)]
    numels = [math.prod(source.shape(nm)) for nm in names]
    raw = collect_statistics(own, source, decisions, names, asked)
    values = transform_statistic(raw, own.statistic, own.transform)
    active = torch.ones(n, len(names), dtype=torch.bool)
    for j, name in enumerate(names):
        keep = decisions.tensors[name].keep if name in decisions.tensors else None
        if keep is not None:
            active[:, j] = torch.tensor([bool(k) for k in keep])
    if own.preserve_mean and (low, high) != (own.min_density, own.max_density):
        for i, target in enumerate(asked):
            if target < 1.0 and not (low <= target <= high):
                raise ParameterError(
                    f"tadrop: the asked density {target} of expert {i} lies outside [{low:.6g}, {high:.6g}], the "
                    f"density bounds narrowed so that {inner_name}'s density ± epsilon stays inside (0, 1); "
                    "change density or epsilon, or set preserve_mean=false"
                )
    densities = decide_densities(
        values,
        numels,
        asked,
        mapping=own.mapping,
        direction=own.direction,
        strength=own.strength,
        min_density=low,
        max_density=high,
        preserve_mean=own.preserve_mean,
        active=active,
        scope=own.scope,
    )
    for j, name in enumerate(names):
        decisions.for_tensor(name).density = [float(d) for d in densities[:, j]]
    decisions.summary["tadrop"] = _summary(own, names, numels, asked, raw, densities, active, (low, high))


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def _summary(
    p: TadropParams,
    names: Sequence[str],
    numels: Sequence[int],
    asked: Sequence[float],
    raw: torch.Tensor,
    densities: torch.Tensor,
    active: torch.Tensor,
    bounds: tuple[float, float],
) -> dict[str, Any]:
    per_task = []
    for i in range(densities.shape[0]):
        cols = active[i].nonzero().flatten()
        d = densities[i, cols]
        w = torch.tensor([numels[c] for c in cols.tolist()], dtype=torch.float64)
        per_task.append(
            {
                "asked_density": float(asked[i]),
                "mean_density": _json_float(float((d * w).sum() / w.sum())) if w.sum() > 0 else None,
                "min_density": float(d.min()) if d.numel() else None,
                "max_density": float(d.max()) if d.numel() else None,
            }
        )
    return {
        "reading": "reconstruction, docs/algorithms.md §2 (not the paper's formula)",
        "merge_method": p.merge_method,
        "statistic": p.statistic,
        "transform": p.transform,
        "mapping": p.mapping,
        "direction": p.direction,
        "strength": p.strength,
        "pool": p.pool,
        "scope": p.scope,
        "bounds": list(bounds),
        "preserve_mean": p.preserve_mean,
        "adapted_tensors": len(names),
        "tasks": per_task,
        "tensors": {
            name: {
                "numel": int(numels[j]),
                "statistic": [_json_float(float(v)) for v in raw[:, j]],
                "density": [float(d) for d in densities[:, j]],
            }
            for j, name in enumerate(names)
        },
    }


def _merge_tensor(base: torch.Tensor, experts: Sequence[torch.Tensor], p: Composite, ctx: TensorContext) -> torch.Tensor:
    """Direct calls (api.merge_one goes straight to the innermost method): the densities are
    already in ``ctx.decisions``, so the inner method does the work."""
    return p.inner.merge_tensor(base, experts, p.inner_params, ctx)


register(
    MergeMethod(
        name="tadrop",
        params=TadropParams,
        doc="TADrop (reconstruction): per-(task, tensor) densities from a statistic of τ (default: how far its top entries agree in sign with the other tasks'), handed to a sparsifying method.",
        merge_tensor=_merge_tensor,
        reference="Luo et al. 2025, arXiv 2508.06163 (abstract only); reading in docs/algorithms.md §2 and docs/modifiers.md",
        analyze=analyze_tadrop,
        modifier=True,
        chunkable=lambda p: isinstance(p, Composite) and bool(p.inner.chunkable(p.inner_params)),
    )
)
