"""tritonmerge's methods run by mergekit 0.1.5 itself (tritonmerge/integrations/mergekit.py):
``tritonmerge mergekit-yaml`` and ``register()`` in mergekit's own virtualenv, tritonmerge
importable through PYTHONPATH, against mergekit's built-in ``ties`` and ``tritonmerge merge``.

Skipped, with the reason, where that virtualenv does not exist (see test_mergekit_parity.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tritonmerge.synthetic import make_llama_checkpoints

from _checkpoints import load_folder

MERGEKIT_PYTHON = Path(os.environ.get("TRITONMERGE_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python"))
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not MERGEKIT_PYTHON.exists(),
    reason=f"mergekit's virtualenv is not there ({MERGEKIT_PYTHON}); make it with benchmarks/e2e/setup_mergekit.sh",
)

WEIGHTS = [0.6, 0.4, 1.0]


def _env(with_tritonmerge: bool) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO) if with_tritonmerge else "",
    }


def _mergekit(args: list[str], cwd: Path, with_tritonmerge: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MERGEKIT_PYTHON), *args], capture_output=True, text=True, timeout=300,
        env=_env(with_tritonmerge), cwd=cwd,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mk_integration")
    base, experts = make_llama_checkpoints(
        root / "models", hidden_size=16, intermediate_size=24, num_layers=2, vocab_size=64, num_experts=3,
        dtype=torch.float32, seed=3, shard_size_bytes=None,
    )
    base = base.resolve()
    experts = [e.resolve() for e in experts]

    def config(name: str, method: str, params: dict[str, Any] | None = None, **extra: Any) -> Path:
        cfg: dict[str, Any] = {
            "merge_method": method,
            "base_model": str(base),
            "models": [
                {"model": str(e), "parameters": {"weight": w, "density": 0.5}} for e, w in zip(experts, WEIGHTS)
            ],
            "dtype": "float32",
        }
        if params:
            cfg["parameters"] = params
        cfg.update(extra)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return path

    return {"root": root, "base": base, "experts": experts, "config": config}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def test_ties_bit_identical_to_mergekit_and_tritonmerge(setup):
    """TIES with mergekit's defaults (density 1.0 where not given, normalize -> disjoint mean,
    boolean rescale) means the same in all three routes, and every route rounds once in float32."""
    root, config = setup["root"], setup["config"]
    plain = config("ties", "ties")
    prefixed = config("tm_ties", "tritonmerge_ties")
    theirs = _mergekit(["-m", "mergekit.scripts.run_yaml", str(plain), str(root / "mk_ties"), "--quiet"], root, False)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    ours_prefixed = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(prefixed), str(root / "tm_ties"), "--quiet"], root)
    assert ours_prefixed.returncode == 0, ours_prefixed.stderr[-3000:]
    # the unchanged YAML, mergekit's own name, through the override
    ours_override = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(plain), str(root / "ov_ties"), "--quiet"], root)
    assert ours_override.returncode == 0, ours_override.stderr[-3000:]
    native = subprocess.run(
        [sys.executable, "-m", "tritonmerge", "merge", str(plain), str(root / "native_ties"), "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=root,
    )
    assert native.returncode == 0, native.stderr[-3000:]
    mk = load_folder(root / "mk_ties")
    for out in ("tm_ties", "ov_ties", "native_ties"):
        _assert_identical(mk, load_folder(root / out))


def test_override_replaces_mergekit_methods_in_a_fresh_interpreter(setup):
    script = textwrap.dedent(
        """
        import mergekit.merge_methods as mm
        from tritonmerge.integrations.mergekit import register, methods_in_common
        before = type(mm.get("ties"))
        names = register(override=True)
        for name in methods_in_common():
            assert type(mm.get(name)).__name__ == "TritonMergeMethod", name
            assert type(mm.get("tritonmerge_" + name)).__name__ == "TritonMergeMethod", name
        assert before.__name__ == "GeneralizedTaskArithmeticMerge"
        for name in ("tritonmerge_wudi", "tritonmerge_tadrop", "tritonmerge_lwptv"):
            assert name in names
        register(override=True)  # twice is harmless
        spec = mm.get("tritonmerge_ties").spec
        scopes = {p.name: p.scope.value for p in spec.parameters}
        assert scopes["weight"] == "non_base" and scopes["density"] == "non_base", scopes
        assert scopes["topk_scope"] == "shared" and scopes["lambda"] == "shared", scopes
        defaults = {p.name: p.default for p in spec.parameters}
        assert defaults["density"] == 1.0 and defaults["normalize"] is True, defaults
        print("OK", sorted(names))
        """
    )
    proc = _mergekit(["-c", script], setup["root"])
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_unknown_parameter_refused_in_one_line(setup):
    root, config = setup["root"], setup["config"]
    bad = config("bad", "tritonmerge_ties", {"densty": 0.3})
    proc = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(bad), str(root / "bad_out"), "--quiet"], root)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tritonmerge: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "tritonmerge_ties" in errors[0] and "'densty'" in errors[0] and "density" in errors[0]
    assert not (root / "bad_out" / "model.safetensors").exists()


def test_global_parameter_under_a_model_refused(setup):
    """mergekit reads a shared parameter only from the global blocks: a per-model one would be dropped."""
    root, base, experts = setup["root"], setup["base"], setup["experts"]
    cfg = {
        "merge_method": "tritonmerge_ties",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "lambda": 0.5}} for e in experts],
    }
    path = root / "global_under_model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    proc = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(path), str(root / "gum_out"), "--quiet"], root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'lambda' is global" in proc.stderr


@pytest.mark.parametrize(
    "method, params",
    [("tadrop", {"merge_method": "ties"}), ("lwptv", {"merge_method": "ties"}), ("ties", {"topk_scope": "model"})],
)
def test_whole_model_methods_match_tritonmerge_merge(setup, method, params):
    """The analysis runs once per merge through mergekit's loaders and the per-tensor merge
    through api.merge_one: the same decisions and bits as ``tritonmerge merge``."""
    root, config = setup["root"], setup["config"]
    method_tag = f"{method}_{'_'.join(str(v) for v in params.values())}"
    via_mk = config(f"mk_{method_tag}", f"tritonmerge_{method}", params)
    native_cfg = config(f"native_{method_tag}", method, params)
    proc = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(via_mk), str(root / f"mk_{method_tag}"), "--quiet"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    native = subprocess.run(
        [sys.executable, "-m", "tritonmerge", "merge", str(native_cfg), str(root / f"native_{method_tag}"), "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=root,
    )
    assert native.returncode == 0, native.stderr[-3000:]
    _assert_identical(load_folder(root / f"native_{method_tag}"), load_folder(root / f"mk_{method_tag}"))


def test_slices_refused_for_whole_model_method(setup):
    root, base, experts = setup["root"], setup["base"], setup["experts"]
    cfg = {
        "merge_method": "tritonmerge_tadrop",
        "base_model": str(base),
        "parameters": {"merge_method": "ties"},
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(m), "layer_range": [0, 1]} for m in (base, *experts)]},
        ],
    }
    path = root / "slices.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    proc = _mergekit(["-m", "tritonmerge", "mergekit-yaml", str(path), str(root / "slices_out"), "--quiet"], root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tritonmerge: error:")]
    assert len(errors) == 1 and "slices" in errors[0] and "tritonmerge_tadrop" in errors[0], proc.stderr[-3000:]


def test_cli_says_when_mergekit_is_missing(tmp_path):
    try:
        import mergekit  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mergekit is importable in the test's own Python")
    proc = subprocess.run(
        [sys.executable, "-m", "tritonmerge", "mergekit-yaml", "x.yaml", "out"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "mergekit is not importable" in proc.stderr
