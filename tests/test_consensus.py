"""Consensus merging against a transcription of the TALL-mask reference (nik-dim/tall_masks).

Values sit on a dyadic grid and the λₜ are dyadic, so every comparison is exact in float32 and
float64 alike, including entries where |τₜ| equals λₜ·|τ_MTL − τₜ| (the reference's strict >).
"""

from __future__ import annotations

import pytest
import torch

import tritonmerge as tm
from tritonmerge.api import merge_one
from tritonmerge.context import TensorContext
from tritonmerge.catalog import get_method

SHAPES = {"layers.0.attn.weight": (12, 10), "layers.0.attn.bias": (12,), "head.weight": (5, 10)}


def grid_model(n_experts: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-16, 17, s, generator=gen) / 8.0 for k, s in SHAPES.items()}
    experts = [{k: base[k] + torch.randint(-8, 9, s, generator=gen) / 8.0 for k, s in SHAPES.items()} for _ in range(n_experts)]
    return base, experts


def tall_masks_reference(base_sd, expert_sds, tv, lambdas, k, alpha):
    """Flatten the model; per task t the mask |θ₀ − θₜ| > λₜ·|θ₀ + τ_MTL − θₜ|; keep entries at
    least k masks select; θ₀ + α·τ_MTL·consensus. ``tv`` is the flat τ_MTL (None: Σ τₜ)."""
    names = list(base_sd)
    flat_ptm = torch.cat([base_sd[n].double().flatten() for n in names])
    flat_ft = torch.stack([torch.cat([sd[n].double().flatten() for n in names]) for sd in expert_sds])
    if tv is None:
        tv = (flat_ft - flat_ptm).sum(0)
    flat_multi = flat_ptm + tv
    masks = torch.stack(
        [(flat_ptm - flat_ft[t]).abs() > (flat_multi - flat_ft[t]).abs() * lambdas[t] for t in range(len(expert_sds))]
    )
    consensus = masks.double().sum(0) >= k
    merged = flat_ptm + alpha * tv * consensus
    out, start = {}, 0
    for n in names:
        size = base_sd[n].numel()
        out[n] = merged[start : start + size].view(base_sd[n].shape)
        start += size
    return out


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_sum_mtl_matches_the_reference(k):
    base, experts = grid_model(4)
    lambdas = [0.25, 0.5, 0.375, 0.25]
    out = tm.merge_state_dicts("consensus", base, experts, tall_lambda=lambdas, k=k, **{"lambda": 0.5})
    expected = tall_masks_reference(base, experts, None, lambdas, k, 0.5)
    for n in SHAPES:
        torch.testing.assert_close(out[n].double(), expected[n], rtol=0, atol=1e-6)


def test_masking_actually_removes_entries_and_k_orders_them():
    base, experts = grid_model(4, seed=1)
    kept = []
    for k in range(6):
        out = tm.merge_state_dicts("consensus", base, experts, k=k)
        kept.append(sum(int((out[n] != base[n]).sum()) for n in SHAPES))
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[2] > 0 and kept[5] == 0


def test_ties_mtl_matches_the_reference():
    base, experts = grid_model(3, seed=2)
    common = dict(mtl="ties", ties_density=0.3, ties_topk_scope="model", ties_disjoint="sum")
    # k = 0 keeps τ_MTL whole: it must be TIES (paper scope, disjoint sum)
    plain = tm.merge_state_dicts("consensus", base, experts, k=0, **common)
    ties = tm.merge_state_dicts("ties", base, experts, density=0.3, topk_scope="model", disjoint="sum")
    for n in SHAPES:
        torch.testing.assert_close(plain[n], ties[n], rtol=0, atol=0)
    tv = torch.cat([(ties[n].double() - base[n].double()).flatten() for n in SHAPES])
    out = tm.merge_state_dicts("consensus", base, experts, k=2, tall_lambda=0.5, **common)
    expected = tall_masks_reference(base, experts, tv, [0.5] * 3, 2, 1.0)
    for n in SHAPES:
        torch.testing.assert_close(out[n].double(), expected[n], rtol=0, atol=1e-6)


def test_row_chunks_equal_the_whole_tensor():
    base, experts = grid_model(3)
    name = "layers.0.attn.weight"
    b, es = base[name], [sd[name] for sd in experts]
    spec = get_method("consensus")
    params = spec.validate({"tall_lambda": [0.25, 0.5, 0.25]})
    assert spec.chunkable(params)
    whole = merge_one(spec, params, b, es, TensorContext(name=name))
    parts = [
        merge_one(spec, params, b[rows], [e[rows] for e in es], TensorContext(name=name, element_offset=rows.start * 10))
        for rows in (slice(0, 5), slice(5, None))
    ]
    assert torch.equal(torch.cat(parts), whole)
