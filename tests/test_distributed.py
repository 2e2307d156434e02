"""One merge over several processes (torch.distributed, gloo on CPU), through the real CLI.

Every output folder must be byte-identical to the single-process run of the same command: the
shard layout comes from the plan, and the whole-model analyses combine per-tensor results in
the plan's order. The runs start real ranks with ``--nproc N`` (torch's own launcher) or with
``python -m torch.distributed.run`` (what the ``torchrun`` command runs); the kill test kills one
rank with a real SIGKILL from inside it, at a chosen point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _checkpoints import folder_bytes, make_tiny, write_config
from _cli import cli_env, cli_script, die_inside_shard, leftovers, run_cli, tree

from tritonmerge.io.writer import partial_dir

pytest.importorskip("torch.distributed")
SHARD = ("--out-shard-size", "20KB", "--quiet")

CONFIGS = {
    "ties": ("ties", {"density": 0.3, "weight": 1.0}),
    "ties_model_scope": ("ties", {"density": 0.3, "weight": 1.0, "topk_scope": "model"}),
    "dare_ties": ("dare_ties", {"density": 0.5, "weight": 1.0}),
    "tadrop": ("tadrop", {"merge_method": "ties", "density": 0.3, "weight": 1.0}),
    "lwptv": ("lwptv", {"merge_method": "task_arithmetic", "weight": 1.0, "prune_fraction": 0.34}),
    "wudi_adam": ("wudi", {"steps": 20}),
    "wudi_exact": ("wudi", {"solver": "exact"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_models")
    base, experts = make_tiny(root / "m")
    configs = {}
    for key, (method, params) in CONFIGS.items():
        configs[key] = write_config(root / f"{key}.yml", method, base, experts, parameters=params)
    return root, base, experts, configs


@pytest.fixture(scope="module")
def single(models):
    """The single-process output of each config (made once)."""
    root, _, _, configs = models
    outs = {}

    def get(key: str) -> Path:
        if key not in outs:
            out = root / f"single_{key}"
            proc = run_cli("merge", configs[key], out, *SHARD)
            assert proc.returncode == 0, proc.stderr
            outs[key] = out
        return outs[key]

    return get


def torchrun(nproc: int, script_or_module: list[str], *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ...`` as ``python -m torch.distributed.run``."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         *script_or_module, *map(str, args)],
        capture_output=True, text=True, env=cli_env(OMP_NUM_THREADS="1"), timeout=timeout,
    )


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_ranks_give_the_single_process_bytes(models, single, tmp_path, key, nproc):
    _, _, _, configs = models
    out = tmp_path / "out"
    proc = run_cli("merge", configs[key], out, *SHARD, "--nproc", str(nproc))
    assert proc.returncode == 0, proc.stderr
    assert folder_bytes(out) == folder_bytes(single(key))
    assert leftovers(out) == []


def test_torchrun_command_and_each_rank_reads_only_its_tensors(models, single, tmp_path):
    """Started by torchrun itself; each rank records what its analysis and merge pass load:
    every tensor is loaded by exactly one rank in each pass."""
    _, _, _, configs = models
    log = tmp_path / "loads"
    log.mkdir()
    script = cli_script(f"""
        import os, json
        import tritonmerge.engine as eng
        loads = {{"analysis": [], "merge": []}}
        _load = eng.StreamingSource.load
        def load(self, name):
            loads["analysis"].append(name)
            return _load(self, name)
        eng.StreamingSource.load = load
        _read_unit = eng._read_unit
        def read_unit(plan, reader, unit, checked=None):
            if unit.in_bytes and (unit.rows is None or unit.rows[0] == 0):  # the analysis reads name no bytes
                loads["merge"].append(unit.name)
            return _read_unit(plan, reader, unit, checked)
        eng._read_unit = read_unit
        import atexit
        atexit.register(lambda: open(os.path.join({str(log)!r}, "rank-" + os.environ["RANK"]), "w").write(json.dumps(loads)))
    """, tmp_path)
    out = tmp_path / "out"
    proc = torchrun(2, [str(script)], "merge", configs["lwptv"], out, *SHARD)
    assert proc.returncode == 0, proc.stderr
    assert folder_bytes(out) == folder_bytes(single("lwptv"))
    per_rank = [json.loads((log / f"rank-{r}").read_text()) for r in range(2)]
    plan_names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = [n for r in per_rank for n in r["merge"]]
    assert sorted(merged) == sorted(plan_names)  # each tensor once, by one rank
    assert all(r["merge"] for r in per_rank), "a rank had nothing to merge"
    analysed = [set(r["analysis"]) for r in per_rank]
    assert analysed[0] and analysed[1] and not (analysed[0] & analysed[1])


def test_more_ranks_than_shards(models, single, tmp_path):
    _, _, _, configs = models
    out = tmp_path / "out"
    proc = run_cli("merge", configs["ties_model_scope"], out, "--out-shard-size", "5GB", "--quiet", "--nproc", "3")
    assert proc.returncode == 0, proc.stderr
    one = tmp_path / "one"
    assert run_cli("merge", configs["ties_model_scope"], one, "--out-shard-size", "5GB", "--quiet").returncode == 0
    assert folder_bytes(out) == folder_bytes(one)
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) == 1


@pytest.mark.parametrize("resume_nproc", [3, 1])
def test_a_killed_rank_fails_the_run_and_resume_with_other_ranks_finishes(models, single, tmp_path, resume_nproc):
    """Rank 1 kills itself (SIGKILL) while writing its second shard; torchrun ends the job. The
    partial folder keeps every finished shard, and --resume with another rank count finishes
    with the bytes of an uninterrupted single-process run."""
    _, _, _, configs = models
    script = cli_script(die_inside_shard(2, only_if='os.environ.get("RANK") == "1"'), tmp_path)
    out = tmp_path / "out"
    proc = torchrun(2, [str(script)], "merge", configs["tadrop"], out, *SHARD)
    assert proc.returncode != 0
    tmp = partial_dir(out)
    assert tmp.is_dir() and not out.exists()
    assert any(tmp.glob("tritonmerge_checksums*.json"))
    resumed = run_cli("merge", configs["tadrop"], out, *SHARD, "--resume", "--nproc", str(resume_nproc))
    assert resumed.returncode == 0, resumed.stderr
    assert folder_bytes(out) == folder_bytes(single("tadrop"))
    assert leftovers(out) == []


def test_a_refusal_is_said_once_and_leaves_nothing(models, tmp_path):
    root, base, _, configs = models
    before = tree(base)
    proc = run_cli("merge", configs["ties"], base, "--overwrite", "--quiet", "--nproc", "2")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tritonmerge: error: rank 0 of 2:")]
    assert len(errors) == 1, proc.stderr
    assert "input" in errors[0]
    assert tree(base) == before
    assert leftovers(base) == []


def test_rank_0_shows_one_bar_for_the_whole_job(models, tmp_path):
    _, _, _, configs = models
    out = tmp_path / "out"
    proc = run_cli("merge", configs["ties"], out, "--out-shard-size", "20KB", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    renders = [r for r in re.split(r"[\r\n]", proc.stderr) if r.startswith("merging:")]
    assert renders, proc.stderr
    # the last render: the whole job's bytes done, out of the whole job's bytes
    assert re.match(r"merging: 100%\|[^|]*\| ([\d.]+k)/\1 ", renders[-1]), renders[-1]
    assert proc.stderr.count("merged 30 tensors") == 1


def test_a_job_of_one_rank_takes_the_distributed_path(models, single, tmp_path):
    _, _, _, configs = models
    out = tmp_path / "out"
    proc = torchrun(1, ["--module", "tritonmerge"], "merge", configs["ties_model_scope"], out, "--out-shard-size", "20KB")
    assert proc.returncode == 0, proc.stderr
    assert "on 1 rank(s)" in proc.stderr  # the distributed engine's own message
    assert folder_bytes(out) == folder_bytes(single("ties_model_scope"))


@pytest.mark.gpu
def test_nccl_ranks_on_the_gpus_give_the_single_process_bytes(models, tmp_path):
    """NCCL (the default process group on CUDA), one rank per GPU (one rank where there is one
    GPU), against a single CUDA process. TIES with model scope sums its histograms, computed on
    the GPU, over NCCL."""
    import torch

    _, _, _, configs = models
    one = tmp_path / "one"
    assert run_cli("merge", configs["ties_model_scope"], one, *SHARD, "--device", "cuda").returncode == 0
    out = tmp_path / "ranks"
    proc = torchrun(torch.cuda.device_count(), ["--module", "tritonmerge"], "merge", configs["ties_model_scope"], out,
                    *SHARD, "--device", "cuda")
    assert proc.returncode == 0, proc.stderr
    assert folder_bytes(out) == folder_bytes(one)
