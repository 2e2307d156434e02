"""``kill -9`` at three points of a merge, then ``--resume``: the output is byte-identical to an
uninterrupted run, and the lock file the dead process left does not block the resume.

The kills are real SIGKILLs of real CLI processes. To hit each point every time (a merge of
tiny models is over in milliseconds), the process kills itself from inside the function that
marks the point: after the partial folder is made and before any shard, in the middle of a
shard file, and after every shard is on disk but before the output is committed."""

from __future__ import annotations

import json
import signal

import pytest

from _checkpoints import folder_bytes, make_tiny, write_config
from _cli import die_inside_shard, leftovers, run_cli, run_cli_with

from tritonmerge.io.lock import lock_path
from tritonmerge.io.writer import partial_dir

SHARD = ("--out-shard-size", "20KB", "--quiet")

KILL = "os.kill(os.getpid(), signal.SIGKILL)"

# where: (prelude that kills the CLI there, shards finished when it dies: None = any)
KILL_POINTS = {
    "before_first_shard": (
        f"""
        import os, signal
        import tritonmerge.io.writer as w
        _save = w.Manifest.save
        def save(self):
            _save(self)
            {KILL}
        w.Manifest.save = save
        """,
        0,
    ),
    "inside_third_shard": (die_inside_shard(3), 2),
    "before_commit": (
        f"""
        import os, signal
        import tritonmerge.engine as e
        def commit(tmp, out_dir, overwrite):
            {KILL}
        e.commit = commit
        """,
        None,
    ),
}

METHODS = {
    "before_first_shard": ("ties", {"density": 0.4, "topk_scope": "model"}),  # with an analysis pass
    "inside_third_shard": ("dare_ties", {"density": 0.5, "seed": 7}),
    "before_commit": ("task_arithmetic", {"lambda": 0.6}),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_resume_is_byte_identical(tmp_path, point):
    base, experts = make_tiny(tmp_path / "models")
    method, params = METHODS[point]
    cfg = write_config(tmp_path / "c.yml", method, base, experts, params)
    ref = tmp_path / "ref"
    r = run_cli("merge", cfg, ref, *SHARD)
    assert r.returncode == 0, r.stderr
    n_shards = len(json.loads((ref / "tritonmerge_checksums.json").read_text())["shards"])
    assert n_shards >= 4

    out = tmp_path / "out"
    prelude, finished = KILL_POINTS[point]
    r = run_cli_with(prelude, "merge", cfg, out, *SHARD, script_dir=tmp_path)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not out.exists(), "a killed merge must not leave a folder that looks complete"
    manifest = json.loads((partial_dir(out) / "tritonmerge_checksums.json").read_text())
    if finished is not None:
        assert len(manifest["shards"]) == finished
    else:
        assert len(manifest["shards"]) == n_shards
    assert lock_path(out).exists()  # the dead process's lock file is still there ...

    r = run_cli("merge", cfg, out, *SHARD, "--resume")  # ... and does not block
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == folder_bytes(ref)
    assert not leftovers(out)
