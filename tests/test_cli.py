"""The command line: merge, errors as one line with exit code 2, info, demo end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonmerge
from tritonmerge.cli import main
from tritonmerge.io.writer import DirectFile, open_shard_file

from _checkpoints import folder_bytes, load_folder, make_tiny, write_config
from _cli import run_cli


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(tritonmerge.__file__).parents[1])}


def test_merge_command(tmp_path, capsys):
    base, experts = make_tiny(tmp_path / "m")
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, experts, {"lambda": 0.5})
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--out-shard-size", "20KB", "--quiet"]) == 0
    merged = load_folder(out)
    b = load_folder(base)
    es = [load_folder(e) for e in experts]
    name = "model.layers.1.mlp.up_proj.weight"
    exp = tritonmerge.merge_tensors("task_arithmetic", b[name], [e[name] for e in es], name=name, **{"lambda": 0.5})
    assert torch.equal(merged[name], exp)
    # a second run refuses to clobber the output: one line, exit code 2, no traceback
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tritonmerge: error: ") and "--overwrite" in err[0]


def test_dry_run_and_errors_through_python_m(tmp_path):
    base, experts = make_tiny(tmp_path / "m")
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tritonmerge", "merge", str(cfg), str(out), "--dry-run"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "peak memory" in r.stdout and not out.exists()
    bad = write_config(tmp_path / "bad.yml", "ties", base, experts, {"densty": 0.5})
    r = subprocess.run([sys.executable, "-m", "tritonmerge", "merge", str(bad), str(out)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "unknown parameter 'densty'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "backends:" in text
    for name in tritonmerge.list_methods():
        assert name in text
    if not torch.cuda.is_available():
        assert "triton  unavailable:" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "merge" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`tritonmerge demo DIR` builds models, merges with wudi and ties, prints where and how fast."""
    r = subprocess.run([sys.executable, "-m", "tritonmerge", "demo", str(tmp_path / "demo")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wudi" in r.stdout and "ties" in r.stdout and "MB/s" in r.stdout
    for name in ("wudi", "ties"):
        out = tmp_path / "demo" / f"merged_{name}"
        assert (out / "model.safetensors.index.json").is_file()
        assert (out / "config.json").is_file()
        merged = load_folder(out)
        assert merged and all(torch.isfinite(v.float()).all() for v in merged.values())
    base = load_folder(tmp_path / "demo" / "models" / "base")
    wudi = load_folder(tmp_path / "demo" / "merged_wudi")
    # WUDI changes the linear weights and keeps embeddings at the base (official tensor selection)
    assert not torch.equal(wudi["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(wudi["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.slow
def test_demo_output_loads_and_generates_with_transformers(tmp_path):
    """The demo's models ship a real (byte-level) tokenizer, so the merged output is a complete
    model: AutoTokenizer and AutoModelForCausalLM load it and it generates."""
    transformers = pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-m", "tritonmerge", "demo", str(tmp_path / "demo"), "--quiet"],
                       capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "demo" / "merged_ties"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "merge models: ünïcode too"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    tokenizer.decode(generated[0])


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        "from tritonmerge.cli import main\n"
        "for argv in (['--help'], ['--version'], ['merge', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(time.perf_counter() - t0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 0.5


def test_direct_and_buffered_writes_give_the_same_output(tmp_path):
    """Shards written with O_DIRECT (the default where the file system takes it) and through the
    page cache (TRITONMERGE_DIRECT_WRITES=0) are the same bytes, manifest included; real CLI."""
    probe = open_shard_file(tmp_path / "probe")
    probe.close()
    if not isinstance(probe, DirectFile):
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT: both runs would write buffered")
    base, experts = make_tiny(tmp_path / "m")
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5})
    outs = {}
    for direct in ("1", "0"):
        out = tmp_path / f"out-{direct}"
        r = run_cli("merge", cfg, out, "--out-shard-size", "20KB", "--quiet", TRITONMERGE_DIRECT_WRITES=direct)
        assert r.returncode == 0, r.stderr
        outs[direct] = folder_bytes(out)
    assert len([n for n in outs["1"] if n.endswith(".safetensors")]) > 2
    assert outs["1"] == outs["0"]
