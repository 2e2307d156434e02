"""One writer per output: two runs into the same OUT_DIR never mix. The loser is refused at once
("another tritonmerge (pid N) is writing OUT") or, if it came second, finds the output there;
the surviving folder always equals one clean run byte for byte. A lock left by a dead process
never blocks. Real processes started together, real files."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import xxhash

from _checkpoints import folder_bytes, make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli, start_cli, tree

from tritonmerge.io.lock import lock_path

SHARD = ("--out-shard-size", "20KB", "--quiet")


@pytest.fixture(scope="module")
def two_merges(tmp_path_factory):
    """Two different configs over the same models and a clean reference output of each."""
    tmp = tmp_path_factory.mktemp("concurrency")
    base, experts = make_tiny(tmp / "models")
    configs = {
        "ties": write_config(tmp / "ties.yml", "ties", base, experts, {"density": 0.5}),
        "task_arithmetic": write_config(tmp / "ta.yml", "task_arithmetic", base, experts, {"lambda": 0.7}),
    }
    refs = {}
    for name, cfg in configs.items():
        ref = tmp / f"ref_{name}"
        r = run_cli("merge", cfg, ref, *SHARD)
        assert r.returncode == 0, r.stderr
        refs[name] = folder_bytes(ref)
    assert refs["ties"] != refs["task_arithmetic"]
    return tmp, configs, refs


def _consistent(out: Path) -> None:
    """Every shard matches the folder's own checksum file."""
    manifest = json.loads((out / "tritonmerge_checksums.json").read_text())
    for fname, rec in manifest["shards"].items():
        assert xxhash.xxh64((out / fname).read_bytes()).hexdigest() == rec["xxh64"], fname


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("first", ["ties", "task_arithmetic"])
def test_two_runs_started_together_never_mix(two_merges, overwrite, first, tmp_path):
    tmp, configs, refs = two_merges
    second = "task_arithmetic" if first == "ties" else "ties"
    flags = ("--overwrite",) if overwrite else ()
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        if overwrite:  # an earlier output of the second config is there to be replaced
            out.mkdir()
            for fname, data in refs[second].items():
                (out / fname).write_bytes(data)
        procs = {name: start_cli("merge", configs[name], out, *SHARD, *flags) for name in (first, second)}
        codes = {}
        for name, p in procs.items():
            _, err = p.communicate(timeout=240)
            codes[name] = p.returncode
            if p.returncode != 0:
                assert p.returncode == 2, err
                assert "another tritonmerge (pid " in err or "already exists" in err, err
                assert len(err.strip().splitlines()) == 1, err
        assert 0 in codes.values(), codes
        survivor = folder_bytes(out)
        assert survivor in (refs[first], refs[second]), f"trial {trial}: the output mixes two merges"
        winners = [name for name, c in codes.items() if c == 0]
        if len(winners) == 1:
            assert survivor == refs[winners[0]]
        _consistent(out)
        assert not leftovers(out)


def test_a_live_lock_refuses_at_once_and_changes_nothing(two_merges, tmp_path):
    tmp, configs, refs = two_merges
    out = tmp_path / "out"
    out.mkdir()
    for fname, data in refs["ties"].items():
        (out / fname).write_bytes(data)
    # another writer, as the engine would hold it (the test holds it itself, in this process)
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    before = tree(tmp_path)
    try:
        r = run_cli("merge", configs["task_arithmetic"], out, *SHARD, "--overwrite")
        assert_refused(r, f"another tritonmerge (pid {os.getpid()}) is writing {out}")
        assert tree(tmp_path) == before
        r = run_cli("merge", configs["task_arithmetic"], out, *SHARD, "--overwrite", "--dry-run")
        assert_refused(r, f"another tritonmerge (pid {os.getpid()}) is writing")
    finally:
        os.close(fd)
    # the holder is gone (its descriptor closed); the file it left does not block
    assert lock_path(out).exists()
    r = run_cli("merge", configs["task_arithmetic"], out, *SHARD, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == refs["task_arithmetic"] and not leftovers(out)


def test_lock_file_of_a_dead_process_does_not_block(two_merges, tmp_path):
    tmp, configs, refs = two_merges
    out = tmp_path / "out"
    lock_path(out).write_text("999999\n")  # what a killed run leaves: the file, no holder
    r = run_cli("merge", configs["ties"], out, *SHARD)
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == refs["ties"] and not leftovers(out)
    shutil.rmtree(out)
