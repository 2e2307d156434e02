"""Sign election and disjoint merging (TIES and relatives), without stacking N copies."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

# "sum"/"count" look at the weighted task vectors wᵢτᵢ; the "unweighted_" rules at τᵢ themselves
# (PEFT's merge_utils: the sign is elected before the weights are applied, and an entry agrees
# when τᵢ's own sign is the elected one, whatever the sign of wᵢ)
Election = Literal["sum", "count", "unweighted_sum", "unweighted_count"]
UNWEIGHTED = ("unweighted_sum", "unweighted_count")


def elect_sign(weighted: Sequence[torch.Tensor], method: Election) -> torch.Tensor:
    """+1/−1 per entry: the sign of Σᵢ xᵢ ("sum", the TIES paper's mass rule) or of the number
    of positive minus negative entries ("count"), where xᵢ are the tensors given (wᵢτᵢ, or τᵢ for
    the "unweighted_" rules, whose callers pass the unweighted ones). A zero total elects +1
    (mergekit's and PEFT's rule)."""
    by_sum = method in ("sum", "unweighted_sum")
    total = torch.zeros_like(weighted[0])
    for w in weighted:
        total += w if by_sum else torch.sign(w)
    return torch.where(total >= 0, 1.0, -1.0).to(weighted[0].dtype)


def combine(
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    election: Election | None,
    divide_by: Literal["weight", "count", "none"],
    unweighted: Sequence[torch.Tensor] | None = None,
    aggregate: Literal["sum", "max_magnitude"] = "sum",
) -> torch.Tensor:
    """Σᵢ mᵢ·wᵢτᵢ / D where mᵢ selects entries agreeing with the elected sign (all entries when
    ``election`` is None) and D is Σᵢ wᵢmᵢ ("weight"), Σᵢ mᵢ over non-zero entries ("count") or 1.
    Zero divisors are replaced by 1.

    ``weighted`` holds wᵢτᵢ. The "unweighted_" elections also need τᵢ (``unweighted``): the sign
    is elected on them and mᵢ = [sign τᵢ = elected sign], so a negative weight flips an expert's
    contribution without changing its vote (PEFT's ``ties``/``dare_ties``).

    ``aggregate="max_magnitude"`` returns the elected sign times the largest |wᵢτᵢ| among the
    agreeing entries (0 where none agrees) instead of the sum, and takes no divisor."""
    if election in UNWEIGHTED:
        if unweighted is None or len(unweighted) != len(weighted):
            raise ValueError(f"election {election!r} needs the unweighted task vectors, one per expert")
        voters = unweighted
    else:
        voters = weighted
    majority = elect_sign(voters, election) if election is not None else None
    if aggregate == "max_magnitude":
        if majority is None or divide_by != "none":
            raise ValueError("aggregate='max_magnitude' needs a sign election and no divisor")
        largest = torch.zeros_like(weighted[0])
        for w_tau, voter in zip(weighted, voters):
            agree = torch.sign(voter) == majority
            largest = torch.maximum(largest, torch.where(agree, w_tau.abs(), 0.0))
        return largest * majority
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if divide_by != "none" else None
    for w_tau, voter, w in zip(weighted, voters, weights):
        if majority is not None:
            agree = torch.sign(voter) == majority
            mixed += torch.where(agree, w_tau, 0.0)
        else:
            agree = None
            mixed += w_tau
        if divisor is not None:
            if divide_by == "weight":
                divisor += w if agree is None else agree.to(divisor.dtype) * w
            else:
                divisor += (w_tau != 0).to(divisor.dtype) if agree is None else agree.to(divisor.dtype)
    if divisor is None:
        return mixed
    if divide_by == "weight" and majority is None:
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    else:
        divisor = torch.where(divisor == 0, 1.0, divisor)
    return mixed / divisor
