"""Config loading: mergekit schema, value forms (scalar, gradient, filter list), mergekit semantics, errors."""

from __future__ import annotations

import pytest

from tritonmerge.config import evaluate, load_config, tensor_t
from tritonmerge.errors import ConfigError


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name in ("base", "e1", "e2"):
        p = tmp_path / name
        p.mkdir()
        paths[name] = p
    return paths


def cfg(models, method="ties", parameters=None, model_parameters=(None, None), **extra):
    d = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[n]), **({"parameters": p} if p else {})} for n, p in zip(("e1", "e2"), model_parameters)
        ],
    }
    if parameters:
        d["parameters"] = parameters
    d.update(extra)
    return d


def test_evaluate_forms():
    assert evaluate(0.3, "x", 0.5) == 0.3
    # gradient: piecewise-linear over t (mergekit evaluate_setting)
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate([0.2, 0.4, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate([0.5], "x", 0.7) == 0.5
    # filter list: first substring match wins, "*" / no filter is the catch-all, no match -> None
    flt = [{"filter": "mlp", "value": 0.1}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate(flt, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.1
    assert evaluate(flt, "model.layers.2.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(flt, "model.norm.weight", 1.0) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None
    assert evaluate(["embed", "lm_head"], "x", 0.3, literal_list=True) == ["embed", "lm_head"]


def test_tensor_t():
    assert tensor_t("model.embed_tokens.weight", 4) == 0.0
    assert tensor_t("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert tensor_t("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert tensor_t("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert tensor_t("model.norm.weight", 4) == 0.0  # mergekit's post weights read gradients at t = 0
    assert tensor_t("lm_head.weight", 4) == 0.0


def test_ties_gets_mergekit_semantics(models):
    c = load_config(cfg(models, "ties", model_parameters=({"weight": 1.0, "density": 0.5}, {"weight": 0.5})))
    p = c.resolve("model.layers.0.mlp.up_proj.weight", 0.0)
    # expert 2 has no density: mergekit's default 1.0, not our method default 0.2
    assert p["density"] == [0.5, 1.0]
    assert p["weight"] == [1.0, 0.5]
    assert p["disjoint"] == "mean" and p["normalize"] is True and p["rescale"] == "none"
    validated = c.spec.validate(p)
    assert validated.topk_scope == "tensor" and validated.consensus == "sum"
    p = load_config(cfg(models, "ties", parameters={"normalize": False})).resolve("w", 0)
    assert p["disjoint"] == "sum"


@pytest.mark.parametrize(
    "method,given,rescale,disjoint",
    [
        ("dare_ties", None, "l1", "sum"),
        ("dare_ties", True, "l1", "sum"),
        ("dare_ties", False, "none", "sum"),
        ("dare_linear", None, "l1", None),
        ("della", None, "l1", "mean"),
        ("breadcrumbs_ties", None, "none", "sum"),
    ],
)
def test_mergekit_rescale_and_normalize(models, method, given, rescale, disjoint):
    params = {"density": 0.5} | ({"rescale": given} if given is not None else {})
    if method == "della":
        params["epsilon"] = 0.1
    c = load_config(cfg(models, method, parameters=params))
    p = c.resolve("model.layers.0.mlp.up_proj.weight", 0.0)
    assert p["rescale"] == rescale
    if disjoint:
        assert p["disjoint"] == disjoint
    c.spec.validate(p)


def test_task_arithmetic_accepts_mergekit_noops(models):
    c = load_config(cfg(models, "task_arithmetic", parameters={"lambda": 0.7, "rescale": False, "int8_mask": True}))
    p = c.resolve("x", 0)
    # int8_mask is declared by the family, as in mergekit (validated, no effect on the result)
    assert p == {"lambda": 0.7, "int8_mask": True}


def test_gradient_and_filters_per_model(models):
    c = load_config(
        cfg(
            models,
            "task_arithmetic",
            parameters={"weight": 0.25},
            model_parameters=({"weight": [0.0, 1.0]}, {"weight": [{"filter": "mlp", "value": 2.0}]}),
        )
    )
    p = c.resolve("model.layers.1.mlp.down_proj.weight", 0.5)
    assert p["weight"] == [pytest.approx(0.5), 2.0]
    # no filter matches for expert 2: falls back to the global value, like mergekit
    p = c.resolve("model.layers.1.self_attn.q_proj.weight", 1.0)
    assert p["weight"] == [pytest.approx(1.0), 0.25]


def test_base_listed_in_models_is_not_an_expert(models):
    d = cfg(models, "ties")
    d["models"].insert(0, {"model": str(models["base"])})
    c = load_config(d)
    assert [m.path.name for m in c.experts] == ["e1", "e2"]


def test_linear_without_base(models):
    d = cfg(models, "linear")
    del d["base_model"]
    c = load_config(d)
    assert c.base.path == models["e1"] and len(c.experts) == 2


def test_dtypes(models):
    c = load_config(cfg(models, "linear", dtype="float32", out_dtype="bf16"))
    import torch

    assert c.dtype == torch.float32 and c.out_dtype == torch.bfloat16
    assert load_config(cfg(models, "linear", dtype="float16")).out_dtype == torch.float16
    with pytest.raises(ConfigError, match="not a dtype"):
        load_config(cfg(models, "linear", dtype="float8"))


def test_yaml_file_with_relative_paths(models, tmp_path, monkeypatch):
    (tmp_path / "c.yml").write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: e1\n  - model: e2\n")
    monkeypatch.chdir(tmp_path.parent)
    c = load_config(tmp_path / "c.yml")  # found beside the config, not in the cwd
    assert c.base.path == models["base"]


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda d: d["parameters"].update(bogus=1), r"unknown parameter 'bogus'"),
        (lambda d: d["models"][0].update(parameters={"lambda": 2}), r"'lambda' is global"),
        (lambda d: d["models"][0].update(parameters={"density": 1.5}), r"density"),
        (lambda d: d.update(merge_method="tiess"), r"unknown merge method 'tiess'"),
        (lambda d: d.update(slices=[]), r"slices"),
        (lambda d: d.update(tokenizer_source="/nonexistent/tokenizer"), r"tokenizer_source.*does not exist"),
        (lambda d: d.update(tokenizer_source="union", tokenizer={"source": "union"}), r"tokenizer_source or a tokenizer"),
        (lambda d: d.update(what=1), r"unknown config key 'what'"),
        (lambda d: d.pop("base_model"), r"needs base_model"),
        (lambda d: d["models"].append({"model": "meta-llama/Llama-3.1-8B"}), r"Hugging Face Hub id.*local"),
        (lambda d: d["models"].append({"model": "/nonexistent/folder"}), r"does not exist"),
        (lambda d: d["models"].append({"model": "some/model+some/lora"}), r"LoRA"),
    ],
)
def test_config_errors(models, mutate, pattern):
    d = cfg(models, "ties", parameters={"lambda": 1.0})
    mutate(d)
    with pytest.raises(ConfigError, match=pattern):
        load_config(d)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yml")
    (tmp_path / "bad.yml").write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yml")


def test_to_yaml_round_trips(models):
    c = load_config(cfg(models, "ties", parameters={"lambda": 0.9}, model_parameters=({"density": 0.4}, None)))
    again = load_config(c.to_yaml())
    assert again.resolve("x", 0) == c.resolve("x", 0)


def slices_cfg(models, method="ties", **extra):
    d = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "slices": [
            {"sources": [{"model": str(models[n]), "layer_range": [0, 2]} for n in ("base", "e1", "e2")]},
        ],
        "parameters": {"lambda": 1.0},
    }
    d.update(extra)
    return d


def test_slices_roles_and_parameters(models):
    d = slices_cfg(models)
    d["slices"][0]["parameters"] = {"density": 0.3}
    d["slices"][0]["sources"][1]["parameters"] = {"weight": [0.0, 1.0]}
    c = load_config(d)
    assert c.slices is not None and [m.path for m in c.slices[0].experts] == [models["e1"], models["e2"]]
    p = c.resolve("x", 0.5, slice_index=0)
    assert p["density"] == [0.3, 0.3] and p["weight"] == [0.5, 1.0]
    again = load_config(c.to_yaml())
    assert again.resolve("x", 0.5, slice_index=0) == p


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda d: d["slices"][0]["sources"][1].update(layer_range=[0, 3]), r"same number of layers"),
        (lambda d: d["slices"][0]["sources"].pop(0), r"base model .* must be one of the slice's sources"),
        (lambda d: d["slices"][0]["sources"][1].update(layer_range=[2, 1]), r"layer_range"),
        (lambda d: d["slices"][0]["sources"][2].update(model=d["slices"][0]["sources"][1]["model"]), r"appears twice"),
        (lambda d: d.update(models=[]), r"either `models` or `slices`"),
        (lambda d: d.update(merge_method="tadrop", parameters={"merge_method": "ties"}), r"not supported with `slices`"),
        (lambda d: d["slices"][0].update(residual_weight=0.5), r"residual_weight"),
        (lambda d: d["slices"][0].update(parameters={"bogus": 1}), r"unknown parameter 'bogus' in slices\[0\]"),
    ],
)
def test_slices_config_errors(models, mutate, pattern):
    d = slices_cfg(models)
    mutate(d)
    with pytest.raises(ConfigError, match=pattern):
        load_config(d)
