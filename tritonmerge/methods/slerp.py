"""SLERP between the base and one expert, with mergekit's semantics
(arcee-ai/mergekit merge_methods/slerp.py; docs/algorithms.md §4.4).

Per tensor, v₀ = base, v₁ = expert, both flattened:

    dot = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩        (a vector with norm ≤ 1e-8 is left unnormalised)
    |dot| > 0.9995:  out = (1 − t)·v₀ + t·v₁                          (nearly colinear: lerp)
    otherwise:       θ = arccos(dot);
                     out = sin((1 − t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁   (unnormalised v₀, v₁)

t = 0 gives the base, t = 1 the expert. mergekit computes this in float32 numpy; this reference
computes it in float32 torch on the tensors' device (float64 for float64 inputs, used by tests as
the golden value).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from ..context import TensorContext
from ..params import MethodParams
from ..registry import MergeMethod, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


class SlerpParams(MethodParams):
    t: float = Field(0.5, ge=0, le=1, description="interpolation factor: 0 gives the base, 1 the expert")


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > NORM_EPS else v


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two same-shaped tensors (treated as flat vectors) in their dtype."""
    dot = (_unit(v0) * _unit(v1)).sum()
    if dot.abs() > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin(theta - theta * t) / sin_theta
    s1 = torch.sin(theta * t) / sin_theta
    return s0 * v0 + s1 * v1


def merge_slerp(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: SlerpParams, ctx: TensorContext
) -> torch.Tensor:
    """SLERP from the base (t=0) to the single expert (t=1)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    return slerp(p.t, base.to(dtype), experts[0].to(dtype))


register(
    MergeMethod(
        name="slerp",
        params=SlerpParams,
        doc="SLERP: spherical interpolation from the base (t=0) to one expert (t=1), lerp when nearly colinear.",
        merge_tensor=merge_slerp,
        reference="arcee-ai/mergekit merge_methods/slerp.py",
        min_experts=1,
        max_experts=1,
    )
)
