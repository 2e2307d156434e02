"""The methods taken from mergekit 0.1.5 (passthrough, nuslerp, multislerp, karcher, sce,
nearswap, arcee_fusion, ram, ramplus_tl; int8_mask on the task-arithmetic family): properties
of each torch reference and small cases worked by hand, and the config loader's mirror of
mergekit's input rules. Bit parity with mergekit itself is tests/test_mergekit_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

import tritonmerge as tm
from tritonmerge import config as config_module
from tritonmerge.config import load_config
from tritonmerge.errors import ConfigError, ParameterError


def _pair(seed: int = 0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.3 * torch.randn(shape, generator=g) for _ in range(3)]


# -- passthrough ---------------------------------------------------------------------------


def test_passthrough_copies_or_scales_the_one_input():
    base, (e, *_) = _pair()
    assert torch.equal(tm.merge_tensors("passthrough", base, [e]), e)
    assert torch.equal(tm.merge_tensors("passthrough", base, [e], scale=0.0), torch.zeros_like(e))
    torch.testing.assert_close(tm.merge_tensors("passthrough", base, [e], scale=-2.0), -2 * e)


# -- nuslerp -------------------------------------------------------------------------------


def test_nuslerp_quarter_turn_and_weights_give_t():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    zero = torch.zeros(2)
    half = tm.merge_tensors("nuslerp", zero, [v0, v1], weight=[1.0, 1.0], origin="zero")
    torch.testing.assert_close(half, torch.tensor([math.sqrt(0.5)] * 2))
    # t = w₂/(w₁+w₂) = 1/3: a third of the way along the arc
    third = tm.merge_tensors("nuslerp", zero, [v0, v1], weight=[2.0, 1.0], origin="zero")
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # weights summing to ~0: t = 0.5
    torch.testing.assert_close(tm.merge_tensors("nuslerp", zero, [v0, v1], weight=[1.0, -1.0], origin="zero"), half)


def test_nuslerp_endpoints_around_the_base():
    base, (e0, e1, _) = _pair(1)
    torch.testing.assert_close(tm.merge_tensors("nuslerp", base, [e0, e1], weight=[1.0, 0.0]), e0)
    torch.testing.assert_close(tm.merge_tensors("nuslerp", base, [e0, e1], weight=[0.0, 1.0]), e1)


def test_nuslerp_rows_and_columns_are_independent_slerps():
    base, (e0, e1, _) = _pair(2)
    zero = torch.zeros_like(base)
    rows = tm.merge_tensors("nuslerp", zero, [e0, e1], weight=[1.0, 3.0], nuslerp_flatten=False, origin="zero")
    cols = tm.merge_tensors(
        "nuslerp", zero, [e0, e1], weight=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True, origin="zero"
    )
    for r in range(base.shape[0]):
        one = tm.merge_tensors("nuslerp", zero[r], [e0[r], e1[r]], weight=[1.0, 3.0], origin="zero")
        torch.testing.assert_close(rows[r], one)
    for c in range(base.shape[1]):
        one = tm.merge_tensors("nuslerp", zero[:, c], [e0[:, c], e1[:, c]], weight=[1.0, 3.0], origin="zero")
        torch.testing.assert_close(cols[:, c], one)


def test_nuslerp_colinear_inputs_use_lerp():
    v = torch.linspace(1.0, 2.0, 7)
    out = tm.merge_tensors("nuslerp", torch.zeros(7), [v, 3 * v], weight=[3.0, 1.0], origin="zero")
    torch.testing.assert_close(out, 0.75 * v + 0.25 * 3 * v)


# -- multislerp ----------------------------------------------------------------------------


def test_multislerp_single_expert_and_weight_normalisation():
    base, experts = _pair(3)
    assert torch.equal(tm.merge_tensors("multislerp", base, experts[:1], weight=0.3), experts[0])
    a = tm.merge_tensors("multislerp", base, experts, weight=[1.0, 2.0, 3.0])
    b = tm.merge_tensors("multislerp", base, experts, weight=[2.0, 4.0, 6.0])
    torch.testing.assert_close(a, b)
    c = tm.merge_tensors("multislerp", base, experts, weight=[2.0, 4.0, 6.0], normalize_weights=False)
    assert not torch.allclose(a, c)


def test_multislerp_stays_on_the_sphere_of_the_mean_norm():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    out = tm.merge_tensors("multislerp", torch.zeros(2), [v0, v1], weight=[1.0, 1.0], origin="zero")
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2.0)] * 2))  # norm 2, halfway
    torch.testing.assert_close(
        tm.merge_tensors("multislerp", torch.zeros(2), [v0, v1], weight=[1.0, 0.0], origin="zero"), v0
    )


def test_multislerp_antipodal_inputs():
    v = torch.tensor([1.0, 2.0, -1.0])
    zero = torch.zeros(3)
    # two cancelling directions fall back to the weighted sum; three are an error
    out = tm.merge_tensors("multislerp", zero, [v, -v], weight=[1.0, 1.0], origin="zero")
    torch.testing.assert_close(out, torch.zeros(3))
    with pytest.raises(ParameterError, match="multislerp: the weighted directions of the experts cancel"):
        tm.merge_tensors("multislerp", zero, [v, -v, v, -v], weight=1.0, origin="zero")


# -- karcher -------------------------------------------------------------------------------


def test_karcher_means():
    base, (e, *_) = _pair(4)
    torch.testing.assert_close(tm.merge_tensors("karcher", base, [e, e, e]), e)
    v0, v1 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    out = tm.merge_tensors("karcher", torch.zeros(2), [v0, v1])
    # the midpoint direction, scaled by the mean norm (3 + 1)/2
    torch.testing.assert_close(out, 2.0 * torch.tensor([math.sqrt(0.5)] * 2))
    zero = torch.zeros(4)
    assert torch.equal(tm.merge_tensors("karcher", zero, [zero, zero]), zero)
    # a zero input is left out of the direction but counts in the norm
    torch.testing.assert_close(tm.merge_tensors("karcher", zero, [torch.tensor([4.0, 0, 0, 0]), zero]),
                               torch.tensor([2.0, 0, 0, 0]))


# -- sce -----------------------------------------------------------------------------------


def test_sce_by_hand():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, 2.0, -1.0, 0.0])
    e2 = torch.tensor([3.0, -1.0, -1.0, 0.0])
    # energies mean(τ²): 6/4 and 11/4 -> w = 6/17, 11/17; signs of the sum: +, +, −, +
    w1, w2 = 6 / 17, 11 / 17
    want = torch.tensor([(w1 * 1 + w2 * 3) / (w1 + w2), 2.0, -1.0, 0.0])
    torch.testing.assert_close(tm.merge_tensors("sce", base, [e1, e2]), want)
    # select_topk=0.5: two non-zero variances (1 and 2.25), ⌊0.5·2⌋ = 1 kept: entry 1, where the
    # elected sign is + and only expert 1 agrees
    torch.testing.assert_close(tm.merge_tensors("sce", base, [e1, e2], select_topk=0.5), torch.tensor([0.0, 2.0, 0.0, 0.0]))
    assert torch.equal(tm.merge_tensors("sce", base, [e1, e2], select_topk=0.0), base)


def test_sce_single_expert_is_that_expert():
    base, (e, *_) = _pair(5)
    torch.testing.assert_close(tm.merge_tensors("sce", base, [e]), e)


# -- nearswap and arcee_fusion -------------------------------------------------------------


def test_nearswap_by_hand():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, 0.2, -1.0, 1.0])
    out = tm.merge_tensors("nearswap", a, [b], t=0.1)
    # |Δ| ≤ t swaps; farther entries move by t/|Δ| of the way; equal entries stay
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 1.0]))
    assert torch.equal(tm.merge_tensors("nearswap", a, [b], t=0.0), a)
    with pytest.raises(ParameterError, match="nearswap: parameter 't' is required"):
        tm.merge_tensors("nearswap", a, [b])


def test_arcee_fusion_keeps_only_outlier_updates():
    base = torch.zeros(2, 50)
    expert = base.clone()
    expert[:, :] = 0.01
    expert[0, 7] = 2.0  # one large update: its row's KL and its |Δ| both stand out
    out = tm.merge_tensors("arcee_fusion", base, [expert])
    want = base.clone()
    want[0, 7] = 2.0
    assert torch.equal(out, want)
    assert torch.equal(tm.merge_tensors("arcee_fusion", base, [base.clone()]), base)


# -- ram -----------------------------------------------------------------------------------


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(5)
    e1 = torch.tensor([1.0, 2.0, 0.0, 1e-6, 3.0])
    e2 = torch.tensor([0.0, 4.0, 5.0, 0.0, 1.0])
    # entry 0 and 2: one expert alone (kept); 1 and 4: both (averaged); 3: below epsilon
    torch.testing.assert_close(tm.merge_tensors("ram", base, [e1, e2]), torch.tensor([1.0, 3.0, 5.0, 0.0, 2.0]))
    # RAM+: each expert has 2 shared, 1 unique entry: ρ = 2, boost 1 + r·min(ρ, α)
    out = tm.merge_tensors("ramplus_tl", base, [e1, e2], r=0.5, alpha=0.4)
    torch.testing.assert_close(out, torch.tensor([1.2, 3.0, 6.0, 0.0, 2.0]))
    torch.testing.assert_close(
        tm.merge_tensors("ramplus_tl", base, [e1, e2], r=0.0), tm.merge_tensors("ram", base, [e1, e2])
    )


# -- int8_mask -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "della_linear", "sce"])
def test_int8_mask_changes_nothing(method):
    base, experts = _pair(6)
    extra = {"density": 0.6, "epsilon": 0.1} if "della" in method else ({"density": 0.6} if "ties" in method else {})
    a = tm.merge_tensors(method, base, experts, int8_mask=False, **extra)
    b = tm.merge_tensors(method, base, experts, int8_mask=True, **extra)
    assert torch.equal(a, b)
    with pytest.raises(ParameterError, match="int8_mask"):
        tm.merge_tensors(method, base, experts, int8_mask="sometimes", **extra)


# -- configs: mergekit's input rules -------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    paths = {}
    for name in ("base", "e1", "e2", "e3"):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name
    return paths


def _cfg(folders, method, models, base=True, parameters=None, model_parameters=None):
    d = {"merge_method": method, "models": [
        {"model": str(folders[m]), **({"parameters": model_parameters[i]} if model_parameters else {})}
        for i, m in enumerate(models)
    ]}
    if base:
        d["base_model"] = str(folders["base"])
    if parameters:
        d["parameters"] = parameters
    return d


def test_optional_base_sets_the_origin(folders):
    w = [{"weight": 1.0}, {"weight": 2.0}]
    without = load_config(_cfg(folders, "nuslerp", ["e1", "e2"], base=False, model_parameters=w))
    assert [e.name for e in without.experts] == [str(folders["e1"]), str(folders["e2"])]
    assert without.resolve("x", 0.0)["origin"] == "zero" and "base_model" not in without.to_dict()
    again = load_config(without.to_yaml())
    assert again.resolve("x", 0.0)["origin"] == "zero"
    given = load_config(_cfg(folders, "nuslerp", ["e1", "e2"], model_parameters=w))
    assert "origin" not in given.resolve("x", 0.0) and given.base.path == folders["base"]
    with pytest.raises(ConfigError, match="origin 'base' needs base_model"):
        load_config(_cfg(folders, "multislerp", ["e1", "e2"], base=False, parameters={"origin": "base"}, model_parameters=w))


def test_input_role_counts_the_base_as_an_input(folders):
    c = load_config(_cfg(folders, "karcher", ["e1", "e2"]))
    assert [e.path for e in c.experts] == [folders["e1"], folders["e2"], folders["base"]]
    listed = load_config(_cfg(folders, "karcher", ["base", "e1"]))
    assert [e.path for e in listed.experts] == [folders["base"], folders["e1"]]
    assert [e.path for e in load_config(_cfg(folders, "passthrough", ["e1"], base=False)).experts] == [folders["e1"]]
    with pytest.raises(ConfigError, match=r"^passthrough takes exactly 1 input model\(s\), the base model counting"):
        load_config(_cfg(folders, "passthrough", ["e1"]))


@pytest.mark.parametrize(
    "method, models, base, params, message",
    [
        ("nuslerp", ["e1", "e2", "e3"], False, [{"weight": 1.0}] * 3, r"^nuslerp needs exactly 2 model\(s\); the config gives 3"),
        ("nuslerp", ["base", "e1"], True, [{"weight": 1.0}] * 2,
         r"^nuslerp needs exactly 2 model\(s\) besides the base model, which cannot be one of them"),
        ("nearswap", ["e1", "e2"], True, [{}, {}], r"^nearswap needs exactly 1 model\(s\) besides the base model"),
        ("arcee_fusion", ["e1"], False, [{}], r"^arcee_fusion merges task vectors and needs base_model"),
        ("ram", ["e1"], False, [{}], r"^ram merges task vectors and needs base_model"),
        ("nearswap", ["e1"], True, [{}], r"^nearswap: parameter 't' is required \(mergekit gives it no default\)"),
        ("multislerp", ["e1", "e2"], True, [{}, {}], r"^multislerp: parameter 'weight' is required"),
    ],
)
def test_mergekit_input_rules(folders, method, models, base, params, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(folders, method, models, base=base, model_parameters=params))


def test_int8_mask_in_configs(folders):
    ties = load_config(_cfg(folders, "ties", ["e1", "e2"], parameters={"int8_mask": True}))
    assert ties.resolve("x", 0.0)["int8_mask"] is True
    with pytest.raises(ConfigError, match="int8_mask"):
        load_config(_cfg(folders, "sce", ["e1", "e2"], parameters={"int8_mask": "sometimes"}))
    # methods mergekit gives no int8_mask still accept and drop it
    assert "int8_mask" not in load_config(_cfg(folders, "linear", ["e1", "e2"], parameters={"int8_mask": True})).resolve("x", 0.0)


def test_mergekit_only_methods_are_named_as_such(folders, monkeypatch):
    monkeypatch.setattr(config_module, "MERGEKIT_ONLY_METHODS", ("future_method",))
    with pytest.raises(ConfigError, match="'future_method' is a mergekit method that tritonmerge does not implement"):
        load_config(_cfg(folders, "future_method", ["e1"]))
