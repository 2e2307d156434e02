"""LwPTV (a reconstruction, see docs/modifiers.md): scores and masks on small tables, the layers
pruned on constructed models, the merged result (a pruned task contributes nothing; a layer pruned
for every task is the base), and composition with other methods and with TADrop."""

from __future__ import annotations

import json

import pytest
import torch

import tritonmerge as tm
from tritonmerge.context import MergeReport, layer_index
from tritonmerge.errors import ParameterError
from tritonmerge.methods import lwptv as L
from tritonmerge.ops.stats import task_vector_stats_reference as task_vector_stats

N_LAYERS = 4


def layer_names(layer: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.mlp.up_proj.weight"]


NAMES = ["model.embed_tokens.weight", *[n for i in range(N_LAYERS) for n in layer_names(i)], "model.norm.weight"]


def build(taus: dict[tuple[int, int], float] | None = None, n_experts: int = 3, seed: int = 0, same: dict | None = None):
    """Base and experts with τ = scale·N(0, 0.01²) per tensor; ``taus[(task, layer)]`` overrides
    the scale of every tensor of that layer for that task; ``same[(task, layer)] = other`` copies
    the other task's τ there (a redundant layer)."""
    gen = torch.Generator().manual_seed(seed)
    base, experts = {}, [{} for _ in range(n_experts)]
    for name in NAMES:
        shape = (24,) if name.endswith("norm.weight") else (24, 32)
        base[name] = torch.randn(shape, generator=gen)
        layer = layer_index(name)
        vectors = []
        for t in range(n_experts):
            scale = (taus or {}).get((t, layer), 1.0)
            vectors.append(0.01 * scale * torch.randn(shape, generator=gen))
        for t, other in (same or {}).items():
            if t[1] == layer:
                vectors[t[0]] = vectors[other].clone()
        for sd, v in zip(experts, vectors):
            sd[name] = base[name] + v
    return base, experts


def run(method, base, experts, **kwargs):
    report = MergeReport()
    out = tm.merge_state_dicts(method, base, experts, report=report, **kwargs)
    return out, report.decisions


def pruned_experts(base, experts, decisions):
    """The experts the inner method should see: the base wherever a (task, tensor) is pruned."""
    out = []
    for t, sd in enumerate(experts):
        new = {}
        for name, value in sd.items():
            keep = decisions.tensors[name].keep if name in decisions.tensors else None
            new[name] = value if keep is None or keep[t] else base[name]
        out.append(new)
    return out


# --- pure functions -----------------------------------------------------------------------------


def test_norm_scores_from_aggregated_stats():
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(30, generator=gen), torch.randn(50, generator=gen)]
    experts = [[b + torch.randn(b.shape, generator=gen) * s for b in base] for s in (0.1, 0.5)]
    rows = [task_vector_stats(base[j], [experts[t][j] for t in range(2)]) for j in range(2)]
    agg = L.aggregate_stats(rows)
    joined = [torch.cat([experts[t][j] - base[j] for j in range(2)]).double() for t in range(2)]
    for t in range(2):
        assert float(agg[t, 2]) == pytest.approx(float(joined[t].pow(2).sum()), rel=1e-6)
        assert float(agg[t, 4]) == pytest.approx(float(joined[t].abs().max()), rel=1e-6)
    stats = torch.stack([agg, 2 * agg], 1)  # two "layers": the second with doubled sums (twice the count)
    l2 = L.layer_scores(stats, "l2_ratio")
    ratio = torch.tensor([1.0, 2**0.5], dtype=torch.float64)
    torch.testing.assert_close(l2, (ratio / ratio.mean()).expand(2, 2))
    torch.testing.assert_close(L.layer_scores(stats, "rms_ratio"), torch.ones(2, 2, dtype=torch.float64))


def test_cosine_score_matches_direct_computation():
    gen = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 2, 40, generator=gen, dtype=torch.float64)  # [task, layer, entries]
    taus[1, 0] = taus[0, 0] + 0.01 * taus[1, 0]  # layer 0: tasks 0 and 1 nearly the same
    gram = torch.einsum("tli,sli->lts", taus, taus)
    got = L.layer_scores(torch.zeros(3, 2, 7, dtype=torch.float64), "cosine_to_mean", gram)
    for t in range(3):
        for layer in range(2):
            others = sum(taus[k, layer] for k in range(3) if k != t)
            cos = torch.dot(taus[t, layer], others) / (taus[t, layer].norm() * others.norm())
            assert float(got[t, layer]) == pytest.approx(1 - float(cos), abs=1e-12)
    assert got[0, 0] < got[2, 0] and got[1, 0] < got[2, 0]


def test_gram_matrix_accumulates_over_chunks(monkeypatch):
    monkeypatch.setattr(L, "_GRAM_CHUNK", 7)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(5, 9, generator=gen)
    experts = [base + torch.randn(5, 9, generator=gen) for _ in range(3)]
    x = torch.stack([(e - base).double().flatten() for e in experts])
    torch.testing.assert_close(L.gram_matrix(base, experts), x @ x.T)


def test_mask_rules():
    s = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    keep = L.layer_mask(s, "fraction", prune_fraction=0.4)
    assert keep[0].tolist() == [True, False, True, True, False]
    assert keep[1].tolist() == [False, False, True, True, True]  # ties go to the lower layer index
    keep = L.layer_mask(s, "zscore", z_threshold=1.0)
    assert keep[0].tolist() == [True, False, True, True, True] and keep[1].all()
    keep = L.layer_mask(s, "relative", ratio=0.5)
    assert keep[0].tolist() == [True, False, True, True, False] and keep[1].all()
    keep = L.layer_mask(s, "relative", ratio=0.9, min_layers_kept=3)
    assert keep[0].tolist() == [True, False, True, True, False]
    assert L.layer_mask(s[:, :2], "fraction", prune_fraction=0.5, min_layers_kept=0)[0].tolist() == [True, False]
    assert L.layer_mask(s[:, :2], "fraction", prune_fraction=0.5, min_layers_kept=2).all()


# --- whole models --------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["l2_ratio", "rms_ratio", "l1_ratio"])
def test_prunes_the_tiny_layer_of_one_task(score):
    base, experts = build({(0, 2): 0.01})
    merged, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score=score, rule="relative", ratio=0.2)
    assert decisions.summary["lwptv"]["pruned_layers"] == {"0": [2], "1": [], "2": []}
    for name in layer_names(2):
        assert decisions.tensors[name].keep == [False, True, True]
    assert all(d.keep is None for n, d in decisions.tensors.items() if n not in layer_names(2))
    for name in layer_names(2):
        expected = base[name] + (experts[1][name] - base[name]) + (experts[2][name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    json.dumps(decisions.to_json(), allow_nan=False)


def test_fraction_rule_prunes_the_same_number_of_layers_per_task_lowest_first():
    base, experts = build({(0, 2): 0.01})
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="l2_ratio", prune_fraction=0.5)
    pruned = decisions.summary["lwptv"]["pruned_layers"]
    assert all(len(layers) == 2 for layers in pruned.values()) and 2 in pruned["0"]
    scores = decisions.summary["lwptv"]["scores"]
    for t, layers in pruned.items():
        kept = [s for i, s in enumerate(scores[int(t)]) if i not in layers]
        assert max(scores[int(t)][i] for i in layers) <= min(kept)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert name not in decisions.tensors or decisions.tensors[name].keep is None


def test_cosine_score_prunes_the_redundant_layer():
    base, experts = build(same={(1, 1): 0})  # task 1's layer 1 is a copy of task 0's
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="cosine_to_mean", prune_fraction=0.25)
    pruned = decisions.summary["lwptv"]["pruned_layers"]
    assert pruned["0"] == [1] and pruned["1"] == [1]
    assert decisions.tensors[layer_names(1)[0]].keep[:2] == [False, False]


@pytest.mark.parametrize("inner,kwargs", [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5, "seed": 3})])
def test_layer_pruned_for_every_task_is_the_base_and_others_match_the_inner_method(inner, kwargs):
    base, experts = build({(0, 3): 0.01, (1, 3): 0.01, (2, 3): 0.01, (1, 0): 0.02})
    merged, decisions = run("lwptv", base, experts, merge_method=inner, score="l2_ratio", rule="relative", ratio=0.2, **kwargs)
    assert decisions.summary["lwptv"]["pruned_layers"] == {"0": [3], "1": [0, 3], "2": [3]}
    for name in layer_names(3):
        assert torch.equal(merged[name], base[name]), name
    expected = tm.merge_state_dicts(inner, base, pruned_experts(base, experts, decisions), **kwargs)
    for name in base:
        assert torch.equal(merged[name], expected[name]), name


def test_composes_with_wudi():
    if "wudi" not in tm.list_methods():
        pytest.skip("wudi is not registered yet")
    base, experts = build({(0, 3): 0.01, (1, 3): 0.01, (2, 3): 0.01, (2, 1): 0.01})
    merged, decisions = run("lwptv", base, experts, merge_method="wudi", score="l2_ratio", rule="relative", ratio=0.2, steps=10, lr=1e-3)
    assert decisions.summary["lwptv"]["pruned_layers"] == {"0": [3], "1": [3], "2": [1, 3]}
    for name in layer_names(3):
        assert torch.equal(merged[name], base[name]), name
    expected = tm.merge_state_dicts("wudi", base, pruned_experts(base, experts, decisions), steps=10, lr=1e-3)
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)


def test_lwptv_over_tadrop_over_ties():
    base, experts = build({(0, 2): 0.01})
    merged, decisions = run(
        "lwptv", base, experts, merge_method="tadrop", inner_merge_method="ties", score="l2_ratio", prune_fraction=0.25,
        density=0.3, min_numel=100, strength=1.0,
    )
    assert decisions.summary["lwptv"]["pruned_layers"]["0"] == [2]
    summary = decisions.summary["tadrop"]
    # the pruned (task 0, layer 2) tensors are left out of TADrop's mean: it holds over the rest
    adapted = [n for n in summary["tensors"]]
    assert set(layer_names(2)) <= set(adapted)
    for t in range(3):
        rows = [(base[n].numel(), summary["tensors"][n]["density"][t]) for n in adapted if t != 0 or n not in layer_names(2)]
        mean = sum(w * d for w, d in rows) / sum(w for w, _ in rows)
        assert mean == pytest.approx(0.3, abs=1e-9)
    for name in base:
        d = decisions.tensors.get(name)
        density = d.density if d is not None and d.density is not None else 0.3
        keep = d.keep if d is not None and d.keep is not None else [True] * 3
        es = [e[name] if k else base[name] for e, k in zip(experts, keep)]
        expected = tm.merge_tensors("ties", base[name], es, name=name, density=density)
        assert torch.equal(merged[name], expected), name


def test_include_exclude_and_layerless_tensors_are_never_pruned():
    base, experts = build({(0, 2): 0.01, (0, 1): 0.02})
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="l2_ratio", rule="relative", ratio=0.2, layer_exclude=["mlp"])
    assert decisions.summary["lwptv"]["pruned_layers"] == {"0": [1, 2], "1": [], "2": []}
    for layer in (1, 2):
        attn, mlp = layer_names(layer)
        assert decisions.tensors[attn].keep == [False, True, True]
        assert mlp not in decisions.tensors or decisions.tensors[mlp].keep is None
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="l2_ratio", prune_fraction=0.5, layer_include=["q_proj"])
    pruned = [n for n, d in decisions.tensors.items() if d.keep is not None]
    assert pruned and all("q_proj" in n for n in pruned)


def test_nothing_pruned_gives_the_inner_method_result():
    base, experts = build()
    merged = tm.merge_state_dicts("lwptv", base, experts, merge_method="ties", prune_fraction=0.0)
    plain = tm.merge_state_dicts("ties", base, experts)
    assert all(torch.equal(merged[k], plain[k]) for k in base)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"merge_method": "tiez"}, r"merge_method.*did you mean 'ties'"),
        ({"merge_method": "tadrop"}, r"inner_merge_method"),
        ({"merge_method": "ties", "inner_merge_method": "ties"}, r"only used when merge_method names a modifier"),
        ({"merge_method": "tadrop", "inner_merge_method": "linear"}, r"no density to adapt"),
        ({"merge_method": "ties", "prune_fraction": 1.0}, r"prune_fraction"),
        ({"merge_method": "ties", "rule": "top"}, r"rule.*'fraction'"),
        ({"merge_method": "ties", "score": "entropy"}, r"score.*'l2_ratio'"),
        ({"merge_method": "ties", "min_layers_kept": -1}, r"min_layers_kept"),
    ],
)
def test_bad_parameters_give_clear_errors(kwargs, match):
    base, experts = build()
    with pytest.raises(ParameterError, match=match):
        tm.merge_state_dicts("lwptv", base, experts, **kwargs)


def test_cosine_needs_two_experts():
    base, experts = build(n_experts=1)
    with pytest.raises(ParameterError, match="at least 2 experts"):
        tm.merge_state_dicts("lwptv", base, experts, merge_method="task_arithmetic", score="cosine_to_mean")
