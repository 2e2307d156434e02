"""SLERP between the base and one expert, with mergekit's semantics
(arcee-ai/mergekit merge_methods/slerp.py; docs/algorithms.md §4.4).

Per tensor, v₀ = base, v₁ = expert, both flattened:

    dot = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩        (a vector with norm ≤ 1e-8 is left unnormalised)
    |dot| > 0.9995:  out = (1 − t)·v₀ + t·v₁                          (nearly colinear: lerp)
    otherwise:       θ = arccos(dot);
                     out = sin((1 − t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁   (unnormalised v₀, v₁)

t = 0 gives the base, t = 1 the expert. Computed in float32 (float64 for float64 inputs, which tests
use as the golden value) on the tensors' device, with mergekit 0.1.5's operations in mergekit's
order, so the output is mergekit's to the bit. mergekit may also stack several same-shaped tensors
into one batch, which shrinks its reduction chunks: only tensors above one chunk (about a million
elements) can then differ, by rounding in the norms and the dot product.
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


# mergekit reduces a tensor in chunks of this many elements (to bound its scratch memory); the
# chunk boundaries decide the rounding of the norms and the dot product, so they are kept here.
CHUNK_ELEMENTS = 1024 * 1024


def _chunks(v: torch.Tensor) -> list[torch.Tensor]:
    return [v[start : start + CHUNK_ELEMENTS] for start in range(0, v.numel(), CHUNK_ELEMENTS)]


def _norm(v: torch.Tensor) -> torch.Tensor:
    # the norm of the chunks' norms, as mergekit takes it; a norm <= NORM_EPS leaves v as it is
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c) for c in _chunks(v)]))
    return torch.where(norm > NORM_EPS, norm, 1)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two same-shaped float32 or float64 tensors, treated as flat
    vectors, in their dtype. The operations and their order are mergekit 0.1.5's for one output
    tensor (t rounded to the working dtype first, (1 − t)·θ, the chunked reductions), so that the
    result is the same to the bit."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    t_ = torch.tensor(t, dtype=a.dtype, device=a.device)
    norm_a, norm_b = _norm(a), _norm(b)
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum() for x, y in zip(_chunks(a), _chunks(b))]).sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t_) * theta) / sin_theta
        coef_b = torch.sin(t_ * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape)


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
