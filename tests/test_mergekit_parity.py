"""Parity with mergekit 0.1.5 itself, on disk: the same YAML merged by ``mergekit-yaml`` (from
its own virtualenv, /work/venv-mergekit, made by benchmarks/e2e/setup_mergekit.sh) and by
``python -m tritonmerge merge``, every output tensor compared in units in the last place of
float32 (``dtype: float32``: both tools compute in float32 and round nowhere else).

Skipped, with the reason, where that virtualenv does not exist. The checkpoints are tiny (a
two-layer llama of width 16, about 40 KB a model) so that all mergekit merges run in one
process in a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tritonmerge.synthetic import make_llama_checkpoints

from _checkpoints import load_folder
from _mergekit import MERGEKIT_PYTHON, needs_mergekit, run_mergekit, ulp_distance

REPO = Path(__file__).resolve().parents[1]

pytestmark = needs_mergekit

# (method, global parameters, per-model parameters, with base_model, number of experts)
CASES: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]] | None, bool, int]] = {
    "passthrough": ("passthrough", {}, None, False, 1),
    "passthrough_scale": ("passthrough", {}, [{"scale": [{"filter": "mlp", "value": 0.5}, {"value": 2.0}]}], False, 1),
    "nuslerp": ("nuslerp", {}, [{"weight": 0.3}, {"weight": 0.7}], False, 2),
    "nuslerp_base_rows": (
        "nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 1.0}, {"weight": 2.0}], True, 2,
    ),
    "nuslerp_base_cols": ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 2.0}, {"weight": 1.0}], True, 2),
    "multislerp": ("multislerp", {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], False, 3),
    "multislerp_base": (
        "multislerp", {"normalize_weights": False}, [{"weight": 0.5}, {"weight": 0.25}, {"weight": 0.25}], True, 3,
    ),
    "karcher": ("karcher", {}, None, False, 3),
    "karcher_base": ("karcher", {"max_iter": 20, "tol": 1e-6}, None, True, 2),
    "sce": ("sce", {}, None, True, 3),
    "sce_topk": ("sce", {"select_topk": 0.3, "int8_mask": True}, None, True, 3),
    "nearswap": ("nearswap", {"t": 0.01}, None, True, 1),
    "arcee_fusion": ("arcee_fusion", {}, None, True, 1),
    "ram": ("ram", {"epsilon": 0.005}, None, True, 3),
    "ramplus_tl": ("ramplus_tl", {"r": 0.5, "alpha": 0.3, "epsilon": 0.005}, None, True, 3),
    # a gradient over the layers: the embeddings, final norm and lm_head take its t = 0 value
    "linear_gradient": ("linear", {}, [{"weight": [0.2, 0.8]}, {"weight": 1.0}], False, 2),
    "ties_int8_mask": ("ties", {"density": 0.5, "int8_mask": True}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 1.0}], True, 3),
    "task_arithmetic": ("task_arithmetic", {}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}], True, 3),
    "task_arithmetic_lambda": ("task_arithmetic", {"lambda": 0.7, "normalize": True}, [{"weight": 0.6}, {"weight": 0.3}], True, 2),
    "slerp": ("slerp", {"t": 0.3}, None, True, 1),
    "slerp_gradient": ("slerp", {"t": [0.0, 0.5, 1.0]}, None, True, 1),
    "model_stock": ("model_stock", {}, None, True, 3),
    "breadcrumbs": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}], True, 3),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}], True, 3),
    "linear_three": ("linear", {}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}], False, 3),
}

@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Any]:
    """Per case: (mergekit's output tensors or its error, ours or our error); under "inputs"
    the base's and the experts' tensors."""
    root = tmp_path_factory.mktemp("parity")
    base, experts = make_llama_checkpoints(
        root / "models", hidden_size=16, intermediate_size=24, num_layers=2, vocab_size=64, num_experts=3,
        dtype=torch.float32, seed=3, shard_size_bytes=None,
    )
    jobs = []
    for case, (method, params, per_model, with_base, n) in CASES.items():
        models = []
        for i, e in enumerate(experts[:n]):
            entry: dict[str, Any] = {"model": str(e)}
            if per_model:
                entry["parameters"] = per_model[i]
            models.append(entry)
        cfg: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
        if with_base:
            cfg["base_model"] = str(base)
        if params:
            cfg["parameters"] = params
        path = root / f"{case}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        jobs.append((case, path, root / f"mergekit_{case}", root / f"ours_{case}"))

    results = {"inputs": [load_folder(m) for m in (base, *experts)]}
    results.update(run_both(root, jobs, load_folder))
    return results


def run_both(root: Path, jobs: list[tuple[str, Path, Path, Path]], read) -> dict[str, tuple[Any, Any]]:
    """case -> (mergekit's output, ours), each read by ``read`` or the error text: every YAML of
    ``jobs`` through mergekit-yaml (one process of its virtualenv) and ``tritonmerge merge``."""
    theirs_status = run_mergekit([(p, m) for _, p, m, _ in jobs], cwd=root, timeout=600)
    results: dict[str, tuple[Any, Any]] = {}
    for case, path, mk_out, our_out in jobs:
        ours = subprocess.run(
            [sys.executable, "-m", "tritonmerge", "merge", str(path), str(our_out), "--quiet"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=root,
        )
        mine: Any = read(our_out) if ours.returncode == 0 else (ours.stderr.strip() or ours.stdout.strip())
        status = theirs_status.get(str(mk_out), "not run")
        results[case] = (read(mk_out) if status == "ok" else status, mine)
    return results


def outputs_of(results: dict[str, Any], case: str) -> tuple[Any, Any]:
    """(mergekit's output, ours) for a case, failing with the error text where either tool failed."""
    theirs, ours = results[case]
    assert not isinstance(theirs, str), f"mergekit failed on {case}: {theirs}"
    assert not isinstance(ours, str), f"tritonmerge failed on {case}: {ours}"
    return theirs, ours


def assert_same_tensor_names_and_shapes(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}"
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_mergekit_within_one_ulp(merged, case):
    theirs, ours = outputs_of(merged, case)
    assert_same_tensor_names_and_shapes(ours, theirs)
    worst = {}
    for name in sorted(theirs):
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        worst[name] = ulp_distance(ours[name], theirs[name])
    if case != "passthrough":  # a merge that returned one of its inputs would prove little
        for model in merged["inputs"]:
            assert any(not torch.equal(theirs[n], model[n]) for n in theirs), f"{case}: the output is an input model"
    # for the report: the largest difference of each case
    print(f"{case}: max {max(worst.values())} ulp over {len(worst)} tensors")
    bad = {n: d for n, d in worst.items() if d > 1}
    assert not bad, f"{case}: tensors beyond 1 ulp of mergekit's: {bad}"


def test_ulp_distance_counts_representable_steps():
    one = torch.tensor([1.0])
    assert ulp_distance(one, one) == 0
    assert ulp_distance(one, torch.nextafter(one, torch.tensor([2.0]))) == 1
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == 0
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    assert ulp_distance(tiny, -tiny) == 2 * int(tiny.view(torch.int32))


# `slices:` configs over four-layer models A and B (and the base): name -> (method, global
# parameters, base_model given, slices as [(parameters or None, [(model, layer_range, parameters or None)])]);
# "base", "A", "B" name the models
SLICE_CASES: dict[str, tuple[str, dict[str, Any], bool, list]] = {
    # layers [0, 2) of A then [1, 3) of B: output layers renumbered 0..3
    "slices_frankenmerge": ("passthrough", {}, False, [(None, [("A", [0, 2], None)]), (None, [("B", [1, 3], None)])]),
    # a gradient over a three-layer slice (t = 0, 0.5, 1) against a scalar, different ranges per model
    "slices_linear": ("linear", {}, False, [(None, [("A", [0, 3], {"weight": [0.2, 0.8]}), ("B", [1, 4], {"weight": 0.5})])]),
    # per-slice parameters overriding the global density, per-source weights and gradients
    "slices_ties": (
        "ties", {"density": 0.6}, True,
        [
            ({"density": 0.4}, [("base", [0, 2], None), ("A", [0, 2], {"weight": [1.0, 0.3]}), ("B", [2, 4], {"weight": 0.5})]),
            ({"density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]},
             [("base", [2, 4], None), ("A", [2, 4], {"weight": 0.7}), ("B", [0, 2], {"weight": [0.2, 0.9]})]),
        ],
    ),
}


@pytest.fixture(scope="module")
def merged_slices(tmp_path_factory) -> dict[str, Any]:
    """Per slices case: (mergekit's output tensors and config.json, or its error; ours alike)."""
    root = tmp_path_factory.mktemp("parity_slices")
    base, experts = make_llama_checkpoints(
        root / "models", hidden_size=16, intermediate_size=24, num_layers=4, vocab_size=64, num_experts=2,
        dtype=torch.float32, seed=5, shard_size_bytes=None,
    )
    paths = {"base": str(base), "A": str(experts[0]), "B": str(experts[1])}
    jobs = []
    for case, (method, params, with_base, slices) in SLICE_CASES.items():
        out_slices = []
        for sparams, sources in slices:
            srcs = [
                {"model": paths[m], "layer_range": r, **({"parameters": p} if p else {})} for m, r, p in sources
            ]
            out_slices.append({"sources": srcs, **({"parameters": sparams} if sparams else {})})
        cfg: dict[str, Any] = {"merge_method": method, "slices": out_slices, "dtype": "float32"}
        if with_base:
            cfg["base_model"] = paths["base"]
        if params:
            cfg["parameters"] = params
        path = root / f"{case}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        jobs.append((case, path, root / f"mergekit_{case}", root / f"ours_{case}"))

    def read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_folder(folder), json.loads((folder / "config.json").read_text(encoding="utf-8"))

    return run_both(root, jobs, read)


@pytest.mark.parametrize("case", list(SLICE_CASES))
def test_slices_match_mergekit_exactly(merged_slices, case):
    (t_tensors, t_config), (o_tensors, o_config) = outputs_of(merged_slices, case)
    assert_same_tensor_names_and_shapes(o_tensors, t_tensors)
    assert o_config["num_hidden_layers"] == t_config["num_hidden_layers"]
    worst = {}
    for name in sorted(t_tensors):
        assert o_tensors[name].dtype == t_tensors[name].dtype == torch.float32, name
        worst[name] = ulp_distance(o_tensors[name], t_tensors[name])
    print(f"{case}: max {max(worst.values())} ulp over {len(worst)} tensors, {o_config['num_hidden_layers']} layers")
    bad = {n: d for n, d in worst.items() if d > 0}
    assert not bad, f"{case}: tensors differing from mergekit's: {bad}"


def test_frankenmerge_renumbers_layers(merged_slices):
    """Layers [0, 2) of A then [1, 3) of B: output layers 0, 1 are A's 0, 1 and 2, 3 are B's 1, 2."""
    _, ours = merged_slices["slices_frankenmerge"]
    assert not isinstance(ours, str), ours
    tensors, config = ours
    assert config["num_hidden_layers"] == 4
    assert sorted({int(n.split(".")[2]) for n in tensors if ".layers." in n}) == [0, 1, 2, 3]


def test_shard_sizes_read_as_mergekit_reads_them():
    """``--out-shard-size`` and friends: mergekit's counts (K, M and a bare B for billion) give
    the same bytes here as mergekit's own parser."""
    from tritonmerge.io.writer import parse_size

    values = ["5B", "2B", "500M", "1K", "123"]
    proc = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", "import json, sys; from mergekit.common import parse_kmb; "
         "print(json.dumps([parse_kmb(v) for v in json.loads(sys.argv[1])]))", json.dumps(values)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert [parse_size(v) for v in values] == json.loads(proc.stdout)


# Random methods (DARE, DELLA): mergekit draws its masks with torch.bernoulli, tritonmerge with a
# counter-based hash, so the outputs cannot be equal; they must have the same distribution. Per
# output entry, f(out − base) (nonzero, the value, its magnitude, its square; scaled per tensor by
# the RMS of the first task vector) is compared between the two tools, paired by entry: the mean
# paired difference over ~130k entries must lie within 5 standard errors of zero. The masks of
# different entries are independent draws in both tools, so the paired differences are too.
RANDOM_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dare_linear": ("dare_linear", {"density": 0.6}),
    "dare_linear_d05": ("dare_linear", {"density": 0.5}),
    "dare_linear_no_rescale": ("dare_linear", {"density": 0.5, "rescale": False}),
    "dare_ties": ("dare_ties", {"density": 0.5}),
    "della": ("della", {"density": 0.6, "epsilon": 0.2}),
    "della_linear": ("della_linear", {"density": 0.7, "epsilon": 0.1}),
}
RANDOM_WEIGHTS = [0.6, 0.4, 0.3]
Z_LIMIT = 5.0


@pytest.fixture(scope="module")
def merged_random(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("parity_random")
    base, experts = make_llama_checkpoints(
        root / "models", hidden_size=64, intermediate_size=160, num_layers=2, vocab_size=256, num_experts=3,
        dtype=torch.float32, seed=11, shard_size_bytes=None,
    )
    jobs = []
    for case, (method, params) in RANDOM_CASES.items():
        cfg = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, RANDOM_WEIGHTS)],
            "parameters": params,
            "dtype": "float32",
        }
        path = root / f"{case}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        jobs.append((case, path, root / f"mergekit_{case}", root / f"ours_{case}"))
    results = {"inputs": [load_folder(m) for m in (base, *experts)]}
    results.update(run_both(root, jobs, load_folder))
    return results


def _paired_z(inputs: list[dict[str, torch.Tensor]], ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Statistic name -> z of the mean paired difference (ours − theirs) over every entry."""
    base, first = inputs[0], inputs[1]
    parts: dict[str, list[torch.Tensor]] = {"nonzero": [], "value": [], "magnitude": [], "square": []}
    for name in sorted(theirs):
        scale = float((first[name].double() - base[name].double()).pow(2).mean().sqrt()) or 1.0
        a = (ours[name].double() - base[name].double()).flatten() / scale
        b = (theirs[name].double() - base[name].double()).flatten() / scale
        parts["nonzero"].append((a != 0).double() - (b != 0).double())
        parts["value"].append(a - b)
        parts["magnitude"].append(a.abs() - b.abs())
        parts["square"].append(a * a - b * b)
    z = {}
    for stat, chunks in parts.items():
        x = torch.cat(chunks)
        se = float(x.std()) / len(x) ** 0.5
        z[stat] = float(x.mean()) / se if se > 0 else 0.0
    return z


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_methods_match_mergekit_in_distribution(merged_random, case):
    theirs, ours = outputs_of(merged_random, case)
    assert_same_tensor_names_and_shapes(ours, theirs)
    z = _paired_z(merged_random["inputs"], ours, theirs)
    print(f"{case}: paired z " + ", ".join(f"{k} {v:+.2f}" for k, v in z.items()))
    assert all(abs(v) < Z_LIMIT for v in z.values()), f"{case}: distributions differ from mergekit's: {z}"


def test_random_comparison_tells_densities_apart(merged_random):
    """The comparison has power: density 0.5 against mergekit's 0.6 is rejected."""
    theirs, _ = merged_random["dare_linear"]
    _, ours = merged_random["dare_linear_d05"]
    z = _paired_z(merged_random["inputs"], ours, theirs)
    assert max(abs(v) for v in z.values()) > 4 * Z_LIMIT, z


def test_the_readme_column_names_the_methods_compared_here():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_method_table", REPO / "tools" / "gen_method_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.MERGEKIT_PARITY == {method for method, *_ in CASES.values()} | {m for m, *_ in SLICE_CASES.values()}
    assert table.MERGEKIT_SAME_DISTRIBUTION == {method for method, _ in RANDOM_CASES.values()}
    # and together they are every method in mergekit's own registry
    listed = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", "from mergekit.merge_methods.registry import registered_methods as r; "
         "print(' '.join(m.spec.name for m in r()))"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert set(listed.stdout.split()) == table.MERGEKIT_PARITY | table.MERGEKIT_SAME_DISTRIBUTION
