"""A disk that fills up mid-write: one line that says so, finished shards kept for --resume, and
the resumed output byte-identical to an uninterrupted run.

A real full disk cannot be made on the CI machine without privileges, so the ENOSPC is injected
through the writer's file layer (``tritonmerge.io.writer.open_shard_file``): the third shard's
file fails its first write with the error a full disk raises. Everything else is the real CLI on
real files."""

from __future__ import annotations

from _checkpoints import folder_bytes, make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli, run_cli_with
from tritonmerge.io.writer import partial_dir

SHARD = ("--out-shard-size", "20KB", "--quiet")

DISK_FILLS_AT_THIRD_SHARD = """
import errno, os
import tritonmerge.io.writer as w
_open = w.open_shard_file
opened = []
class FullDisk:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __getattr__(self, name):
        return getattr(self.f, name)
def open_shard_file(path):
    opened.append(path)
    f = _open(path)
    return FullDisk(f) if len(opened) == 3 else f
w.open_shard_file = open_shard_file
"""


def _fails_at_third_shard_then_resumes(tmp_path, fault: str, *said: str) -> str:
    """Merge under ``fault`` (a script run before the CLI), check the refusal says ``said`` and
    keeps the two finished shards, then --resume and compare with an uninterrupted run; returns
    the refusal's stderr."""
    base, experts = make_tiny(tmp_path / "models")
    cfg = write_config(tmp_path / "c.yml", "ties", base, experts, {"density": 0.5})
    ref = tmp_path / "ref"
    assert run_cli("merge", cfg, ref, *SHARD).returncode == 0
    out = tmp_path / "out"
    r = run_cli_with(fault, "merge", cfg, out, *SHARD, script_dir=tmp_path)
    assert_refused(r, *said, "finished shards were kept (2 of", "run again with --resume")
    assert not out.exists() and partial_dir(out).is_dir()
    refusal = r.stderr
    r = run_cli("merge", cfg, out, *SHARD, "--resume")
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == folder_bytes(ref) and not leftovers(out)
    return refusal


def test_disk_full_mid_write_keeps_finished_shards_for_resume(tmp_path):
    _fails_at_third_shard_then_resumes(tmp_path, DISK_FILLS_AT_THIRD_SHARD, "the disk is full")


# The writer makes each shard durable in the background while it goes on writing (os.fdatasync
# every WRITEBACK_BYTES, lowered here so that the tiny shards reach it): the third shard's flush
# fails the way a failing disk does.
FLUSH_FAILS_AT_THIRD_SHARD = """
import errno, os
import tritonmerge.io.writer as w
w.WRITEBACK_BYTES = 1
_open = w.open_shard_file
_fdatasync = os.fdatasync
opened, failing = [], set()
def open_shard_file(path):
    opened.append(path)
    f = _open(path)
    if len(opened) == 3:
        failing.add(f.fileno())
    return f
def fdatasync(fd):
    if fd in failing:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    _fdatasync(fd)
w.open_shard_file = open_shard_file
os.fdatasync = fdatasync
"""


def test_background_flush_error_stops_the_merge_and_resume_redoes_the_shard(tmp_path):
    refusal = _fails_at_third_shard_then_resumes(tmp_path, FLUSH_FAILS_AT_THIRD_SHARD, "Input/output error")
    assert "model-00003-of-" in refusal  # the file that failed is named
