"""Sign election and disjoint merging (TIES and relatives), without stacking N copies."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Election = Literal["sum", "count"]


def elect_sign(weighted: Sequence[torch.Tensor], method: Election) -> torch.Tensor:
    """+1/−1 per entry: the sign of Σᵢ wᵢτᵢ ("sum", the TIES paper's mass rule) or of the number
    of positive minus negative entries ("count"). A zero total elects +1 (mergekit's rule)."""
    total = torch.zeros_like(weighted[0])
    for w in weighted:
        total += w if method == "sum" else torch.sign(w)
    return torch.where(total >= 0, 1.0, -1.0).to(weighted[0].dtype)


def combine(
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    election: Election | None,
    divide_by: Literal["weight", "count", "none"],
) -> torch.Tensor:
    """Σᵢ mᵢ·wᵢτᵢ / D where mᵢ selects entries agreeing with the elected sign (all entries when
    ``election`` is None) and D is Σᵢ wᵢmᵢ ("weight"), Σᵢ mᵢ over non-zero entries ("count") or 1.
    Zero divisors are replaced by 1."""
    majority = elect_sign(weighted, election) if election is not None else None
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if divide_by != "none" else None
    for w_tau, w in zip(weighted, weights):
        if majority is not None:
            agree = torch.sign(w_tau) == majority
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
