"""mergekit-yaml's options on ``tritonmerge merge``, through the real CLI (docs/mergekit.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._cli import run_cli
from tritonmerge.synthetic import make_llama_checkpoints


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_llama_checkpoints(root, hidden_size=32, intermediate_size=64, num_layers=1, vocab_size=64,
                           num_experts=2, dtype=torch.float32, num_heads=2, num_kv_heads=2)
    base = root / "base"
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return root


def _config(root: Path, tmp: Path, method: str, params: str = "") -> Path:
    y = tmp / f"{method}.yml"
    y.write_text(
        f"merge_method: {method}\nbase_model: {root / 'base'}\ndtype: float32\n"
        f"models:\n  - model: {root / 'expert_1'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {root / 'expert_2'}\n    parameters: {{weight: 0.5, density: 0.5}}\n{params}"
    )
    return y


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    t = {}
    for f in sorted(out.glob("*.safetensors")):
        t.update(load_file(f))
    return t


def test_cuda_is_device_cuda(models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    y = _config(models, tmp_path, "ties")
    a = run_cli("merge", y, tmp_path / "a", "--cuda", "-q")
    b = run_cli("merge", y, tmp_path / "b", "--device", "cuda", "-q")
    assert a.returncode == b.returncode != 0
    assert a.stderr.replace(str(tmp_path / "a"), "OUT") == b.stderr.replace(str(tmp_path / "b"), "OUT")


def test_no_copy_tokenizer_and_model_card(models, tmp_path):
    y = _config(models, tmp_path, "ties")
    r = run_cli("merge", y, tmp_path / "a", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "tokenizer_config.json").is_file() and (tmp_path / "a" / "README.md").is_file()
    r = run_cli("merge", y, tmp_path / "b", "-q", "--no-copy-tokenizer", "--no-write-model-card")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "b" / "tokenizer_config.json").exists()
    assert not (tmp_path / "b" / "README.md").exists()
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_random_seed_changes_dare(models, tmp_path):
    y = _config(models, tmp_path, "dare_ties")
    outs = {}
    for name, seed in (("s1", "1"), ("s1b", "1"), ("s2", "2")):
        r = run_cli("merge", y, tmp_path / name, "-q", "--random-seed", seed)
        assert r.returncode == 0, r.stderr
        outs[name] = _tensors(tmp_path / name)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs["s1"][k], outs["s1b"][k])
    assert not torch.equal(outs["s1"][k], outs["s2"][k])
    # a seed in the config wins over the flag
    y2 = _config(models, tmp_path, "dare_ties", "parameters: {seed: 1}\n")
    r = run_cli("merge", y2, tmp_path / "cfg", "-q", "--random-seed", "2")
    assert r.returncode == 0, r.stderr
    assert torch.equal(_tensors(tmp_path / "cfg")[k], outs["s1"][k])
    r = run_cli("merge", y, tmp_path / "neg", "-q", "--random-seed", "-1")
    assert r.returncode == 2 and "--random-seed" in r.stderr


@pytest.mark.parametrize("flag", ["--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu",
                                  "--multi-gpu", "--trust-remote-code"])
def test_unneeded_flags_note(models, tmp_path, flag):
    y = _config(models, tmp_path, "ties")
    r = run_cli("merge", y, tmp_path / "a", flag)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(f"note: {flag} is unneeded here") == 1
    r = run_cli("merge", y, tmp_path / "b", flag, "-q")
    assert r.returncode == 0 and "note:" not in r.stderr
