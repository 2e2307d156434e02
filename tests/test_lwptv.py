"""LwPTV (a reconstruction, see docs/modifiers.md): scores and masks on small tables, the layers
pruned on constructed models, the merged result (a pruned task contributes nothing; a layer pruned
for every task is the base), and composition with other methods and with TADrop."""

from __future__ import annotations

import json

import pytest
import torch

import tritonmerge as tm
from tritonmerge import backends
from tritonmerge.context import MergeReport, layer_index
from tritonmerge.errors import ParameterError
from tritonmerge.methods import lwptv as L
from tritonmerge.ops.stats import sign_counts_reference
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
    # these tests were written for the per-block, per-task reading by cosine_to_mean at 1 layer of
    # 6; the defaults (halves, sign_conflict, 34% over the whole model) came later from the quality
    # sweeps and are tested on their own below
    if method == "lwptv":
        kwargs.setdefault("unit", "block")
        kwargs.setdefault("prune_fraction", 0.17)
        kwargs.setdefault("score", "cosine_to_mean")
        kwargs.setdefault("threshold_scope", "task")
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
    from tritonmerge.ops import stats

    monkeypatch.setattr(stats, "CHUNK", 7)
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


# --- units: block halves and single tensors -------------------------------------------------------

BERT_LAYER = [
    "attention.self.query.weight", "attention.self.key.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.LayerNorm.weight",
    "intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.bias",
]
BERT_ATTN = {"attention.self.query.weight", "attention.self.key.weight", "attention.self.value.bias",
             "attention.output.dense.weight", "attention.output.LayerNorm.weight"}
LLAMA_LAYER = [
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
LLAMA_ATTN = {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
              "self_attn.v_proj.weight", "self_attn.o_proj.weight"}
GPT2_LAYER = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.bias", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_proj.weight"]
GPT2_ATTN = {"ln_1.weight", "attn.c_attn.weight", "attn.c_proj.bias"}


def named_model(names, n_experts=3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(6, 4, generator=gen).to(dtype) for n in names}
    experts = [{n: v + 0.01 * torch.randn(v.shape, generator=gen).to(dtype) for n, v in base.items()} for _ in range(n_experts)]
    return base, experts


def params(**kwargs):
    return L.LwptvParams(merge_method="task_arithmetic", **kwargs)


@pytest.mark.parametrize("prefix,layer,attn", [
    ("bert.encoder.layer.{}.", BERT_LAYER, BERT_ATTN),
    ("model.layers.{}.", LLAMA_LAYER, LLAMA_ATTN),
    ("transformer.h.{}.", GPT2_LAYER, GPT2_ATTN),
])
def test_half_units_split_blocks_by_name(prefix, layer, attn):
    names = ["embeddings.weight", *[prefix.format(i) + n for i in range(2) for n in layer], "norm.weight"]
    units, position = L.group_units(names, lambda n: torch.float32, params(unit="half"))
    assert units.names == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert units.layers == [0, 0, 1, 1]
    for i in range(2):
        assert units.tensors[2 * i] == [prefix.format(i) + n for n in layer if n in attn]
        assert units.tensors[2 * i + 1] == [prefix.format(i) + n for n in layer if n not in attn]
    assert "embeddings.weight" not in position and "norm.weight" not in position
    # the whole merge: each unit's tensors carry the same keep flags, the summary names the units
    base, experts = named_model(names)
    for n in units.tensors[1]:  # task 0's MLP half of layer 0 barely moves
        experts[0][n] = base[n] + 0.001 * (experts[0][n] - base[n])
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", unit="half", score="l2_ratio", rule="relative", ratio=0.2)
    summary = decisions.summary["lwptv"]
    assert summary["unit"] == "half" and summary["units"] == units.names
    assert summary["tensors_per_unit"] == {u: len(t) for u, t in zip(units.names, units.tensors)}
    assert summary["pruned_units"] == {"0": ["0.mlp"], "1": [], "2": []}
    assert "pruned_layers" not in summary
    for n in names:
        keep = decisions.tensors[n].keep if n in decisions.tensors else None
        assert keep == ([False, True, True] if n in units.tensors[1] else None), n


def test_half_patterns_are_parameters_and_unmatched_tensors_follow_half_unmatched():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.router.weight"]
    units, _ = L.group_units(names, lambda n: torch.float32, params(unit="half"))
    assert units.names == ["0.attn", "0.mlp", "0.other"] and units.tensors[2] == ["model.layers.0.router.weight"]
    units, position = L.group_units(names, lambda n: torch.float32, params(unit="half", half_unmatched="keep"))
    assert units.names == ["0.attn", "0.mlp"] and "model.layers.0.router.weight" not in position
    units, _ = L.group_units(names, lambda n: torch.float32, params(unit="half", mlp_patterns=["mlp", "router"]))
    assert units.tensors[1] == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.router.weight"]
    with pytest.raises(ParameterError, match="router.*half_unmatched"):
        L.group_units(names, lambda n: torch.float32, params(unit="half", half_unmatched="error"))
    # the leftmost pattern decides, a longer one at the same position; case-insensitive
    assert L.half_of("post_attention_layernorm.weight", L.DEFAULT_ATTN_PATTERNS, L.DEFAULT_MLP_PATTERNS) == "mlp"
    assert L.half_of("attention.output.LayerNorm.weight", L.DEFAULT_ATTN_PATTERNS, L.DEFAULT_MLP_PATTERNS) == "attn"
    assert L.half_of("SelfAttention.q.weight", L.DEFAULT_ATTN_PATTERNS, L.DEFAULT_MLP_PATTERNS) == "attn"
    assert L.half_of("ffn_norm.weight", L.DEFAULT_ATTN_PATTERNS, L.DEFAULT_MLP_PATTERNS) == "mlp"


def test_tensor_units_prune_one_tensor_not_its_layer():
    base, experts = build()
    small = layer_names(2)[1]
    experts[0][small] = base[small] + 0.01 * (experts[0][small] - base[small])
    merged, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", unit="tensor", score="l2_ratio", rule="relative", ratio=0.2)
    summary = decisions.summary["lwptv"]
    assert summary["units"] == sorted((n for n in NAMES if layer_index(n) is not None), key=lambda n: (layer_index(n), n))
    assert summary["unit_layers"] == [layer_index(n) for n in summary["units"]]
    assert summary["pruned_units"] == {"0": [small], "1": [], "2": []}
    assert decisions.tensors[small].keep == [False, True, True]
    other = layer_names(2)[0]
    assert other not in decisions.tensors or decisions.tensors[other].keep is None
    expected = base[small] + (experts[1][small] - base[small]) + (experts[2][small] - base[small])
    torch.testing.assert_close(merged[small], expected, rtol=0, atol=1e-6)


def test_block_summary_keeps_its_layer_keys_and_names_units():
    base, experts = build({(0, 2): 0.01})
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="l2_ratio", rule="relative", ratio=0.2)
    summary = decisions.summary["lwptv"]
    assert summary["unit"] == "block" and summary["threshold_scope"] == "task"
    assert summary["units"] == ["0", "1", "2", "3"] and summary["layers"] == [0, 1, 2, 3]
    assert summary["pruned_units"] == {"0": ["2"], "1": [], "2": []} and summary["pruned_layers"]["0"] == [2]


# --- cross-task scores, by hand ------------------------------------------------------------------


def test_cosine_to_others_by_hand():
    taus = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # task 3: zero
    gram = (taus @ taus.T).unsqueeze(0)
    got = L.layer_scores(torch.zeros(4, 1, 7, dtype=torch.float64), "cosine_to_others", gram)[:, 0]
    c = 2**-0.5  # cos(τ0, τ1) = cos(τ1, τ2); τ0 ⟂ τ2; a zero τ counts as orthogonal
    expected = torch.tensor([1 - (c + 0 + 0) / 3, 1 - (c + c + 0) / 3, 1 - (0 + c + 0) / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # differs from cosine_to_mean, which compares with the others' sum
    mean = L.layer_scores(torch.zeros(4, 1, 7, dtype=torch.float64), "cosine_to_mean", gram)[:, 0]
    assert float(mean[1]) == pytest.approx(1 - 1.0, abs=1e-12) and float(got[1]) != pytest.approx(float(mean[1]))


SIGN_TAUS = [[1.0, -1.0, 2.0, 0.0], [1.0, 1.0, -1.0, 3.0], [-3.0, 1.0, 0.0, 1.0]]
TOP_TAUS = [[5.0, 4.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0, 0.0], [1.0, 0.0, 1.0, 0.0, 2.0]]


def test_sign_counts_by_hand():
    base = torch.full((4,), 0.5, dtype=torch.float64)
    experts = [base + torch.tensor(t, dtype=torch.float64) for t in SIGN_TAUS]
    # others' sums: [-2, 2, -1, 4], [-2, 0, 2, 1], [2, 0, 1, 3]; a zero on either side is neither
    expected = torch.tensor([[3, 0], [2, 1], [1, 1]], dtype=torch.float64)
    torch.testing.assert_close(sign_counts_reference(base, experts), expected, rtol=0, atol=0)
    f32 = [e.float() for e in experts]  # what LwPTV runs (the fused CPU loop where it is built)
    torch.testing.assert_close(backends.run_op("sign_counts", base.float(), f32), expected, rtol=0, atol=0)


def test_top_overlap_counts_by_hand():
    base = torch.zeros(5, dtype=torch.float64)
    experts = [torch.tensor(t, dtype=torch.float64) for t in TOP_TAUS]
    # k = ⌊0.4·5⌋ = 2. Tops: {0, 1}; {3} (its second pick is a zero, left out); {4, 0} (the tie
    # between entries 0 and 2 at |τ| = 1 goes to the lower index)
    expected = torch.tensor([[1, 2], [0, 1], [1, 2]], dtype=torch.float64)
    torch.testing.assert_close(L.top_overlap_counts(base, experts, 0.4), expected, rtol=0, atol=0)


def split_model(taus, cut):
    """One layer of two float64 tensors holding entries [:cut] and [cut:] of each task vector, on
    a base of 0.5 (exact differences), plus an unscored embedding."""
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    width = len(taus[0])
    base = {"model.embed_tokens.weight": torch.zeros(3, dtype=torch.float64),
            names[0]: torch.full((cut,), 0.5, dtype=torch.float64), names[1]: torch.full((width - cut,), 0.5, dtype=torch.float64)}
    experts = []
    for t in taus:
        tau = torch.tensor(t, dtype=torch.float64)
        experts.append({"model.embed_tokens.weight": base["model.embed_tokens.weight"] + 1,
                        names[0]: base[names[0]] + tau[:cut], names[1]: base[names[1]] + tau[cut:]})
    return base, experts


@pytest.mark.parametrize("orientation,expected", [("conflict_salient", [3 / 4, 2 / 4, 1 / 4]), ("agreement_salient", [0.0, 1 / 4, 1 / 4])])
def test_sign_conflict_score_pooled_over_a_block(orientation, expected):
    base, experts = split_model(SIGN_TAUS, 2)
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="sign_conflict",
                       sign_orientation=orientation, prune_fraction=0.0)
    scores = [row[0] for row in decisions.summary["lwptv"]["scores"]]
    assert scores == pytest.approx(expected, abs=1e-12)
    assert decisions.summary["lwptv"]["sign_orientation"] == orientation


def test_top_overlap_score_pooled_over_a_block():
    base, experts = split_model(TOP_TAUS, 5)  # one tensor: the counts above
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="top_overlap", top_density=0.4, prune_fraction=0.0)
    assert [row[0] for row in decisions.summary["lwptv"]["scores"]] == pytest.approx([0.5, 1.0, 0.5], abs=1e-12)
    # two tensors of 3 and 2 entries: k = 1 in each, counts pooled over the block
    base, experts = split_model(TOP_TAUS, 3)
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score="top_overlap", top_density=0.4, prune_fraction=0.0)
    # tops [:3]: {0}, {} (all zero), {0} (tie 0/2 -> 0); tops [3:]: {} (zeros), {3}, {4}
    assert [row[0] for row in decisions.summary["lwptv"]["scores"]] == pytest.approx([0.0, 1.0, 0.5], abs=1e-12)


@pytest.mark.parametrize("score", ["cosine_to_others", "top_overlap", "sign_conflict"])
def test_cross_task_scores_prune_the_redundant_layer_and_need_two_experts(score):
    base, experts = build(same={(1, 1): 0})  # task 1's layer 1 is a copy of task 0's
    _, decisions = run("lwptv", base, experts, merge_method="task_arithmetic", score=score, prune_fraction=0.25,
                       **({"sign_orientation": "conflict_salient"} if score == "sign_conflict" else {}))
    pruned = decisions.summary["lwptv"]["pruned_layers"]
    assert pruned["0"] == [1] and pruned["1"] == [1]
    base, experts = build(n_experts=1)
    with pytest.raises(ParameterError, match="at least 2 experts"):
        tm.merge_state_dicts("lwptv", base, experts, merge_method="task_arithmetic", score=score)


# --- threshold scope ------------------------------------------------------------------------------


def test_model_scope_pools_all_pairs():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    task = L.layer_mask(s, "fraction", prune_fraction=0.25, min_layers_kept=0)
    model = L.layer_mask(s, "fraction", prune_fraction=0.25, min_layers_kept=0, scope="model")
    assert task.tolist() == [[False, True, True, True], [False, True, True, True]]
    assert model.tolist() == [[False, False, True, True], [True, True, True, True]]
    # ties go to the lower unit, then the lower task
    flat = torch.ones(2, 3, dtype=torch.float64)
    assert L.layer_mask(flat, "fraction", prune_fraction=0.5, min_layers_kept=0, scope="model").tolist() == [
        [False, False, True], [False, True, True]]
    assert L.layer_mask(s, "relative", ratio=0.5, min_layers_kept=0, scope="model").tolist() == [
        [False, False, False, False], [False, True, True, True]]
    z = L.layer_mask(s, "zscore", z_threshold=0.5, min_layers_kept=0, scope="model")
    assert z.tolist() == [[False, False, False, False], [True, True, True, True]]


def test_min_layers_kept_holds_per_task_under_model_scope():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    keep = L.layer_mask(s, "fraction", prune_fraction=0.5, min_layers_kept=2, scope="model")
    assert keep.tolist() == [[False, False, True, True], [True, True, True, True]]
    keep = L.layer_mask(s, "relative", ratio=0.9, min_layers_kept=1, scope="model")
    assert keep.tolist() == [[False, False, False, True], [False, False, False, True]]


def test_model_scope_differs_from_task_scope_on_a_model():
    base, experts = build({(0, 1): 0.05, (0, 2): 0.05, (0, 3): 0.05})  # task 0 moved in layer 0 only
    common = dict(merge_method="task_arithmetic", score="l2_ratio", prune_fraction=0.25, min_layers_kept=1)
    _, by_task = run("lwptv", base, experts, **common)
    _, by_model = run("lwptv", base, experts, threshold_scope="model", **common)
    pruned_task = by_task.summary["lwptv"]["pruned_layers"]
    pruned_model = by_model.summary["lwptv"]["pruned_layers"]
    assert all(len(v) == 1 for v in pruned_task.values())
    assert sorted(pruned_model["0"]) == [1, 2, 3]  # ⌊0.25·12⌋ = 3 pairs, all task 0's
    assert pruned_model["1"] == [] and pruned_model["2"] == []
    assert by_model.summary["lwptv"]["threshold_scope"] == "model"
    _, kept = run("lwptv", base, experts, threshold_scope="model", **{**common, "min_layers_kept": 2})
    assert len(kept.summary["lwptv"]["pruned_layers"]["0"]) == 2  # restored up to 2 kept layers


# --- the disk engine -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"score": "sign_conflict", "unit": "half", "threshold_scope": "model", "prune_fraction": 0.34},
    {"score": "top_overlap", "top_density": 0.2, "unit": "tensor", "prune_fraction": 0.3},
    {"score": "cosine_to_others", "prune_fraction": 0.34},
])
def test_engine_on_disk_equals_in_memory_for_new_readings(tmp_path, extra):
    from _checkpoints import disk_and_memory_merges

    got, expected, saved, report = disk_and_memory_merges(tmp_path, "lwptv", {"merge_method": "ties", "density": 0.5, **extra})
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    summary = json.loads(json.dumps(report.decisions.summary["lwptv"]))
    assert saved["summary"]["lwptv"] == summary
    assert any(summary["pruned_units"].values()), "something must be pruned"
    if extra.get("unit") == "half":
        assert summary["units"] == [f"{i}.{h}" for i in range(3) for h in ("attn", "mlp")]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_density": 0.2}, r"'top_density' is only used with score='top_overlap'"),
        ({"score": "l2_ratio", "sign_orientation": "agreement_salient"}, r"'sign_orientation' is only used"),
        ({"score": "top_overlap", "top_density": 0.0}, r"top_density"),
        ({"score": "cosine_to_mean", "sign_orientation": "agreement_salient"}, r"'sign_orientation' is only used with score='sign_conflict'"),
        ({"unit": "block", "attn_patterns": ["attn"]}, r"'attn_patterns' is only used with unit='half'"),
        ({"half_unmatched": "keep", "unit": "tensor"}, r"'half_unmatched' is only used with unit='half'"),
        ({"unit": "half", "mlp_patterns": []}, r"'mlp_patterns' must be a non-empty list"),
        ({"unit": "half", "attn_patterns": ["attn", "MLP"]}, r"'attn_patterns' and 'mlp_patterns' share \['mlp'\]"),
        ({"unit": "row"}, r"unit.*'block'"),
        ({"threshold_scope": "global"}, r"threshold_scope.*'task'"),
        ({"score": "sign_conflict", "sign_orientation": "up"}, r"sign_orientation.*'conflict_salient'"),
    ],
)
def test_bad_new_parameters_give_clear_errors(kwargs, match):
    # (an unused parameter left at its default is accepted: configs that write every default out)
    base, experts = build()
    with pytest.raises(ParameterError, match=match) as info:
        tm.merge_state_dicts("lwptv", base, experts, merge_method="ties", **kwargs)
    assert "\n" not in str(info.value)


def test_unused_parameters_at_their_defaults_are_accepted_and_configs_round_trip(tmp_path):
    base, experts = build()
    defaults = dict(top_density=0.1, sign_orientation="conflict_salient", attn_patterns=list(L.DEFAULT_ATTN_PATTERNS),
                    mlp_patterns=list(L.DEFAULT_MLP_PATTERNS), half_unmatched="unit")
    merged = tm.merge_state_dicts("lwptv", base, experts, merge_method="ties", **defaults)
    plain = tm.merge_state_dicts("lwptv", base, experts, merge_method="ties")
    assert all(torch.equal(merged[k], plain[k]) for k in base)
    from tritonmerge.integrations.fusion_bench import path_mode_refusal

    given = {"merge_method": "ties", "score": "top_overlap", "top_density": 0.2, "unit": "half", "threshold_scope": "model"}
    paths = [tmp_path / d for d in ("b", "e1", "e2")]
    for d in paths:
        d.mkdir()
    assert path_mode_refusal("lwptv", given, [str(d) for d in paths]) is None


def test_defaults_are_the_validation_sweeps_choice():
    from tritonmerge.methods.lwptv import LwptvParams

    p = LwptvParams(merge_method="task_arithmetic")
    assert (p.unit, p.score, p.prune_fraction, p.threshold_scope) == ("half", "sign_conflict", 0.34, "model")
    base, experts = build()
    report = MergeReport()
    tm.merge_state_dicts("lwptv", base, experts, report=report, merge_method="task_arithmetic")
    summary = report.decisions.summary["lwptv"]
    assert summary["unit"] == "half" and summary["threshold_scope"] == "model"
    assert any(units for units in summary["pruned_units"].values())
