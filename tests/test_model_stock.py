"""Model Stock against a float64 transcription of mergekit's per-tensor rule."""

from __future__ import annotations

import itertools

import pytest
import torch

import tritonmerge as tm


def model_stock_reference(base, experts, filter_wise):
    """Offsets dᵢ = θᵢ − θ₀ (flat, or per row with filter_wise, 1-D as one row); cos θ = mean of
    pairwise cosines (norm product floored at 1e-6, clamped to [−1, 1]); t = N cos/(1 + (N−1) cos);
    θ = t·mean θᵢ + (1 − t)·θ₀."""
    if filter_wise:
        w0 = base.double().reshape(1, -1) if base.dim() <= 1 else base.double().reshape(base.shape[0], -1)
    else:
        w0 = base.double().reshape(-1)
    ws = [e.double().reshape(w0.shape) for e in experts]
    offsets = [w - w0 for w in ws]
    cosines = [
        ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for a, b in itertools.combinations(offsets, 2)
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(9, 14), (31,), (3, 4, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_mergekit_rule(n, shape, filter_wise, make_tensors):
    base, experts = make_tensors(shape, n, scale=0.3)
    # correlated offsets (a shared direction plus noise) give a t well inside (0, 1)
    shared = experts[0] - base
    experts = [e + shared for e in experts]
    out = tm.merge_tensors("model_stock", base, experts, filter_wise=filter_wise)
    torch.testing.assert_close(out.double(), model_stock_reference(base, experts, filter_wise), rtol=1e-5, atol=1e-6)


def test_orthogonal_offsets_keep_the_base_and_parallel_ones_average():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    torch.testing.assert_close(tm.merge_tensors("model_stock", base, [a, b]), base)
    torch.testing.assert_close(tm.merge_tensors("model_stock", base, [a, 3 * a]), 2 * a)


def test_exactly_opposed_offsets_keep_the_base_instead_of_dividing_by_zero():
    base = torch.ones(6)
    d = torch.arange(6.0)
    out = tm.merge_tensors("model_stock", base, [base + d, base - d])
    torch.testing.assert_close(out, base)


def test_float64_inputs_are_computed_in_float64(make_tensors):
    base, experts = make_tensors((20, 7), 3, dtype=torch.float64)
    out = tm.merge_tensors("model_stock", base, experts, filter_wise=True)
    torch.testing.assert_close(out, model_stock_reference(base, experts, True), rtol=1e-12, atol=1e-12)
