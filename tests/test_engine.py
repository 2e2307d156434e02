"""The disk-to-disk engine: equality with the in-memory merge, bad inputs, atomicity, resume,
memory bound, and the output folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tritonmerge
from tritonmerge.config import load_config, tensor_t
from tritonmerge.engine import MergeOptions, run_merge
from tritonmerge.errors import CheckpointError, ConfigError, NonFiniteResultError
from tritonmerge.io.writer import partial_dir

from _checkpoints import folder_bytes, load_folder, make_tiny, read_index, write_config
from _cli import run_cli_with

QUIET = dict(quiet=True)


def _inputs(base, experts):
    return load_folder(base), [load_folder(e) for e in experts]


def _expected(method, base, experts, out_dtype=None, **params):
    b, es = _inputs(base, experts)
    merged = tritonmerge.merge_state_dicts(method, b, es, **params)
    if out_dtype is not None:
        merged = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in merged.items()}
    return merged


def _assert_same(out_dir, expected):
    got = load_folder(out_dir)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@pytest.fixture
def tiny(tmp_path):
    return make_tiny(tmp_path / "models")


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"lambda": 0.8}),
        ("linear", {}),
        ("ties", {"density": 0.4, "normalize": True, "rescale": "none", "disjoint": "mean"}),
        ("dare_ties", {"density": 0.5, "seed": 3, "rescale": "keep_prob"}),
    ],
)
@pytest.mark.parametrize("budget", ["1GiB", "20KB"])  # 20KB forces row chunks for chunkable methods
def test_disk_to_disk_equals_merge_state_dicts(tmp_path, tiny, method, params, budget):
    if method == "ties" and budget == "20KB":
        pytest.skip("ties (per-tensor top-k) is not chunkable: the 20KB budget changes nothing")
    base, experts = tiny
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts], "parameters": params}
    if method == "linear":
        cfg["models"] = [{"model": str(e)} for e in experts]
    out = tmp_path / "out"
    res = run_merge(cfg, out, MergeOptions(out_shard_size="20KB", memory_budget=budget, **QUIET))
    if budget == "20KB" and method in ("task_arithmetic", "linear", "dare_ties"):
        assert "model.embed_tokens.weight" in res.plan.chunked
    mapped = load_config(cfg).resolve("", 0.0)
    _assert_same(out, _expected(method, base, experts, **mapped))
    idx = read_index(out)
    assert len({f for f in idx["weight_map"].values()}) > 2
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in load_folder(out).values())
    assert not partial_dir(out).exists()


def test_test_only_method_and_bin_inputs(tmp_path, tiny):
    """A method registered only here, and inputs as pytorch .bin shards."""
    from tritonmerge.params import MethodParams
    from tritonmerge.registry import MergeMethod, _REGISTRY, register

    class P(MethodParams):
        scale: float = 1.0

    def fn(base, experts, p, ctx):
        return base.float() + p.scale * sum(e.float() - base.float() for e in experts) / len(experts)

    name = "_engine_test_mean_delta"
    if name not in _REGISTRY:
        register(MergeMethod(name=name, params=P, doc="test only", merge_tensor=fn, chunkable=lambda p: True))
    base, experts = tiny
    bin_dirs = []
    for d in [base, *experts]:
        sd = load_folder(d)
        nd = tmp_path / f"bin_{d.name}"
        nd.mkdir()
        keys = list(sd)
        torch.save({k: sd[k] for k in keys[:10]}, nd / "pytorch_model-00001-of-00002.bin")
        torch.save({k: sd[k] for k in keys[10:]}, nd / "pytorch_model-00002-of-00002.bin")
        wm = {k: ("pytorch_model-00001-of-00002.bin" if i < 10 else "pytorch_model-00002-of-00002.bin") for i, k in enumerate(keys)}
        (nd / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
        shutil.copy(d / "config.json", nd / "config.json")
        bin_dirs.append(nd)
    cfg = {"merge_method": name, "base_model": str(bin_dirs[0]), "models": [{"model": str(e)} for e in bin_dirs[1:]],
           "parameters": {"scale": 0.5}}
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(memory_budget="10KB", **QUIET))
    _assert_same(out, _expected(name, base, experts, scale=0.5))


def test_per_tensor_gradient_and_filter(tmp_path, tiny):
    base, experts = tiny
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(experts[0]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(experts[1]), "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}]}},
            {"model": str(experts[2])},
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(**QUIET))
    b, es = _inputs(base, experts)
    got = load_folder(out)
    for name in b:
        t = tensor_t(name, 3)
        w = [t, 0.3 if "mlp" in name else 1.0, 1.0]
        exp = tritonmerge.merge_tensors("task_arithmetic", b[name].float(), [e[name].float() for e in es], name=name, weight=w)
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], exp.to(torch.bfloat16)), name
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["torch_dtype"] == "bfloat16"


def test_analysis_pass_ties_model_scope(tmp_path, tiny):
    base, experts = tiny
    params = {"density": 0.3, "topk_scope": "model"}
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts], "parameters": params}
    out = tmp_path / "out"
    res = run_merge(cfg, out, MergeOptions(memory_budget="20KB", **QUIET))
    assert res.plan.needs_analysis
    mapped = load_config(cfg).resolve("", 0.0)
    _assert_same(out, _expected("ties", base, experts, **mapped))
    decisions = json.loads((out / "tritonmerge_decisions.json").read_text())
    assert "ties_model_topk" in decisions["summary"]


@pytest.mark.parametrize("modifier,inner", [("tadrop", "ties"), ("lwptv", "dare_ties")])
def test_modifiers_through_the_engine(tmp_path, tiny, modifier, inner):
    """A modifier wrapping a mergekit-named method: analysis pass on the streaming source, the
    inner method's mergekit semantics, same tensors as the in-memory merge."""
    if modifier not in tritonmerge.list_methods():
        pytest.skip(f"{modifier} is not registered")
    base, experts = tiny
    cfg = {"merge_method": modifier, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
           "parameters": {"merge_method": inner, "density": 0.5}}
    out = tmp_path / "out"
    res = run_merge(cfg, out, MergeOptions(**QUIET))
    assert res.plan.needs_analysis and (out / "tritonmerge_decisions.json").exists()
    _assert_same(out, _expected(modifier, base, experts, **load_config(cfg).resolve("", 0.0)))


@pytest.mark.parametrize("modifier", ["tadrop", "lwptv"])
def test_analysis_reads_ahead_in_the_order_it_loads(tmp_path, tiny, modifier):
    """The analysis pass loads a subset of the tensors (TADrop skips 1-D ones and, here, the
    1024-entry attention matrices between the others); through the real CLI, every tensor it
    loads is read once, all but the first on the read-ahead thread, and no skipped tensor is
    read."""
    base, experts = tiny
    params = {"merge_method": "ties", "density": 0.5, **({"min_numel": 1100} if modifier == "tadrop" else {})}
    cfg = write_config(tmp_path / "c.yml", modifier, base, experts, params)
    log = tmp_path / "reads.json"
    prelude = f"""
        import json, threading, atexit
        import tritonmerge.engine as eng
        reads, loads = [], []
        _read_unit, _load = eng._read_unit, eng.StreamingSource.load
        def read_unit(plan, reader, unit, check):
            if unit.in_bytes == 0:  # the analysis pass's whole-tensor reads
                reads.append((unit.name, threading.current_thread().name))
            return _read_unit(plan, reader, unit, check)
        def load(self, name):
            loads.append(name)
            return _load(self, name)
        eng._read_unit, eng.StreamingSource.load = read_unit, load
        atexit.register(lambda: open({str(log)!r}, "w").write(json.dumps({{"reads": reads, "loads": loads}})))
    """
    proc = run_cli_with(prelude, "merge", cfg, tmp_path / "out", "--quiet", script_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(log.read_text())
    names = [name for name, _ in got["reads"]]
    assert names == got["loads"] and len(set(names)) == len(names)
    if modifier == "tadrop":
        tensors = load_folder(base)
        adapted = [n for n in tensors if tensors[n].dim() >= 2 and tensors[n].numel() >= 1100]
        assert sorted(names) == sorted(adapted) and len(adapted) < len(tensors)
    assert [thread for _, thread in got["reads"][1:]] == ["tritonmerge-analysis_0"] * (len(names) - 1)


def test_output_folder_contents(tmp_path, tiny):
    base, experts = tiny
    cfg_path = write_config(tmp_path / "c.yml", "dare_ties", base, experts, {"density": 0.5}, out_dtype="float16")
    out = tmp_path / "out"
    run_merge(str(cfg_path), out, MergeOptions(out_shard_size="30KB", **QUIET))
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "README.md",
              "tritonmerge_config.yml", "model.safetensors.index.json", "tritonmerge_checksums.json"):
        assert f in names, f
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    readme = (out / "README.md").read_text()
    assert "base_model:" in readme and "dare_ties" in readme and "density" in readme
    assert load_config(out / "tritonmerge_config.yml").merge_method == "dare_ties"


def test_dry_run_reads_and_writes_nothing(tmp_path, tiny, capsys, monkeypatch):
    base, experts = tiny
    from tritonmerge.io import reader

    monkeypatch.setattr(reader.TensorReader, "read", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data read")))
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5})
    out = tmp_path / "out"
    run_merge(str(cfg), out, MergeOptions(dry_run=True, **QUIET))
    text = capsys.readouterr().out
    assert "peak memory" in text and "tensors:" in text and "output:" in text
    assert not out.exists() and not partial_dir(out).exists()


# ------------------------------------------------------------------------------------------------
# bad inputs: each error, before any heavy work, and no output folder left


def _corrupt_truncate(base, experts):
    f = sorted(experts[1].glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-7])


def _corrupt_header(base, experts):
    f = sorted(experts[0].glob("model-*.safetensors"))[2]
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"#garbage####"
    f.write_bytes(bytes(raw))


def _missing_file(base, experts):
    sorted(experts[2].glob("model-*.safetensors"))[1].unlink()


def _missing_index_entry(base, experts):
    p = experts[0] / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00006.safetensors"
    p.write_text(json.dumps(idx))


def _rewrite(folder, change):
    sd = load_folder(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink()
    change(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _differing_keys(base, experts):
    _rewrite(experts[1], lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))


def _shape_mismatch(base, experts):
    _rewrite(experts[0], lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(48, 33, dtype=torch.bfloat16)))


def _vocab_mismatch(base, experts):
    _rewrite(experts[2], lambda sd: sd.__setitem__("model.embed_tokens.weight", torch.zeros(520, 32, dtype=torch.bfloat16)))


def _dtype_mismatch(base, experts):
    _rewrite(experts[0], lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(32, dtype=torch.int32)))


BadCase = namedtuple("BadCase", "make pattern error")
BAD_INPUTS = {
    "truncated": BadCase(_corrupt_truncate, r"model '[^']*expert_2'.*truncated", CheckpointError),
    "corrupt_header": BadCase(_corrupt_header, r"model '[^']*expert_1'.*corrupt", CheckpointError),
    "missing_file": BadCase(_missing_file, r"model '[^']*expert_3'.*missing", CheckpointError),
    "missing_index_entry": BadCase(_missing_index_entry, r"ghost.*no such tensor", CheckpointError),
    "differing_keys": BadCase(_differing_keys, r"expert_2.*lacks 1 tensor.*up_proj", CheckpointError),
    "shape_mismatch": BadCase(_shape_mismatch, r"shape mismatch: tensor 'model.layers.0.mlp.up_proj.weight'.*expert_1", CheckpointError),
    "vocab_mismatch": BadCase(_vocab_mismatch, r"vocabulary size mismatch.*520.*512", CheckpointError),
    "dtype_mismatch": BadCase(_dtype_mismatch, r"dtype mismatch: tensor 'model.norm.weight'", CheckpointError),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_errors_leave_no_output(tmp_path, tiny, case):
    base, experts = tiny
    bad = BAD_INPUTS[case]
    bad.make(base, experts)
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5})
    out = tmp_path / "out"
    with pytest.raises(bad.error, match=bad.pattern):
        run_merge(str(cfg), out, MergeOptions(**QUIET))
    assert not out.exists() and not partial_dir(out).exists()


def test_existing_output_refused_then_overwritten(tmp_path, tiny):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        run_merge(str(cfg), out, MergeOptions(**QUIET))
    assert (out / "keep.txt").exists() and not partial_dir(out).exists()
    # a folder that is not an earlier tritonmerge output needs a second, explicit flag
    with pytest.raises(CheckpointError, match="not a tritonmerge output.*keep.txt.*--force-overwrite"):
        run_merge(str(cfg), out, MergeOptions(overwrite=True, **QUIET))
    assert (out / "keep.txt").read_text() == "old" and not partial_dir(out).exists()
    run_merge(str(cfg), out, MergeOptions(overwrite=True, force_overwrite=True, **QUIET))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()
    # an earlier output is replaced with --overwrite alone
    run_merge(str(cfg), out, MergeOptions(overwrite=True, **QUIET))
    assert (out / "model.safetensors.index.json").exists()


def test_not_enough_disk(tmp_path, tiny, monkeypatch):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not enough free disk"):
        run_merge(str(cfg), out, MergeOptions(**QUIET))
    assert not out.exists() and not partial_dir(out).exists()


def test_nonfinite_result(tmp_path, tiny):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts, {"lambda": 1e30, "weight": 1e30}, dtype="float32")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteResultError, match=r"tensor '.*' produced \d+ NaN/Inf"):
        run_merge(str(cfg), out, MergeOptions(**QUIET))
    assert not out.exists()
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        res = run_merge(str(cfg), out, MergeOptions(allow_nonfinite=True, overwrite=True, **QUIET))
    assert res.nonfinite and (out / "tritonmerge_report.json").exists()


def test_hub_id_in_config_file(tmp_path, tiny):
    base, _ = tiny
    (tmp_path / "c.yml").write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: mistralai/Mistral-7B-v0.1\n")
    with pytest.raises(ConfigError, match="Hub id"):
        run_merge(str(tmp_path / "c.yml"), tmp_path / "out", MergeOptions(**QUIET))


# ------------------------------------------------------------------------------------------------
# resume


def test_resume_after_injected_failure_is_byte_identical(tmp_path, tiny, monkeypatch):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "dare_ties", base, experts, {"density": 0.5})
    opts = dict(out_shard_size="20KB", **QUIET)
    ref = tmp_path / "ref"
    run_merge(str(cfg), ref, MergeOptions(**opts))
    n_shards = len(list(ref.glob("model-*.safetensors")))
    assert n_shards >= 3

    from tritonmerge.io import writer as writer_mod

    original = writer_mod.ShardedWriter._write_one
    calls = {"shards_done": 0}

    def failing(self, shard, entry, tensor, first, last):
        original(self, shard, entry, tensor, first, last)
        if last and entry is shard.entries[-1]:
            calls["shards_done"] += 1
            if calls["shards_done"] == 2:
                raise OSError("injected crash after the second shard")

    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        run_merge(str(cfg), out, MergeOptions(**opts))
    monkeypatch.setattr(writer_mod.ShardedWriter, "_write_one", original)
    tmp = partial_dir(out)
    assert not out.exists() and tmp.exists()
    # without --resume the leftover is not silently reused or deleted
    with pytest.raises(CheckpointError, match="--resume"):
        run_merge(str(cfg), out, MergeOptions(**opts))
    # damage a kept shard: it must be redone, not trusted
    manifest = json.loads((tmp / "tritonmerge_checksums.json").read_text())
    kept = sorted(manifest["shards"])
    assert len(kept) == 2
    res = run_merge(str(cfg), out, MergeOptions(resume=True, **opts))
    assert res.resumed_shards == 2
    assert folder_bytes(out) == folder_bytes(ref)
    assert not tmp.exists()
    # resuming a finished output is a no-op
    again = run_merge(str(cfg), out, MergeOptions(resume=True, **opts))
    assert again.bytes_read == 0


def test_resume_redoes_a_damaged_shard(tmp_path, tiny, monkeypatch):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts)
    opts = dict(out_shard_size="20KB", **QUIET)
    ref = tmp_path / "ref"
    run_merge(str(cfg), ref, MergeOptions(**opts))
    out = tmp_path / "out"
    from tritonmerge.io import writer as writer_mod

    monkeypatch.setattr(writer_mod, "commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr("tritonmerge.engine.commit", writer_mod.commit)
    with pytest.raises(KeyboardInterrupt):
        run_merge(str(cfg), out, MergeOptions(**opts))
    monkeypatch.undo()
    tmp = partial_dir(out)
    victim = sorted(tmp.glob("model-*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    res = run_merge(str(cfg), out, MergeOptions(resume=True, **opts))
    assert res.resumed_shards == len(list(ref.glob("model-*.safetensors"))) - 1
    assert folder_bytes(out) == folder_bytes(ref)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tritonmerge.params import MethodParams
    from tritonmerge.registry import MergeMethod, register
    from tritonmerge.engine import MergeOptions, run_merge

    class P(MethodParams):
        pass

    def slow(base, experts, p, ctx):
        time.sleep(0.05)  # slow enough for the parent to kill us mid-run
        return base.float() + sum(e.float() - base.float() for e in experts)

    register(MergeMethod(name="_slow_sum", params=P, doc="test only", merge_tensor=slow))
    run_merge(sys.argv[1], sys.argv[2], MergeOptions(out_shard_size="20KB", quiet=True))
    """
)


def test_resume_after_kill_is_byte_identical(tmp_path, tiny):
    """A merge killed with SIGKILL after its first shards, then resumed (in another process)."""
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "_slow_sum", base, experts)
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(tritonmerge.__file__).parents[1])}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(cfg), str(ref)], check=True, env=env, timeout=120)
    out = tmp_path / "out"
    manifest = partial_dir(out) / "tritonmerge_checksums.json"
    proc = subprocess.Popen([sys.executable, str(script), str(cfg), str(out)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads(manifest.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_dir(out).exists()
    resume_script = tmp_path / "resume.py"
    resume_script.write_text(_KILL_SCRIPT.replace('quiet=True', 'quiet=True, resume=True'))
    subprocess.run([sys.executable, str(resume_script), str(cfg), str(out)], check=True, env=env, timeout=120)
    assert folder_bytes(out) == folder_bytes(ref)


# ------------------------------------------------------------------------------------------------
# memory bound

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import tritonmerge
    from tritonmerge.engine import MergeOptions, run_merge

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    from tritonmerge.cli import _tune_malloc

    _tune_malloc()  # what the CLI does: tensor-sized buffers are mmapped and returned on free
    # warm up torch and the merge code on a tiny tensor so the baseline includes them
    tritonmerge.merge_tensors("task_arithmetic", torch.zeros(4), [torch.ones(4)])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    assert status("VmHWM") <= before + (1 << 20)
    res = run_merge(sys.argv[1], sys.argv[2], MergeOptions(quiet=True, out_shard_size="8MB", prefetch_depth=float(sys.argv[3])))
    print(json.dumps({"before": before, "after": status("VmHWM"), "writer": res.plan.writer_budget}))
    """
)


def test_peak_memory_stays_near_bound(tmp_path):
    """24 tensors of 2 MiB per model x 4 models = 192 MiB of input; the bound with prefetch is
    ~ (2(N+1) + N + 2) x 2 MiB + write queue, an order of magnitude less."""
    from tritonmerge.synthetic import write_checkpoint

    n_experts, rows, cols, n_tensors = 3, 512, 1024, 24
    largest = rows * cols * 4
    dirs = []
    for m in range(n_experts + 1):
        gen = torch.Generator().manual_seed(m)
        sd = {f"model.layers.{i}.mlp.w.weight": torch.rand(rows, cols, generator=gen) for i in range(n_tensors)}
        d = tmp_path / f"m{m}"
        write_checkpoint(d, sd, shard_size_bytes=8 << 20)
        dirs.append(d)
    total_input = (n_experts + 1) * n_tensors * largest
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", dirs[0], dirs[1:])
    script = tmp_path / "mem.py"
    script.write_text(_MEM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=str(Path(tritonmerge.__file__).parents[1]), OMP_NUM_THREADS="1")

    def growth(depth: float, out: str, **extra_env: str) -> tuple[int, int]:
        proc = subprocess.run([sys.executable, str(script), str(cfg), str(tmp_path / out), str(depth)], check=True,
                              env={**env, **extra_env}, capture_output=True, text=True, timeout=120)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        return r["after"] - r["before"], r["writer"]

    grew, writer = growth(2.0, "out")
    bound = (2 * (n_experts + 1) + n_experts + 2) * largest + writer
    print(f"peak RSS growth {grew / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB) for {total_input / 2**20:.0f} MiB of input")
    assert grew < bound + (16 << 20), (grew / 2**20, bound / 2**20)
    assert total_input > 4 * bound
    # the measurement can fail: reading the whole model ahead blows through the bound (with the
    # slower torch reference computing, so that reads run ahead of the merge)
    greedy, _ = growth(1000.0, "out_greedy", TRITONMERGE_BACKEND="torch")
    assert greedy > bound + (32 << 20), greedy / 2**20


# ------------------------------------------------------------------------------------------------
# the output loads with transformers


def test_output_loads_with_transformers(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5}, dtype="float32", out_dtype="bfloat16")
    out = tmp_path / "out"
    run_merge(str(cfg), out, MergeOptions(out_shard_size="20KB", **QUIET))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3
    sd = model.state_dict()
    merged = load_folder(out)
    for k, v in merged.items():
        assert torch.equal(sd[k].to(v.dtype), v), k
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
def test_cuda_device_matches_cpu(tmp_path, tiny):
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts, {"lambda": 0.7}, dtype="float32")
    run_merge(str(cfg), tmp_path / "cpu", MergeOptions(**QUIET))
    run_merge(str(cfg), tmp_path / "gpu", MergeOptions(device="cuda", memory_budget="20KB", **QUIET))
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-6)


def test_cuda_unavailable_is_a_clear_error(tmp_path, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, experts = tiny
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts)
    with pytest.raises(ConfigError, match="cuda.*is_available"):
        run_merge(str(cfg), tmp_path / "out", MergeOptions(device="cuda", **QUIET))
    assert not (tmp_path / "out").exists()


def test_wudi_layers_of_a_shard_are_solved_in_batches(tmp_path, monkeypatch):
    """The disk engine hands same-shaped WUDI layers of one shard to the batched solver, and the
    result is the in-memory API's (which batches across the whole model) tensor for tensor."""
    from tritonmerge.api import merge_state_dicts
    from tritonmerge.catalog import get_method

    base, experts = make_tiny(tmp_path / "m")
    cfg = write_config(tmp_path / "wudi.yml", "wudi", base, experts, parameters={"steps": 10})
    wudi = get_method("wudi")
    batch_sizes = []
    solve_batch = wudi.merge_group

    def recording(params, items, backend=None):
        batch_sizes.append(len(items))
        return solve_batch(params, items, backend=backend)

    monkeypatch.setattr(wudi, "merge_group", recording)
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(out_shard_size="20KB", quiet=True))
    assert batch_sizes and max(batch_sizes) > 1
    monkeypatch.setattr(wudi, "merge_group", solve_batch)
    expected = merge_state_dicts("wudi", load_folder(base), [load_folder(e) for e in experts], steps=10)
    got = load_folder(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _slices(base, experts, lo, hi):
    return [{"sources": [{"model": str(m), "layer_range": [lo, hi]} for m in (base, *experts)]}]


def test_slices_refuse_whole_model_analysis_and_bad_ranges(tmp_path, tiny):
    """A slices merge has no whole model to analyse (TIES model scope), and a layer range must lie
    within the model; both are refused before anything is written."""
    base, experts = tiny
    n = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    cfg = {"merge_method": "ties", "base_model": str(base), "slices": _slices(base, experts, 0, n),
           "parameters": {"density": 0.3, "topk_scope": "model"}}
    with pytest.raises(ConfigError, match="whole-model analysis.*slices"):
        run_merge(cfg, tmp_path / "out", MergeOptions(**QUIET))
    cfg = {"merge_method": "ties", "base_model": str(base), "slices": _slices(base, experts, 0, n + 1), "parameters": {"density": 0.3}}
    with pytest.raises(ConfigError, match="goes past"):
        run_merge(cfg, tmp_path / "out", MergeOptions(**QUIET))
    assert not (tmp_path / "out").exists()


def test_whole_range_slice_equals_models_config(tmp_path, tiny):
    """One slice over every layer of every model is the `models` merge, tensor for tensor."""
    base, experts = tiny
    n = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    common = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.4}}
    run_merge({**common, "models": [{"model": str(e)} for e in experts]}, tmp_path / "a", MergeOptions(**QUIET))
    run_merge({**common, "slices": _slices(base, experts, 0, n)}, tmp_path / "b", MergeOptions(**QUIET))
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
