"""SLERP against a float64 golden value computed with the math module, plus its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import tritonmerge as tm


def slerp_golden(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's rule in float64 with scalar math: lerp when |cos| > 0.9995, else sin weights."""
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    dot = float((a / (na if na > 1e-8 else 1.0) * (b / (nb if nb > 1e-8 else 1.0))).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double())
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return s0 * v0.double() + s1 * v1.double()


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.73, 1.0])
@pytest.mark.parametrize("shape", [(16, 9), (40,)], ids=lambda s: "x".join(map(str, s)))
def test_matches_the_float64_golden(shape, t, make_tensors):
    base, (expert,) = make_tensors(shape, 1, scale=1.0)
    out = tm.merge_tensors("slerp", base, [expert], t=t)
    torch.testing.assert_close(out.double(), slerp_golden(t, base, expert), rtol=1e-5, atol=1e-6)
    out64 = tm.merge_tensors("slerp", base.double(), [expert.double()], t=t)
    torch.testing.assert_close(out64, slerp_golden(t, base, expert), rtol=1e-12, atol=1e-12)


def test_endpoints_and_quarter_turn():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(tm.merge_tensors("slerp", v0, [v1], t=0.0), v0)
    torch.testing.assert_close(tm.merge_tensors("slerp", v0, [v1], t=1.0), v1)
    half = tm.merge_tensors("slerp", v0, [v1], t=0.5)
    torch.testing.assert_close(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # stays on the circle


def test_nearly_colinear_tensors_use_lerp():
    v0 = torch.linspace(1.0, 2.0, 50)
    v1 = 3.0 * v0 + 1e-4  # cosine ≈ 1: SLERP's formula would divide by sin θ ≈ 0
    out = tm.merge_tensors("slerp", v0, [v1], t=0.25)
    torch.testing.assert_close(out, 0.75 * v0 + 0.25 * v1)


def test_zero_tensor_is_not_normalised():
    zero, v1 = torch.zeros(5), torch.arange(5.0)
    out = tm.merge_tensors("slerp", zero, [v1], t=0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), slerp_golden(0.3, zero, v1))
