"""TADrop (a reconstruction, see docs/modifiers.md): the decision functions on small tables, the
direction of the mapping, the mean-preserving renormalisation, and that the densities decided
reach the wrapped sparsifying method unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tritonmerge as tm
from tritonmerge import backends
from tritonmerge.api import analyze
from tritonmerge.context import MergeReport
from tritonmerge.errors import ParameterError
from tritonmerge.methods import tadrop as T
from tritonmerge.ops.stats import sign_agreement_reference
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


def test_effective_rank_and_stable_rank_by_hand():
    u = torch.tensor([[1.0], [2.0], [-1.0], [0.5]], dtype=torch.float64)
    v = torch.tensor([[3.0, -1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    rank1 = u @ v
    assert T.effective_rank(rank1) == pytest.approx(1.0, abs=1e-9)
    assert T.stable_rank(rank1) == pytest.approx(1.0, abs=1e-12)
    eye = torch.eye(6, dtype=torch.float64)
    assert T.effective_rank(eye) == pytest.approx(6.0, rel=1e-12)
    assert T.stable_rank(eye) == pytest.approx(6.0, rel=1e-12)
    # singular values 3 and 1: p = (3/4, 1/4), erank = exp(H(p)); stable rank (9 + 1)/9
    diag = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert T.effective_rank(diag) == pytest.approx(math.exp(h), rel=1e-12)
    assert T.stable_rank(diag) == pytest.approx(10.0 / 9.0, rel=1e-12)
    # oriented: 1 − rank / min(m, n), larger = more concentrated
    assert T.spectral_statistic(rank1, "effective_rank") == pytest.approx(1 - 1 / 4, abs=1e-9)
    assert T.spectral_statistic(eye, "stable_rank_ratio") == pytest.approx(0.0, abs=1e-12)
    assert T.spectral_statistic(diag, "effective_rank") == pytest.approx(1 - math.exp(h) / 2, rel=1e-12)
    # undefined: not 2-D, zero, a single row
    for bad in (torch.ones(8, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), torch.ones(1, 9)):
        assert math.isnan(T.spectral_statistic(bad, "effective_rank"))
        assert math.isnan(T.spectral_statistic(bad, "stable_rank_ratio"))


def test_sign_agreement_by_hand():
    # task 0's top-2 entries (by |τ|) are positions 0 and 3; the others' sum there is (+2, −1):
    # sign agrees at 0 (τ₀ = +5), disagrees at 3 (τ₀ = +4) -> 1/2
    t0 = torch.tensor([5.0, 0.1, -0.2, 4.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 1.0, 1.0, -3.0], dtype=torch.float64)
    t2 = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    got = sign_agreement_reference(zero, [t0, t1, t2], [0.5, 0.25, 0.75])
    # task 1, k=1: position 3 (−3) vs t0 + t2 = +6 -> 0
    # task 2, k=3: positions 0 (+1 vs +6 agree), 1 (−1 vs +1.1 no), 3 (+2 vs +1 agree) -> 2/3
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, 2 / 3], dtype=torch.float64))
    # a zero sum of the others agrees with nothing; one task alone has no value
    assert float(sign_agreement_reference(zero[:2], [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [0.5, 0.5])[0]) == 0.0
    assert math.isnan(float(sign_agreement_reference(zero, [t0], [0.5])[0]))
    # what TADrop runs (the fused CPU loops on float32 inputs; tests/test_cpu_kernels.py) agrees
    f32 = [t.float() for t in (t0, t1, t2)]
    got32 = backends.run_op("sign_agreement", zero.float(), f32, [0.5, 0.25, 0.75])
    torch.testing.assert_close(got32, torch.tensor([0.5, 0.0, 2 / 3], dtype=torch.float64))


# --- the decision function ------------------------------------------------------------------------


def test_model_scope_centres_over_all_tasks_and_keeps_each_tasks_mean():
    # task 1's statistics are a scaled copy of task 0's: per task the z-scores are equal, over the
    # model task 0's values all lie below the mean and close together, task 1's spread widely
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]], dtype=torch.float64)
    numels = [100, 200, 300]
    asked = [0.3, 0.4]
    kw = dict(mapping="zscore", strength=0.3, min_density=0.01, max_density=1.0)
    per_task = T.decide_densities(values, numels, asked, scope="task", **kw)
    per_model = T.decide_densities(values, numels, asked, scope="model", **kw)
    for dens in (per_task, per_model):
        for got, want in zip(T.weighted_mean_density(dens, numels), asked):
            assert abs(got - want) <= 1e-9
    # by hand: z over the model, raw = d̄(1 + βz), then the shift that restores each task's mean
    flat = values.flatten()
    z = ((flat - flat.mean()) / flat.std(unbiased=False)).reshape(2, 3)
    w = torch.tensor(numels, dtype=torch.float64)
    for i, target in enumerate(asked):
        raw = target * (1 + 0.3 * z[i])
        want = raw + (target - float((raw * w).sum() / w.sum()))
        torch.testing.assert_close(per_model[i], want)
    spread_task = (per_task[:, 2] - per_task[:, 0]) / torch.tensor(asked, dtype=torch.float64)
    spread_model = (per_model[:, 2] - per_model[:, 0]) / torch.tensor(asked, dtype=torch.float64)
    assert float(spread_task[0]) == pytest.approx(float(spread_task[1]), rel=1e-9)
    assert float(spread_model[1]) > 5 * float(spread_model[0]) > 0
    # without preserve_mean the model scope also moves whole tasks: task 1 (higher values) gets more
    free = T.decide_densities(values, numels, [0.3, 0.3], scope="model", preserve_mean=False, **{
        k: v for k, v in kw.items()})
    assert float(free[1].mean()) > 0.3 > float(free[0].mean())


def test_model_scope_rank_over_all_pairs():
    values = torch.tensor([[1.0, 4.0], [2.0, 3.0]], dtype=torch.float64)
    dens = T.decide_densities(values, [1, 1], [0.4, 0.4], mapping="rank", strength=0.6, scope="model",
                              preserve_mean=False)
    # model ranks 0, 3 | 1, 2 -> u = −1, 1 | −1/3, 1/3
    torch.testing.assert_close(dens, 0.4 * (1 + 0.6 * torch.tensor([[-1.0, 1.0], [-1 / 3, 1 / 3]], dtype=torch.float64)))
    # a task asking density 1 keeps it everywhere and takes no part in the model's ranking
    dens = T.decide_densities(values, [1, 1], [1.0, 0.4], mapping="rank", strength=0.6, scope="model",
                              preserve_mean=False)
    torch.testing.assert_close(dens, torch.tensor([[1.0, 1.0], [0.4 * 0.4, 0.4 * 1.6]], dtype=torch.float64))


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


def low_rank_model(n_experts: int = 2, seed: int = 0):
    """Tensors whose task vectors are rank 1 ("low") or full-rank Gaussian ("full")."""
    gen = torch.Generator().manual_seed(seed)
    kinds = {"model.layers.0.attn.weight": "low", "model.layers.0.mlp.weight": "full",
             "model.layers.1.attn.weight": "full", "model.layers.1.mlp.weight": "full",
             "model.layers.0.norm.weight": "full"}
    base, experts = {}, [{} for _ in range(n_experts)]
    for name, kind in kinds.items():
        shape = (ROWS,) if name.endswith("norm.weight") else (ROWS, COLS)
        b = torch.randn(shape, generator=gen, dtype=torch.float64)
        base[name] = b.to(torch.float32)
        for sd in experts:
            if kind == "low":
                tau = 0.01 * torch.randn(ROWS, 1, generator=gen, dtype=torch.float64) @ torch.randn(
                    1, COLS, generator=gen, dtype=torch.float64)
            else:
                tau = gaussian(gen, shape)
            sd[name] = (b + tau).to(torch.float32)
    return base, experts


@pytest.mark.parametrize("statistic", ["effective_rank", "stable_rank_ratio"])
@pytest.mark.parametrize("pool", ["task", "pooled"])
def test_rank_one_task_vector_gets_more_density_under_keep_concentrated(statistic, pool):
    base, experts = low_rank_model()
    decisions = decide(base, experts, merge_method="ties", density=0.3, statistic=statistic, pool=pool)
    low = decisions.tensors["model.layers.0.attn.weight"].density
    for name in ("model.layers.0.mlp.weight", "model.layers.1.attn.weight", "model.layers.1.mlp.weight"):
        assert all(a > b for a, b in zip(low, decisions.tensors[name].density)), name
    row = decisions.summary["tadrop"]["tensors"]["model.layers.0.attn.weight"]["statistic"]
    if pool == "task":  # (the mean of two rank-1 task vectors has rank 2)
        assert row == pytest.approx([1 - 1 / ROWS] * 2, abs=1e-4)  # effective/stable rank 1 of 48
    reverse = decide(base, experts, merge_method="ties", density=0.3, statistic=statistic, pool=pool,
                     direction="keep_diffuse")
    assert all(a < b for a, b in zip(reverse.tensors["model.layers.0.attn.weight"].density,
                                     reverse.tensors["model.layers.1.attn.weight"].density))


def test_sign_agreement_prunes_the_tensor_the_tasks_share_harder():
    """On one tensor every task moves the same way (redundant); on the others they are independent."""
    gen = torch.Generator().manual_seed(4)
    base, experts = model(KINDS, n_experts=3, seed=4)
    shared = gaussian(gen)
    name = "model.layers.1.attn.weight"
    for sd in experts:
        sd[name] = (base[name].double() + shared + 0.1 * gaussian(gen)).to(torch.float32)
    decisions = decide(base, experts, merge_method="ties", density=0.3, statistic="sign_agreement", transform="none")
    row = decisions.summary["tadrop"]["tensors"][name]["statistic"]
    assert all(v < 0.05 for v in row), row  # 1 − agreement: nearly every top entry agrees
    for other in ("model.layers.0.attn.weight", "model.layers.1.mlp.weight"):
        assert all(0.3 < v < 0.7 for v in decisions.summary["tadrop"]["tensors"][other]["statistic"])
        assert all(a < b for a, b in zip(decisions.tensors[name].density, decisions.tensors[other].density))
    # the value is the function's on the task vectors
    want = 1 - sign_agreement_reference(base[name], [e[name] for e in experts], [0.3] * 3)
    assert row == want.tolist()


def test_sign_agreement_with_one_expert_keeps_the_asked_density_and_says_so():
    base, experts = model(KINDS, n_experts=1)
    with pytest.warns(UserWarning, match=r"sign_agreement.*one expert every tensor keeps the asked density 0.3"):
        decisions = decide(base, experts, merge_method="ties", density=0.3)
    rows = decisions.summary["tadrop"]["tensors"]
    assert rows and all(row["density"] == [0.3] for row in rows.values())
    with pytest.warns(UserWarning, match="one expert"):
        merged = tm.merge_state_dicts("tadrop", base, experts, merge_method="ties", density=0.3)
    plain = tm.merge_state_dicts("ties", base, experts, density=0.3)
    assert all(torch.equal(merged[k], plain[k]) for k in base)


def test_the_default_statistic_is_the_sweep_winner():
    # sign_agreement per task won the validation sweep (benchmarks/results/quality_sweep_hard_ranking.md)
    params = tm.get_method("tadrop").validate({"merge_method": "ties"})
    assert (params.own.statistic, params.own.scope) == ("sign_agreement", "task")
    with pytest.raises(ParameterError, match=r"'pool'.*statistic='sign_agreement' \(the default unless set\).*statistic='kurtosis'"):
        tm.get_method("tadrop").validate({"merge_method": "ties", "pool": "pooled"})


@pytest.mark.parametrize("statistic", ["effective_rank", "sign_agreement"])
@pytest.mark.parametrize("scope", ["task", "model"])
def test_new_readings_keep_the_mean_exact(statistic, scope):
    base, experts = model(KINDS)
    asked = [0.3, 0.4, 0.5]
    decisions = decide(base, experts, merge_method="ties", density=asked, strength=2.0, min_density=0.2,
                       max_density=0.6, statistic=statistic, scope=scope)
    for i, want in enumerate(asked):
        assert decisions.summary["tadrop"]["tasks"][i]["mean_density"] == pytest.approx(want, abs=1e-9)
    assert decisions.summary["tadrop"]["scope"] == scope


@pytest.mark.parametrize("params", [
    {"statistic": "effective_rank", "scope": "model"},
    {"statistic": "sign_agreement"},
    {"statistic": "stable_rank_ratio", "pool": "pooled"},
])
def test_engine_on_disk_equals_in_memory_for_new_readings(tmp_path, params):
    from _checkpoints import disk_and_memory_merges

    got, expected, saved, report = disk_and_memory_merges(tmp_path, "tadrop", {"merge_method": "ties", "density": 0.4, "strength": 1.0, **params})
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    summary = report.decisions.summary["tadrop"]
    assert saved["summary"]["tadrop"]["tensors"] == json.loads(json.dumps(summary["tensors"]))
    densities = [row["density"] for row in summary["tensors"].values()]
    assert any(len(set(d)) > 1 or d[0] != 0.4 for d in densities), "the statistic must move densities"


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
    decisions = decide(base, experts, merge_method="ties", density=0.3, statistic="kurtosis", pool="pooled")
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
        ({"merge_method": "ties", "statistic": "sign_agreement", "pool": "pooled"}, r"pool='pooled' needs a distribution statistic: statistic='sign_agreement'"),
        ({"merge_method": "ties", "scope": "tensor"}, r"scope.*'task'"),
    ],
)
def test_bad_parameters_give_clear_errors(kwargs, match):
    base, experts = model(KINDS)
    with pytest.raises(ParameterError, match=match):
        tm.merge_state_dicts("tadrop", base, experts, **kwargs)
