"""What tells the members of the task-arithmetic family apart: their sparsifier, whether they
elect signs, and mergekit's defaults for the method of the same name. The family's lowering
(methods/task_arithmetic.lower) reads it to build each tensor's merge spec, and the config
loader for mergekit's defaults; the executors never see it (they see the spec).

Each registered member carries its ``Family`` (``MergeMethod.family``): the list of members is
the registry, never a copy. Adding a member whose sparsifier exists already is one ``_register``
call in methods/task_arithmetic.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Sparsify = Literal["magnitude", "random", "breadcrumbs", "della"]
Divisor = Literal["weight", "count", "none"]


@dataclass(frozen=True)
class Family:
    sparsify: Sparsify | None
    consensus: bool
    # mergekit's defaults for its method of the same name (consensus, normalize, rescale), which
    # the config loader applies to mergekit YAML; None: not a mergekit method
    mergekit_defaults: tuple[bool, bool, bool] | None = None


def divisor_rule(p: Any, family: Family) -> Divisor:
    """What Σᵢ mᵢwᵢτ̃ᵢ is divided by: Σ of the agreeing weights (weight), the count of agreeing
    entries (count), or nothing (none)."""
    if family.consensus:
        if p.disjoint in ("sum", "max"):
            return "none"
        return "weight" if p.normalize else "count"
    return "weight" if p.normalize else "none"
