"""The per-tensor merge spec of the task-arithmetic family, and its torch reference executor.

A family member (methods/task_arithmetic.py) lowers its validated parameters and the analysis
decisions for one tensor into a ``MergeSpec``: per expert a keep rule, a rescale rule and a
weight; for the tensor the sign election, the divisor, λ and the output dtype. Every executor
runs that value and nothing else: ``merge_by_spec`` below (the specification), the fused C
loops (backends/cpu/merge.py) and the Triton kernel (backends/triton/merge.py). None of them
knows method names, so a new member whose keep rules exist is one lowering and one
registration.

The integer codes (``Keep``, ``Rescale``, ``Elect``, ``Divide``) are defined here once: the
Triton kernel reads them as constexprs, and the C source's enums carry the same numbers (a test
reads backends/cpu/merge_cpu.c and compares).

    τᵢ  = expertᵢ − base in float32
    τ̃ᵢ  = rescaleᵢ(keepᵢ(τᵢ))
    out = base + λ · Σᵢ mᵢwᵢτ̃ᵢ / D                        (mᵢ: agrees with the elected sign, or 1)

    without task_vectors (linear):  out = fma(eₙ, wₙ, … fma(e₁, w₁, 0)) / D
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, Sequence

import torch

from . import rng
from .consensus import combine
from .select import topk_mask


class Keep(IntEnum):
    """Which entries of one expert's task vector survive."""

    ALL = 0  # every entry
    NONE = 1  # none: a zero task vector (an LwPTV-pruned layer); the expert is not read
    THRESHOLD = 2  # |τ| >= threshold, ties kept (TIES with one threshold per task over the model)
    TOPK = 3  # exactly k largest |τ|, ties to the lowest flat index; minus the `outliers` largest
    RANDOM = 4  # counter-hash uniform < density (DARE)
    RANKED_RANDOM = 5  # uniform < density − ε + 2ε·(rank of |τ| in its row) (DELLA's MagPrune)


class Rescale(IntEnum):
    """What the kept entries are multiplied by (the executors' codes; ``ExpertRule.rescale``
    says which rule produces them)."""

    NONE = 0
    DIVIDE = 1  # divide by the keep probability (or density)
    MULTIPLY = 2  # multiply by a factor the executor measured (the L1 rule)


class Elect(IntEnum):
    NONE = 0  # no election: every entry counts
    SUM = 1  # the sign of Σᵢ wᵢτ̃ᵢ
    COUNT = 2  # the majority of the signs of wᵢτ̃ᵢ
    # PEFT's rules: elected on the unweighted τ̃ᵢ, and mᵢ = [sign τ̃ᵢ = elected sign] whatever wᵢ's
    # sign (the fused executors decline them: the torch reference runs them)
    UNWEIGHTED_SUM = 3  # the sign of Σᵢ τ̃ᵢ
    UNWEIGHTED_COUNT = 4  # the majority of the signs of τ̃ᵢ


class Divide(IntEnum):
    NONE = 0  # D = 1
    WEIGHT = 1  # D = Σ of the agreeing weights
    COUNT = 2  # D = the count of agreeing non-zero entries
    CONSTANT = 3  # D = ``divide_constant``


class Aggregate(IntEnum):
    """How the agreeing entries are combined before the divisor."""

    SUM = 0  # Σᵢ mᵢwᵢτ̃ᵢ
    # the elected sign times the largest agreeing |wᵢτ̃ᵢ| (FusionBench's TIES merge_func "max"; the
    # fused executors decline it: the torch reference runs it)
    MAX_MAGNITUDE = 1


RescaleRule = Literal["none", "keep_prob", "l1"]


@dataclass(frozen=True)
class ExpertRule:
    """One expert's share of a tensor's merge."""

    weight: float
    keep: Keep = Keep.ALL
    # TOPK: how many entries are kept and how many of the largest are removed again (breadcrumbs)
    k: int = 0
    outliers: int = 0
    threshold: float = 0.0  # THRESHOLD
    # RANDOM: the keep probability; RANKED_RANDOM: its mean; TOPK/THRESHOLD: the density, which
    # the keep_prob rescale divides by
    density: float = 1.0
    epsilon: float = 0.0  # RANKED_RANDOM: the spread of the keep probabilities
    keys: tuple[int, int] = (0, 0)  # RANDOM/RANKED_RANDOM: ops/rng stream keys
    rescale: RescaleRule = "none"  # keep_prob: divide by the keep probability; l1: match Σ|τ|

    @property
    def masked(self) -> bool:
        return self.keep not in (Keep.ALL, Keep.NONE)


@dataclass(frozen=True)
class MergeSpec:
    """Everything an executor needs to merge one tensor (or one row chunk of it)."""

    experts: tuple[ExpertRule, ...]
    elect: Elect = Elect.NONE
    divide: Divide = Divide.NONE
    divide_constant: float = 1.0  # Divide.CONSTANT
    aggregate: Aggregate = Aggregate.SUM
    lam: float = 1.0
    # False: the experts are combined as they are and the base is not added (linear averaging)
    task_vectors: bool = True
    # flat index of the first element within the whole tensor: random keep rules of a row chunk
    # draw the same numbers as for the whole tensor
    element_offset: int = 0
    out_dtype: torch.dtype | None = None  # None: the base's dtype

    @property
    def keeps(self) -> set[Keep]:
        return {e.keep for e in self.experts}


def _uniforms_of(rule: ExpertRule, numel: int, offset: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (rng.hash_indices(index, *rule.keys) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def ranked_keep_prob(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune probabilities: within each row (a 1-D tensor is one row), rank |τ|
    ascending, normalise ranks to [0, 1] and keep with probability density − ε + 2ε·rank."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.flatten(1)
    width = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    rank_norm = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + 2 * epsilon * rank_norm).reshape(tau.shape)


def kept_task_vector(tau: torch.Tensor, rule: ExpertRule, element_offset: int = 0) -> torch.Tensor:
    """τ̃ for one expert: its keep rule, then its rescale rule (float32 in, float32 out)."""
    if rule.keep == Keep.ALL:
        return tau
    if rule.keep == Keep.NONE:
        return torch.zeros_like(tau)
    prob: float | torch.Tensor = rule.density
    if rule.keep == Keep.THRESHOLD:
        mask = tau.abs() >= rule.threshold
    elif rule.keep == Keep.TOPK:
        magnitude = tau.abs()
        mask = topk_mask(magnitude, rule.k + rule.outliers) if rule.k + rule.outliers < tau.numel() else torch.ones_like(tau, dtype=torch.bool)
        if rule.outliers > 0:
            mask = mask & ~topk_mask(magnitude, rule.outliers)
    else:
        if rule.keep == Keep.RANKED_RANDOM:
            prob = ranked_keep_prob(tau, rule.density, rule.epsilon)
        mask = _uniforms_of(rule, tau.numel(), element_offset, tau.device).view(tau.shape) < prob
    masked = torch.where(mask, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
    if rule.rescale == "none":
        return masked
    if rule.rescale == "keep_prob":
        return masked / prob
    before = tau.abs().sum(dtype=torch.float64)
    after = masked.abs().sum(dtype=torch.float64)
    if before < 1e-7 or after < 1e-7:  # mergekit's guard: nothing meaningful to match
        return masked
    return masked * float(before / after)


_ELECTION = {
    Elect.NONE: None,
    Elect.SUM: "sum",
    Elect.COUNT: "count",
    Elect.UNWEIGHTED_SUM: "unweighted_sum",
    Elect.UNWEIGHTED_COUNT: "unweighted_count",
}
_DIVISOR = {Divide.NONE: "none", Divide.WEIGHT: "weight", Divide.COUNT: "count"}


def merge_by_spec(spec: MergeSpec, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The specification every executor of ``spec`` is tested against: float32 arithmetic in
    this order, one rounding to the output dtype at the end."""
    if len(experts) != len(spec.experts):
        raise ValueError(f"the spec has {len(spec.experts)} expert rules for {len(experts)} experts")
    out_dtype = spec.out_dtype or base.dtype
    weights = [rule.weight for rule in spec.experts]
    if not spec.task_vectors:
        # one fused multiply-add per expert, a single rounding each: mergekit's linear accumulates so
        total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        for e, w in zip(experts, weights):
            total.addcmul_(e.to(torch.float32), torch.tensor(w, dtype=torch.float32, device=base.device))
        if spec.divide == Divide.CONSTANT:
            total /= spec.divide_constant
        return total.to(out_dtype)
    b = base.to(torch.float32)
    taus = [
        torch.zeros_like(b) if rule.keep == Keep.NONE else kept_task_vector(e.to(torch.float32) - b, rule, spec.element_offset)
        for e, rule in zip(experts, spec.experts)
    ]
    merged = combine(
        [t * w for t, w in zip(taus, weights)],
        weights,
        election=_ELECTION[spec.elect],
        divide_by=_DIVISOR[spec.divide],
        unweighted=taus,
        aggregate="max_magnitude" if spec.aggregate == Aggregate.MAX_MAGNITUDE else "sum",
    )
    return (b + spec.lam * merged).to(out_dtype)
