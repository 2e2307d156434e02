"""TADrop (a reconstruction, see docs/modifiers.md): the decision functions on small tables, the
direction of the mapping, the mean-preserving renormalisation, and that the densities decided
reach the wrapped sparsifying method unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tritonmerge as tm
from tritonmerge.api import analyze
from tritonmerge.context import MergeReport
from tritonmerge.errors import ParameterError
from tritonmerge.methods import tadrop as T
from tritonmerge.ops.stats import task_vector_stats_reference as task_vector_stats
from tritonmerge.source import InMemorySource

ROWS, COLS = 48, 64  # 3072 elements: above the default min_numel


def gaussian(gen: torch.Generator, shape=(ROWS, COLS), scale=0.01) -> torch.Tensor:
    return scale * torch.randn(shape, generator=gen, dtype=torch.float64)


def heavy_tailed(gen: torch.Generator, shape=(ROWS, COLS), scale=0.01) -> torch.Tensor:
    """Mostly tiny entries with a few large ones: high kurtosis, high √n‖x‖₂/‖x‖₁."""
    x = 0.05 * scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    spikes = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.03
    return torch.where(spikes, 10 * scale * torch.randn(shape, generator=gen, dtype=torch.float64), x)


def model(kinds: dict[str, str], n_experts: int = 3, seed: int = 0, dtype=torch.float32):
    """Base + experts whose task vector on each tensor is Gaussian or heavy-tailed."""
    gen = torch.Generator().manual_seed(seed)
    base, experts = {}, [{} for _ in range(n_experts)]
    for name, kind in kinds.items():
        shape = (ROWS,) if name.endswith("norm.weight") else (ROWS, COLS)
        b = torch.randn(shape, generator=gen, dtype=torch.float64)
        base[name] = b.to(dtype)
        for sd in experts:
            tau = heavy_tailed(gen, shape) if kind == "heavy" else gaussian(gen, shape)
            sd[name] = (b + tau).to(dtype)
    return base, experts


KINDS = {
    "model.layers.0.attn.weight": "gauss",
    "model.layers.0.mlp.weight": "heavy",
    "model.layers.0.norm.weight": "gauss",
    "model.layers.1.attn.weight": "gauss",
    "model.layers.1.mlp.weight": "gauss",
}


def run(base, experts, **kwargs):
    report = MergeReport()
    out = tm.merge_state_dicts("tadrop", base, experts, report=report, **kwargs)
    return out, report.decisions


def decide(base, experts, **kwargs):
    """Only the analysis (no merge pass): the decisions TADrop writes."""
    spec = tm.get_method("tadrop")
    return analyze(spec, spec.validate(kwargs), InMemorySource(base, experts))


# --- statistics ---------------------------------------------------------------------------------


def test_statistics_from_moments_match_direct_computation():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4000, generator=gen, dtype=torch.float64)
    taus = [gaussian(gen, (4000,)), heavy_tailed(gen, (4000,))]
    stats = task_vector_stats(base, [base + t for t in taus])
    for row, x in zip(range(2), taus):
        centred = x - x.mean()
        kurt = float((centred**4).mean() / (centred**2).mean() ** 2 - 3)
        l1_l2 = math.sqrt(x.numel()) * float(x.norm()) / float(x.abs().sum())
        cv = float(x.abs().std(unbiased=False) / x.abs().mean())
        max_ratio = float(x.abs().max() / x.pow(2).mean().sqrt())
        got = {s: float(T.statistic_from_stats(stats[row], s)) for s in ("kurtosis", "l1_l2", "cv", "max_ratio")}
        assert got["kurtosis"] == pytest.approx(kurt, rel=1e-6, abs=1e-6)
        assert got["l1_l2"] == pytest.approx(l1_l2, rel=1e-9)
        assert got["cv"] == pytest.approx(cv, rel=1e-6)
        assert got["max_ratio"] == pytest.approx(max_ratio, rel=1e-9)
    gauss = T.statistic_from_stats(stats[0], "l1_l2")
    assert float(gauss) == pytest.approx(math.sqrt(math.pi / 2), rel=0.03)


def test_statistics_of_a_zero_task_vector_are_undefined():
    base = torch.randn(100)
    stats = task_vector_stats(base, [base.clone()])
    for s in ("kurtosis", "l1_l2", "cv", "max_ratio"):
        assert math.isnan(float(T.statistic_from_stats(stats[0], s)))
    assert math.isnan(float(T.negentropy_from_histogram(T.magnitude_histogram(torch.zeros(10), 8))))


def test_negentropy_is_zero_for_a_flat_histogram_and_larger_when_concentrated():
    flat = T.negentropy_from_histogram(torch.ones(16))
    peaked = T.negentropy_from_histogram(torch.tensor([100.0] + [1.0] * 15))
    assert float(flat) == pytest.approx(0.0, abs=1e-12)
    assert float(peaked) > 1.0


# --- the decision function ------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["zscore", "zscore_additive", "rank"])
def test_weighted_mean_equals_the_asked_density_even_with_clipping(mapping):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 40, generator=gen, dtype=torch.float64) ** 3  # skewed: many clip at one end
    numels = torch.randint(1, 10_000, (40,), generator=gen)
    asked = [0.3, 0.12]
    dens = T.decide_densities(values, numels, asked, mapping=mapping, strength=3.0, min_density=0.1, max_density=0.45)
    means = T.weighted_mean_density(dens, numels)
    for got, want in zip(means, asked):
        assert abs(got - want) <= 1e-9
    assert float(dens.min()) >= 0.1 - 1e-15 and float(dens.max()) <= 0.45 + 1e-15
    at_bounds = ((dens - 0.1).abs() < 1e-12) | ((dens - 0.45).abs() < 1e-12)
    assert int(at_bounds.sum()) >= 5, "the test must exercise clipping"
    assert len(set(dens[0].tolist())) > 5, "densities must differ between tensors"


def test_without_preserve_mean_densities_are_only_clipped():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]], dtype=torch.float64)
    dens = T.decide_densities(values, [1] * 5, [0.5], mapping="zscore_additive", strength=0.2,
                              min_density=0.2, max_density=0.8, preserve_mean=False)
    z = (values[0] - values[0].mean()) / values[0].std(unbiased=False)
    torch.testing.assert_close(dens[0], (0.5 + 0.2 * z).clamp(0.2, 0.8))


def test_rank_mapping_spans_the_strength_and_ties_share_a_rank():
    values = torch.tensor([[1.0, 5.0, 5.0, 9.0]], dtype=torch.float64)
    dens = T.decide_densities(values, [1] * 4, [0.4], mapping="rank", strength=0.5, preserve_mean=False)
    torch.testing.assert_close(dens[0], torch.tensor([0.2, 0.4, 0.4, 0.6], dtype=torch.float64))


def test_equal_or_undefined_statistics_keep_the_asked_density():
    values = torch.tensor([[2.0, 2.0, 2.0], [float("nan"), 1.0, float("nan")]], dtype=torch.float64)
    dens = T.decide_densities(values, [10, 20, 30], [0.3, 0.6], strength=1.0)
    torch.testing.assert_close(dens, torch.tensor([[0.3] * 3, [0.6] * 3], dtype=torch.float64))


def test_inactive_entries_are_left_out_of_scores_and_mean():
    values = torch.tensor([[0.0, 1.0, 100.0]], dtype=torch.float64)
    active = torch.tensor([[True, True, False]])
    dens = T.decide_densities(values, [1, 3, 1000], [0.3], strength=0.5, active=active)
    assert float(dens[0, 2]) == 0.3
    mean = float((dens[0, :2] * torch.tensor([1.0, 3.0])).sum() / 4)
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert dens[0, 1] > dens[0, 0]


def test_asked_density_one_means_no_drop_anywhere():
    values = torch.randn(1, 6, dtype=torch.float64)
    dens = T.decide_densities(values, [1] * 6, [1.0], strength=2.0, min_density=0.1, max_density=0.5)
    assert torch.equal(dens, torch.ones(1, 6, dtype=torch.float64))


def test_asked_density_outside_the_bounds_is_an_error_when_the_mean_is_preserved():
    with pytest.raises(ParameterError, match=r"asked density 0.05 of expert 0.*min_density"):
        T.decide_densities(torch.zeros(1, 2), [1, 1], [0.05], min_density=0.1)


# --- whole-model behaviour -----------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["kurtosis", "l1_l2", "cv", "max_ratio", "entropy"])
@pytest.mark.parametrize("pool", ["task", "pooled"])
def test_heavy_tailed_tensor_gets_more_density_than_gaussian_ones(statistic, pool):
    base, experts = model(KINDS)
    decisions = decide(base, experts, merge_method="ties", density=0.3, statistic=statistic, pool=pool)
    heavy = decisions.tensors["model.layers.0.mlp.weight"].density
    for name in ("model.layers.0.attn.weight", "model.layers.1.attn.weight", "model.layers.1.mlp.weight"):
        gauss = decisions.tensors[name].density
        assert all(h > g for h, g in zip(heavy, gauss)), (name, heavy, gauss)
    reverse = decide(base, experts, merge_method="ties", density=0.3, statistic=statistic, pool=pool,
                     direction="keep_diffuse")
    assert all(h < g for h, g in zip(reverse.tensors["model.layers.0.mlp.weight"].density,
                                     reverse.tensors["model.layers.1.attn.weight"].density))


@pytest.mark.parametrize("inner", ["ties", "magnitude", "dare_linear", "della"])
def test_mean_density_per_task_equals_the_asked_one(inner):
    base, experts = model(KINDS)
    asked = [0.3, 0.4, 0.5]
    decisions = decide(base, experts, merge_method=inner, density=asked, strength=2.0, min_density=0.2, max_density=0.6)
    names = [n for n in base if decisions.tensors.get(n) and decisions.tensors[n].density is not None]
    assert len(names) == 4  # the 1-D norm keeps the asked density
    assert "model.layers.0.norm.weight" not in names
    weights = [base[n].numel() for n in names]
    for i, want in enumerate(asked):
        got = sum(w * decisions.tensors[n].density[i] for n, w in zip(names, weights)) / sum(weights)
        assert abs(got - want) <= 1e-6
        assert decisions.summary["tadrop"]["tasks"][i]["mean_density"] == pytest.approx(want, abs=1e-9)
    json.dumps(decisions.to_json(), allow_nan=False)


def test_small_and_one_d_tensors_follow_parameters():
    base, experts = model(KINDS)
    decisions = decide(base, experts, merge_method="ties", min_numel=10, adapt_1d=True)
    assert decisions.tensors["model.layers.0.norm.weight"].density is not None
    decisions = decide(base, experts, merge_method="ties", min_numel=10_000)
    assert all(d.density is None for d in decisions.tensors.values())


@pytest.mark.parametrize("inner,extra", [("ties", {}), ("magnitude", {"rescale": "l1"}), ("breadcrumbs_ties", {"gamma": 0.05})])
def test_decided_densities_reach_the_inner_method(inner, extra):
    base, experts = model(KINDS)
    merged, decisions = run(base, experts, merge_method=inner, density=0.3, strength=1.0, **extra)
    for name in base:
        d = decisions.tensors.get(name)
        density = d.density if d is not None and d.density is not None else 0.3
        expected = tm.merge_tensors(inner, base[name], [e[name] for e in experts], name=name, density=density, **extra)
        assert torch.equal(merged[name], expected), name
    plain = tm.merge_state_dicts(inner, base, experts, density=0.3, **extra)
    assert not torch.equal(merged["model.layers.0.mlp.weight"], plain["model.layers.0.mlp.weight"])


def test_zero_strength_gives_the_wrapped_method_unchanged():
    base, experts = model(KINDS)
    merged, decisions = run(base, experts, merge_method="dare_ties", density=0.4, seed=2, strength=0.0)
    assert all(d.density == [0.4] * 3 for d in decisions.tensors.values() if d.density is not None)
    plain = tm.merge_state_dicts("dare_ties", base, experts, density=0.4, seed=2)
    assert all(torch.equal(merged[k], plain[k]) for k in base)


def test_tadrop_on_dare_ties_is_reproducible_by_seed():
    base, experts = model(KINDS)
    a, decisions = run(base, experts, merge_method="dare_ties", density=0.4, seed=5)
    b, _ = run(base, experts, merge_method="dare_ties", density=0.4, seed=5)
    c, _ = run(base, experts, merge_method="dare_ties", density=0.4, seed=6)
    name = "model.layers.0.mlp.weight"
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert not torch.equal(a[name], c[name])
    expected = tm.merge_tensors("dare_ties", base[name], [e[name] for e in experts], name=name,
                                density=decisions.tensors[name].density, seed=5)
    assert torch.equal(a[name], expected)


def test_pooled_statistic_gives_every_task_the_same_densities():
    base, experts = model(KINDS)
    decisions = decide(base, experts, merge_method="ties", density=0.3, pool="pooled")
    for name, row in decisions.summary["tadrop"]["tensors"].items():
        assert len(set(row["statistic"])) == 1 and len(set(row["density"])) == 1, name


def test_bf16_inputs_and_dtype_kept():
    base, experts = model(KINDS, dtype=torch.bfloat16)
    merged, _ = run(base, experts, merge_method="dare_ties", density=0.3)
    assert all(merged[k].dtype == torch.bfloat16 and merged[k].shape == base[k].shape for k in base)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"merge_method": "task_arithmetic"}, r"merge_method.*no density to adapt.*dare_linear"),
        ({"merge_method": "lwptv"}, r"put lwptv outside"),
        ({"merge_method": "tiez"}, r"merge_method.*did you mean 'ties'"),
        ({}, r"merge_method.*required"),
        ({"merge_method": "ties", "min_density": 0.5, "max_density": 0.4}, r"max_density.*>= min_density"),
        ({"merge_method": "ties", "strength": -1}, r"strength"),
        ({"merge_method": "ties", "statistic": "skew"}, r"statistic.*'kurtosis'"),
        ({"merge_method": "ties", "density": 0.005}, r"asked density 0.005.*min_density"),
        ({"merge_method": "ties", "topk_scope": "model"}, r"topk_scope='tensor'"),
        ({"merge_method": "della", "density": 0.1, "epsilon": 0.15}, r"della's density ± epsilon"),
        ({"merge_method": "ties", "densty": 0.3}, r"unknown parameter 'densty'.*'density'"),
    ],
)
def test_bad_parameters_give_clear_errors(kwargs, match):
    base, experts = model(KINDS)
    with pytest.raises(ParameterError, match=match):
        tm.merge_state_dicts("tadrop", base, experts, **kwargs)
