"""Parity with mergekit 0.1.5 on ``.bin`` inputs: ``pytorch_model.bin`` and a sharded
``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``, merged by both tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonmerge.synthetic import make_llama_checkpoints

from _checkpoints import load_folder
from _mergekit import needs_mergekit, run_mergekit, ulp_distance
from _cli import cli_env

pytestmark = needs_mergekit


def _to_bin(folder: Path, sharded: bool) -> None:
    state = load_folder(folder)
    for f in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        f.unlink()
    if not sharded:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    half = len(names) // 2
    parts = [names[:half], names[half:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fn = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({n: state[n] for n in part}, folder / fn)
        weight_map.update({n: fn for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True], ids=["bin", "sharded_bin"])
@pytest.mark.parametrize("method", [
    "linear",
    "ties",
])
def test_bin_inputs_match_mergekit(tmp_path, method, sharded):
    make_llama_checkpoints(tmp_path, hidden_size=32, intermediate_size=64, num_layers=2, vocab_size=64,
                           num_experts=2, dtype=torch.float32, num_heads=2, num_kv_heads=2)
    for name in ("base", "expert_1", "expert_2"):
        _to_bin(tmp_path / name, sharded)
    base = "" if method == "linear" else f"base_model: {tmp_path / 'base'}\n"
    dens = "" if method == "linear" else ", density: 0.5"
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"merge_method: {method}\n{base}dtype: float32\nmodels:\n"
        f"  - model: {tmp_path / 'expert_1'}\n    parameters: {{weight: 0.25{dens}}}\n"
        f"  - model: {tmp_path / 'expert_2'}\n    parameters: {{weight: 0.75{dens}}}\n"
    )
    res = run_mergekit([(cfg, tmp_path / "mk")], cwd=tmp_path)
    assert res[str(tmp_path / "mk")] == "ok", res
    ours = subprocess.run([sys.executable, "-m", "tritonmerge", "merge", str(cfg), str(tmp_path / "tm"), "-q"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert ours.returncode == 0, ours.stderr
    a, b = load_folder(tmp_path / "mk"), load_folder(tmp_path / "tm")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert ulp_distance(a[k], b[k]) == 0, k
