"""Spherical merges of several models beyond two-model SLERP: NuSLERP, Multi-SLERP and the
Karcher mean, each with the per-tensor semantics of mergekit 0.1.5
(arcee-ai/mergekit merge_methods/nuslerp.py, multislerp.py, karcher.py).

All three treat a tensor (or, for NuSLERP, each row) as a point on a hypersphere scaled by its
norm. NuSLERP and Multi-SLERP interpolate the task vectors τᵢ = expertᵢ − base when the config
names a base model, and the raw weights when it does not (``origin``: the config loader sets
it from ``base_model``, mergekit's optional base); the Karcher mean never has a base: the base
model, when given, is one more input, as in mergekit.

The arithmetic is float32 (float64 for float64 inputs), in mergekit's order of operations, so
that under ``dtype: float32`` both tools write the same bits or land one ulp apart
(tests/test_mergekit_parity.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field

from ..context import TensorContext
from ..errors import ParameterError
from ..params import MethodParams, PerModel, per_expert
from ..registry import MergeMethod, register


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_ORIGIN_DOC = (
    "what the experts are interpolated around: the base (task vectors) or zero (raw weights); "
    "from a config, set by whether base_model is given"
)


class NuSlerpParams(MethodParams):
    # mergekit has no default for these: a config must give them (config.py checks)
    config_required: ClassVar[tuple[str, ...]] = ("weight",)

    weight: PerModel(None, "weight wᵢ of expert i; t = w₂ / (w₁ + w₂), 0.5 when the sum is ~0")
    nuslerp_row_wise: bool = Field(
        False, description="without nuslerp_flatten: interpolate each column (dim 0 vectors) instead of each row"
    )
    nuslerp_flatten: bool = Field(True, description="interpolate the whole tensor as one vector")
    origin: Literal["base", "zero"] = Field("base", description=_ORIGIN_DOC)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP of v0 (t=0) and v1 (t=1) along the last axis (axis 0 when ``row_wise``), or of
    the flattened tensors; lerp where the two are colinear to within 1e-8 in sin θ."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    eps = 1e-8
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    # acos(0) in the colinear lanes keeps sin θ away from 0 there; those lanes take the lerp
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def merge_nuslerp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: NuSlerpParams, ctx: TensorContext) -> torch.Tensor:
    """NuSLERP of two experts with t from their weights, around the base or zero."""
    w = per_expert(p.weight, len(experts), "weight")
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dtype = _compute_dtype(base)
    e0, e1 = (e.to(dtype) for e in experts)
    if p.origin == "zero":
        return nuslerp(t, e0, e1, row_wise=p.nuslerp_row_wise, flatten=p.nuslerp_flatten)
    b = base.to(dtype)
    return b + nuslerp(t, e0 - b, e1 - b, row_wise=p.nuslerp_row_wise, flatten=p.nuslerp_flatten)


class MultiSlerpParams(MethodParams):
    config_required: ClassVar[tuple[str, ...]] = ("weight",)

    weight: PerModel(None, "weight wᵢ of expert i")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0, description="added to norms before dividing by them")
    origin: Literal["base", "zero"] = Field("base", description=_ORIGIN_DOC)


def merge_multislerp(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: MultiSlerpParams, ctx: TensorContext
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: the experts' unit vectors are mapped to
    the tangent space at their weighted mean direction, averaged there by weight, mapped back
    by the exponential map, and scaled by the weighted mean of their norms. Two experts whose
    weighted directions cancel fall back to Σ wᵢ·xᵢ; more than two are an error, as in mergekit."""
    dtype = _compute_dtype(base)
    if len(experts) == 1:
        return experts[0].to(dtype)  # mergekit returns the single expert, even with a base
    if base.numel() == 0:
        return base.to(dtype)  # no direction to average (mergekit would report cancelling weights)
    eps = p.eps
    points = torch.stack([e.to(dtype) for e in experts], dim=0)
    b = base.to(dtype) if p.origin == "base" else None
    if b is not None:
        points = points - b
    flat = points.view(points.shape[0], -1)
    weights = torch.tensor(per_expert(p.weight, len(experts), "weight"), dtype=dtype, device=base.device)
    if p.normalize_weights:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(experts) != 2:
            raise ParameterError(
                f"multislerp: the weighted directions of the experts cancel out at tensor {ctx.name!r} "
                f"(antipodal task vectors with balancing weights); choose other weights"
            )
        out = (points[0] * weights[0] + points[1] * weights[1]).view(points.shape[1:])
        return out if b is None else out + b
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(points.shape[1:])
    return out if b is None else out + b


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="most fixed-point iterations of the Karcher mean")
    tol: float = Field(
        1e-5, ge=0, description="stop when the tangent step's norm is below it; inputs with a smaller norm are left out"
    )


def merge_karcher(base: torch.Tensor, experts: Sequence[torch.Tensor], p: KarcherParams, ctx: TensorContext) -> torch.Tensor:
    """Equal-weight Riemannian (Karcher) mean of the inputs' directions on the unit sphere,
    by fixed-point iteration from their normalised arithmetic mean, scaled by the mean of the
    inputs' norms. ``experts`` are every input model; ``base`` is not read."""
    dtype = _compute_dtype(base)
    xs = [e.to(dtype) for e in experts]
    if len(xs) == 1:
        return xs[0]
    tol = p.tol
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    alpha_sum = sum(alphas[i] for i in valid)
    pairs = [(alphas[i] / alpha_sum, units[i]) for i in valid]

    mean = torch.zeros_like(pairs[0][1])
    for a, u in pairs:
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = pairs[0][1].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(p.max_iter):
        step = torch.zeros_like(mean)
        for a, u in pairs:
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue  # already at this input: its log map is zero
            step += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    # every input's norm counts here, the ones left out of the direction too
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


register(
    MergeMethod(
        name="nuslerp",
        params=NuSlerpParams,
        doc="NuSLERP: SLERP of two experts with t from their weights, per tensor or per row, around the base or zero.",
        merge_tensor=merge_nuslerp,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/nuslerp.py",
        min_experts=2,
        max_experts=2,
        base_role="optional",
    )
)
register(
    MergeMethod(
        name="multislerp",
        params=MultiSlerpParams,
        doc="Multi-SLERP: weighted barycentric interpolation of the experts on the hypersphere, around the base or zero.",
        merge_tensor=merge_multislerp,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/multislerp.py; goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        min_experts=1,
        base_role="optional",
    )
)
register(
    MergeMethod(
        name="karcher",
        params=KarcherParams,
        doc="Karcher mean: the equal-weight Riemannian mean of every input's direction, scaled by their mean norm.",
        merge_tensor=merge_karcher,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/karcher.py; arXiv 2603.04972",
        min_experts=1,
        base_role="input",
    )
)
