"""``model+lora`` references (tritonmerge/lora.py): a PEFT LoRA adapter folder applied to a model
before the merge, as mergekit 0.1.5 applies it (transformers + peft ``merge_and_unload`` in the
model's stored dtype).

* Parity with mergekit itself (skipped where its virtualenv is absent): the same YAML merged by
  ``mergekit-yaml --lora-merge-cache`` and ``python -m tritonmerge merge``, on tiny llama
  checkpoints in float32 and bfloat16 with hand-written adapters (which peft loads), every output
  tensor compared: the tolerance is 0 ulp (equal bits).
* Without mergekit: the adapted tensors equal ``W + s * (B @ A)`` computed directly in torch.
* Refusals (one line, before any output folder is made), inputs left byte-identical, no
  materialised tensors left in the output, the plan fingerprint following the adapter's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tritonmerge.io.writer import partial_dir
from tritonmerge.synthetic import make_llama_checkpoints

from _checkpoints import load_folder
from _mergekit import needs_mergekit, run_mergekit, ulp_distance

REPO = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."


def write_adapter(
    folder: Path, model: Path, *, targets=("q_proj", "v_proj"), r: int = 4, alpha: float = 6, seed: int = 0,
    dtype: torch.dtype | None = None, rslora: bool = False, extra: dict[str, Any] | None = None,
) -> Path:
    """A PEFT LoRA adapter folder for ``model``: random A ``[r, in]`` and B ``[out, r]`` for
    every ``*.<target>.weight`` of the model, stored in ``dtype`` (default: the model's)."""
    state = load_folder(model)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in state.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.split(".")[-1] in targets:
            dt = dtype or w.dtype
            tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g).to(dt)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = (torch.randn(w.shape[0], r, generator=g) * 0.1).to(dt)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": rslora, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        **(extra or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def expected(model: Path, adapter: Path, compute: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The model's tensors with the adapter applied, computed directly (float64 by default)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for name, w in load_folder(model).items():
        key = f"{PREFIX}{name[: -len('.weight')]}.lora_A.weight"
        if key in ad:
            a, b = ad[key].to(compute), ad[key.replace("lora_A", "lora_B")].to(compute)
            w = (w.to(compute) + (b @ a) * scale).to(w.dtype)
        out[name] = w
    return out


def merge(config: Path | dict, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    if isinstance(config, dict):
        path = cwd / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        config = path
    return subprocess.run(
        [sys.executable, "-m", "tritonmerge", "merge", str(config), str(out), "--quiet", *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=cwd,
    )


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    out: dict[str, Any] = {"root": root}
    for tag, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        base, experts = make_llama_checkpoints(
            root / tag, hidden_size=16, intermediate_size=24, num_layers=2, vocab_size=64, num_experts=2,
            dtype=dt, seed=3, shard_size_bytes=None,
        )
        out[tag] = {
            "base": base,
            "experts": experts,
            "a": write_adapter(root / tag / "lora_a", experts[0], seed=1),
            "b": write_adapter(root / tag / "lora_b", experts[1], targets=("q_proj", "k_proj", "o_proj", "down_proj"), r=2, alpha=16, seed=2, rslora=True),
            "c": write_adapter(root / tag / "lora_c", base, targets=("gate_proj", "up_proj", "lm_head"), r=3, alpha=3, seed=4, dtype=torch.float32),
        }
    return out


# ------------------------------------------------------------------------------------------------
# without mergekit


@pytest.mark.parametrize("tag", ["f32", "bf16"])
def test_adapted_tensors_are_w_plus_scaled_ba(models, tag):
    m = models[tag]
    root = models["root"]
    for key in ("a", "b"):
        model, adapter = m["experts"][0 if key == "a" else 1], m[key]
        before = digest(model), digest(adapter)
        out = root / f"direct_{tag}_{key}"
        proc = merge({"merge_method": "passthrough", "models": [{"model": f"{model}+{adapter}"}]}, out, root)
        assert proc.returncode == 0, proc.stderr
        got, want = load_folder(out), expected(model, adapter, torch.float32)
        assert set(got) == set(want)
        changed = 0
        for name, t in got.items():
            assert t.dtype == want[name].dtype, name
            assert torch.equal(t, want[name]), name
            changed += not torch.equal(t, load_folder(model)[name])
        assert changed == 4 * (1 if key == "a" else 2)
        assert (digest(model), digest(adapter)) == before  # inputs are never modified
        assert not any(p.name.startswith(".lora") for p in out.rglob("*"))
        assert not partial_dir(out).exists()


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_refusals_are_one_line_before_any_output(models, tmp_path):
    m = models["f32"]
    model = m["experts"][0]

    def refused(ref: str, *words: str) -> None:
        out = tmp_path / "out"
        line = _error(merge({"merge_method": "passthrough", "models": [{"model": ref}]}, out, tmp_path))
        for w in words:
            assert w in line, line
        assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir()), list(tmp_path.iterdir())

    refused(f"{model}+{tmp_path / 'nowhere'}", "nowhere", "not a local folder")
    refused(f"{model}+someone/some-adapter", "someone/some-adapter", "Hub")
    refused(f"{model}+{m['a']}+{m['b']}", "MODEL+LORA_ADAPTER")
    refused(f"{tmp_path / 'no_model'}+{m['a']}", "no_model", "does not exist", "model+LoRA reference")

    def variant(name: str, edit=None, **kw) -> Path:
        folder = write_adapter(tmp_path / name, model, **kw)
        if edit is not None:
            edit(folder)
        return folder

    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("fan_in_fan_out", True),
                       ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 8}), ("bias", "all")):
        refused(f"{model}+{variant(key, extra={key: value})}", "adapter_config.json", key)
    refused(f"{model}+{variant('ia3', extra={'peft_type': 'IA3'})}", "peft_type", "IA3")

    def drop_config(folder: Path) -> None:
        (folder / "adapter_config.json").unlink()

    refused(f"{model}+{variant('noconfig', drop_config)}", "adapter_config.json")

    def bad_shape(folder: Path) -> None:
        t = load_file(str(folder / "adapter_model.safetensors"))
        key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = torch.zeros(4, 7)
        save_file(t, str(folder / "adapter_model.safetensors"))

    refused(f"{model}+{variant('shape', bad_shape)}", "adapter_model.safetensors", "q_proj", "do not fit")

    def foreign_key(folder: Path) -> None:
        t = load_file(str(folder / "adapter_model.safetensors"))
        t[f"{PREFIX}model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 16)
        t[f"{PREFIX}model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(16, 4)
        save_file(t, str(folder / "adapter_model.safetensors"))

    refused(f"{model}+{variant('foreign', foreign_key)}", "layers.9", "no tensor")

    def embedding(folder: Path) -> None:
        t = load_file(str(folder / "adapter_model.safetensors"))
        t[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 64)
        save_file(t, str(folder / "adapter_model.safetensors"))

    refused(f"{model}+{variant('embed', embedding)}", "lora_embedding_A")

    def untargeted(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj"]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))

    refused(f"{model}+{variant('untargeted', untargeted)}", "v_proj", "target_modules")

    def incomplete(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj", "v_proj", "k_proj"]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))

    refused(f"{model}+{variant('incomplete', incomplete)}", "k_proj", "has no")


def test_fingerprint_follows_the_adapter(models, tmp_path):
    from tritonmerge.engine import plan_merge

    m = models["f32"]
    model = m["experts"][0]
    adapter = write_adapter(tmp_path / "ad", model, seed=5)

    def fp(ref: str) -> str:
        return plan_merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "out").fingerprint

    plain, first = fp(str(model)), fp(f"{model}+{adapter}")
    assert plain != first and fp(f"{model}+{m['a']}") != first
    write_adapter(tmp_path / "ad", model, seed=6)  # same folder, new weights
    assert fp(f"{model}+{adapter}") != first


def test_resume_and_same_model_with_and_without_adapter(models, tmp_path):
    """``X`` and ``X+adapter`` are two inputs; a finished output is recognised on --resume."""
    m = models["bf16"]
    model = m["experts"][0]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(model), "parameters": {"weight": 0.5}}, {"model": f"{model}+{m['a']}", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    out = tmp_path / "out"
    proc = merge(cfg, out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got, plain, adapted = load_folder(out), load_folder(model), expected(model, m["a"], torch.float32)
    for name, t in got.items():
        assert torch.equal(t, (plain[name].float() * 0.5 + adapted[name].float() * 0.5)), name
    proc = merge(tmp_path / "out.yaml", out, tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert not any(p.name.startswith(".lora") for p in out.rglob("*"))


# ------------------------------------------------------------------------------------------------
# parity with mergekit 0.1.5

def _parity_cases(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base, (e1, e2) = m["base"], m["experts"]
    a, b, c = m["a"], m["b"], m["c"]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                # weights summing to 1: tritonmerge's `linear` normalises differently from mergekit's
                # (sum of w*x, then / sum w, in float32) for other sums, with or without LoRA
                {"model": f"{e1}+{a}", "parameters": {"weight": 0.5}},
                {"model": f"{e2}+{b}", "parameters": {"weight": 0.25}},
                {"model": str(e1), "parameters": {"weight": 0.25}},
            ],
        },
        "ties": {
            "merge_method": "ties",
            "base_model": f"{base}+{c}",
            "models": [
                {"model": f"{e1}+{a}", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": f"{e2}+{b}", "parameters": {"weight": 0.5, "density": 0.8}},
            ],
        },
        "slices": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": f"{e1}+{a}", "layer_range": [0, 1]}]},
                {"sources": [{"model": f"{e2}+{b}", "layer_range": [1, 2]}]},
            ],
        },
    }


@needs_mergekit
def test_parity_with_mergekit(models, tmp_path):
    jobs = []
    for tag in ("f32", "bf16"):
        for case, cfg in _parity_cases(models[tag]).items():
            # bf16 models: `ties` under dtype float32, as mergekit computes TIES in the merge dtype and
            # tritonmerge in float32 (docs/mergekit.md); linear and passthrough in bf16 and stored
            dtypes = ["float32"] if tag == "f32" or case == "ties" else ["bfloat16", None]
            for dtype in dtypes:
                full = dict(cfg, **({"dtype": dtype} if dtype else {}))
                if tag == "bf16" and case == "ties":
                    # bf16 values have many equal magnitudes, and which of them a density below 1
                    # keeps differs between the tools (a TIES matter, with or without LoRA)
                    full["models"] = [{**e, "parameters": {**e["parameters"], "density": 1.0}} for e in cfg["models"]]
                name = f"{tag}_{case}_{dtype or 'stored'}"
                path = tmp_path / f"{name}.yaml"
                path.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
                jobs.append((name, path, tmp_path / f"mergekit_{name}", tmp_path / f"ours_{name}"))
    before = {(t, k): digest(models[t][k]) for t in ("f32", "bf16") for k in ("a", "b", "c")}
    before.update({(t, "models"): digest(models[t]["base"].parent) for t in ("f32", "bf16")})
    status = run_mergekit([(p, mk) for _, p, mk, _ in jobs], cwd=tmp_path, extra=["--lora-merge-cache", str(tmp_path / "lora_cache")])
    report = {}
    for name, path, mk, ours in jobs:
        assert status[str(mk)] == "ok", (name, status[str(mk)])
        mine = merge(path, ours, tmp_path)
        assert mine.returncode == 0, (name, mine.stderr)
        theirs, got = load_folder(mk), load_folder(ours)
        assert set(theirs) == set(got), (name, set(theirs) ^ set(got))
        worst = 0
        for t in theirs:
            assert theirs[t].dtype == got[t].dtype, (name, t, theirs[t].dtype, got[t].dtype)
            worst = max(worst, ulp_distance(theirs[t], got[t]))
        report[name] = worst
        assert not any(p.name.startswith(".lora") for p in ours.rglob("*"))
    print("max ulp per case:", report)
    assert all(v == 0 for v in report.values()), report
    after = {(t, k): digest(models[t][k]) for t in ("f32", "bf16") for k in ("a", "b", "c")}
    after.update({(t, "models"): digest(models[t]["base"].parent) for t in ("f32", "bf16")})
    assert before == after


def test_resume_after_failure_and_a_changed_adapter(models, tmp_path, monkeypatch):
    """An interrupted LoRA merge resumes to the bytes of an uninterrupted one (the adapted tensors
    are written again into the partial folder); a partial folder made with other adapter weights
    is not resumed."""
    from tritonmerge.engine import MergeOptions, run_merge
    from tritonmerge.errors import CheckpointError
    from tritonmerge.io import writer as writer_mod

    m = models["bf16"]
    adapter = write_adapter(tmp_path / "ad", m["experts"][0], seed=7)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(m["base"]),
        "models": [{"model": f"{m['experts'][0]}+{adapter}", "parameters": {"weight": 0.6, "density": 0.7}},
                   {"model": f"{m['experts'][1]}+{m['b']}", "parameters": {"weight": 0.4}}],
    }), encoding="utf-8")
    opts = dict(out_shard_size="1KB", quiet=True)
    ref = tmp_path / "ref"
    run_merge(str(cfg), ref, MergeOptions(**opts))
    assert len(list(ref.glob("model-*.safetensors"))) >= 3

    original = writer_mod.ShardedWriter._write_one
    calls = {"shards": 0}

    def failing(self, shard, entry, tensor, first, last):
        original(self, shard, entry, tensor, first, last)
        if last and entry is shard.entries[-1]:
            calls["shards"] += 1
            if calls["shards"] == 2:
                raise OSError("injected crash after the second shard")

    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        run_merge(str(cfg), out, MergeOptions(**opts))
    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", original)
    assert partial_dir(out).exists() and not out.exists()
    res = run_merge(str(cfg), out, MergeOptions(resume=True, **opts))
    assert res.resumed_shards == 2
    assert digest(out) == digest(ref)
    assert not partial_dir(out).exists()

    # interrupted again, then the adapter's weights change: its shards are not reused
    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", failing)
    calls["shards"] = 0
    out2 = tmp_path / "out2"
    with pytest.raises(OSError, match="injected"):
        run_merge(str(cfg), out2, MergeOptions(**opts))
    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", original)
    write_adapter(tmp_path / "ad", m["experts"][0], seed=8)
    with pytest.raises(CheckpointError):
        run_merge(str(cfg), out2, MergeOptions(resume=True, **opts))
