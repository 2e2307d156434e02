"""DARE and DELLA random drops: statistics of the masks, rescaling, and reproducibility that does
not depend on the order tensors are processed in or on row chunking.

Statistical bounds are 5σ of the exact binomial/normal spread, so a correct implementation fails
them with probability < 1e-6, while a wrong keep rate or scale is far outside them.
"""

from __future__ import annotations

import math

import pytest
import torch

import tritonmerge as tm
from tritonmerge.api import merge_one
from tritonmerge.context import TensorContext
from tritonmerge.ops.merge_spec import ranked_keep_prob as della_keep_prob
from tritonmerge.catalog import get_method

N = 200_000


def constant_experts(values: list[float], n: int = N):
    """base = 0 and expert i's task vector = values[i] everywhere: kept entries are countable."""
    base = torch.zeros(n)
    return base, [torch.full((n,), v) for v in values]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_rate_and_rescaled_mean(density):
    base, (expert,) = constant_experts([2.0])
    out = tm.merge_tensors("dare_linear", base, [expert], density=density, rescale="keep_prob", name="w")
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - density) < 5 * math.sqrt(density * (1 - density) / N)
    # kept entries are τ / density, so the mean is τ up to the keep-rate noise
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 2.0 / density))
    mean = out.double().mean().item()
    assert abs(mean - 2.0) < 5 * 2.0 * math.sqrt((1 - density) / (density * N))


def test_expected_output_is_base_plus_sum_of_task_vectors():
    values, density = [1.0, -0.5, 2.0], 0.3
    base, experts = constant_experts(values)
    base = base + 0.25
    experts = [e + 0.25 for e in experts]
    out = tm.merge_tensors("dare_linear", base, experts, density=density, name="w")
    var = sum(v * v for v in values) * (1 - density) / density  # per entry
    assert abs((out - base).double().mean().item() - sum(values)) < 5 * math.sqrt(var / N)


def test_masks_of_different_experts_are_independent():
    density = 0.4
    base, experts = constant_experts([1.0, 1.0])
    out = tm.merge_tensors("dare_linear", base, experts, density=density, rescale="none", name="w")
    both = (out == 2.0).double().mean().item()  # both experts kept this entry
    p = density * density
    assert abs(both - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_l1_rescale_matches_the_l1_norm(make_tensors):
    base, experts = make_tensors((300, 40), 1)
    out = tm.merge_tensors("dare_linear", base, experts, density=0.3, rescale="l1", name="w")
    tau, merged = experts[0] - base, out - base
    assert int((merged != 0).sum()) < 0.4 * merged.numel()
    torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    # kept entries are all scaled by one factor (up to the rounding of base + x − base in float32)
    ratio = merged[merged != 0] / tau[merged != 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.median())), rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_masks_do_not_depend_on_processing_order(method, make_state_dicts):
    shapes = {"a.weight": (16, 24), "b.weight": (24, 16), "c.bias": (24,)}
    base, experts = make_state_dicts(shapes, 3)
    forward = tm.merge_state_dicts(method, base, experts, density=0.5, seed=4)
    order = list(reversed(shapes))
    backward = tm.merge_state_dicts(
        method, {k: base[k] for k in order}, [{k: sd[k] for k in order} for sd in experts], density=0.5, seed=4
    )
    single = tm.merge_tensors(method, base["b.weight"], [sd["b.weight"] for sd in experts], name="b.weight", density=0.5, seed=4)
    for k in shapes:
        assert torch.equal(forward[k], backward[k]), k
    assert torch.equal(forward["b.weight"], single)
    # and tensors of the same shape but different names get different masks
    other = tm.merge_tensors(method, base["b.weight"], [sd["b.weight"] for sd in experts], name="x.weight", density=0.5, seed=4)
    assert not torch.equal(single, other)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_row_chunks_with_element_offsets_equal_the_whole_tensor(method, make_tensors):
    base, experts = make_tensors((37, 29), 3)
    spec = get_method(method)
    params = spec.validate({"density": 0.35, "seed": 9})
    assert spec.chunkable(params)
    whole = merge_one(spec, params, base, experts, TensorContext(name="layer.w"))
    split = 20
    parts = []
    for rows in (slice(0, split), slice(split, None)):
        offset = rows.start * base.shape[1]
        ctx = TensorContext(name="layer.w", element_offset=offset)
        parts.append(merge_one(spec, params, base[rows], [e[rows] for e in experts], ctx))
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("shape", [(9, 50), (50,), (3, 4, 5)], ids=lambda s: "x".join(map(str, s)))
def test_della_keep_probabilities_are_bounded_and_rank_monotone(shape):
    density, eps = 0.4, 0.15
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    prob = della_keep_prob(tau, density, eps)
    assert prob.shape == tau.shape
    assert float(prob.min()) >= density - eps - 1e-6
    assert float(prob.max()) <= density + eps + 1e-6
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    prow = prob.reshape(rows.shape)
    for r in range(rows.shape[0]):
        order = torch.argsort(rows[r].abs())
        sorted_prob = prow[r][order]
        assert bool((sorted_prob[1:] > sorted_prob[:-1]).all()), "keep probability must rise with |τ|"
        torch.testing.assert_close(sorted_prob[0], torch.tensor(density - eps))
        torch.testing.assert_close(sorted_prob[-1], torch.tensor(density + eps))


def test_della_keeps_large_entries_more_often():
    density, eps, rows, width = 0.5, 0.2, 2000, 100
    base = torch.zeros(rows, width)
    # every row holds the magnitudes 1..width in a random order
    gen = torch.Generator().manual_seed(1)
    tau = torch.stack([torch.randperm(width, generator=gen) + 1.0 for _ in range(rows)])
    out = tm.merge_tensors("della_linear", base, [tau], density=density, epsilon=eps, rescale="none", name="w")
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - density) < 5 * math.sqrt(density * (1 - density) / (rows * width))
    smallest, largest = kept[tau == 1].double().mean().item(), kept[tau == width].double().mean().item()
    for observed, p in ((smallest, density - eps), (largest, density + eps)):
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / rows)
