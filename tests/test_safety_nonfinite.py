"""Non-finite inputs are refused where they enter, for every method: a NaN that a top-k or a sign
election would drop silently, or an Inf in the base, stops the merge with one line naming the
model's path, the shard file, the tensor and the counts; no output folder is left looking
complete. ``--allow-nonfinite`` merges such inputs as they are. Through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _checkpoints import make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli
from tritonmerge.io.writer import partial_dir

SHARD = ("--out-shard-size", "20KB", "--quiet")
POISONED = "model.layers.1.mlp.up_proj.weight"


def poison(model: Path, name: str, n_nan: int, n_inf: int) -> str:
    """Write NaN/Inf into ``n_nan + n_inf`` entries of one tensor, in place; returns its file name."""
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    path = model / weight_map[name]
    tensors = load_file(str(path))
    flat = tensors[name].view(-1)
    flat[1 : 1 + n_nan] = float("nan")
    flat[40 : 40 + n_inf] = float("inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.name


METHODS = {
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5, "seed": 1},
    "task_arithmetic": {"lambda": 0.5},
    "wudi": {"steps": 5},
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("where", ["expert", "base"])
def test_nonfinite_input_is_refused_naming_model_file_tensor(tmp_path, method, where):
    base, experts = make_tiny(tmp_path / "models")
    bad_model = experts[1] if where == "expert" else base
    n_nan, n_inf = (3, 2) if where == "expert" else (0, 1)
    fname = poison(bad_model, POISONED, n_nan, n_inf)
    cfg = write_config(tmp_path / "c.yml", method, base, experts, METHODS[method])
    out = tmp_path / "out"
    r = run_cli("merge", cfg, out, *SHARD)
    line = assert_refused(r, str(bad_model), fname, repr(POISONED), f"{n_nan} NaN and {n_inf} Inf", "--allow-nonfinite")
    assert ("model 'expert_2'" in line or str(experts[1]) in line) if where == "expert" else "base model" in line
    assert not out.exists()
    if partial_dir(out).exists():  # shards before the bad tensor were finished and kept
        assert "finished shards were kept" in line and "--resume" in line
    else:
        assert "nothing was kept" in line
        assert not leftovers(out)


def test_allow_nonfinite_merges_them_with_a_warning(tmp_path):
    base, experts = make_tiny(tmp_path / "models")
    poison(experts[0], POISONED, 2, 0)
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts)
    out = tmp_path / "out"
    r = run_cli("merge", cfg, out, *SHARD, "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    assert POISONED in r.stderr and "NaN/Inf" in r.stderr
    merged = load_file(str(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][POISONED]))
    assert int(torch.isnan(merged[POISONED].float()).sum()) == 2
