"""Timed runs in fresh processes, page-cache control and the machine description."""

from __future__ import annotations

import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import machine

REPO = Path(__file__).resolve().parents[2]
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass
class RunSample:
    """One run of one tool: wall time and peak RSS of its whole process, as the parent saw them."""

    tool: str
    wall_s: float  # spawn to exit: interpreter start, imports, merge, final writes
    run_s: float  # inside the process, after imports: the merge (or the floor's read+write)
    import_s: float
    peak_rss_bytes: int
    rc: int
    cache: str
    cpu_s: float = float("nan")  # user + system CPU time of the child (all its threads)
    busy_before: float = 0.0  # CPU share used by other processes just before the run (0..1)
    gpu_peak_allocated_bytes: int | None = None
    gpu_peak_reserved_bytes: int | None = None
    torch_threads: int | None = None
    tool_version: str = ""
    torch_version: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def can_drop_caches() -> bool:
    """Whether this process may empty the page cache (root with a writable /proc/sys)."""
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def warm_files(paths: list[Path], chunk: int = 16 << 20) -> int:
    """Read every file once so it sits in the page cache; returns the bytes read."""
    total = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def prepare_cache(mode: str, input_files: list[Path]) -> None:
    """Bring every tool to the same starting point: pending writes flushed, then inputs either
    all in the page cache (warm) or none of them (cold)."""
    os.sync()  # the previous run's output must not be written back during this one
    if mode == "cold":
        drop_caches()
    elif mode == "warm":
        warm_files(input_files)
    else:
        raise ValueError(f"cache mode must be warm or cold, got {mode!r}")


def cpu_busy_fraction(interval: float = 0.5) -> float:
    """Share of all cores busy (any process) over ``interval`` seconds, from /proc/stat."""

    def snap() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    i0, t0 = snap()
    time.sleep(interval)
    i1, t1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(threshold: float = 0.15, max_wait: float = 180.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the
    CPUs: this machine may be shared, and a concurrent job would distort wall times. Returns
    the last measured busy share (recorded with each sample)."""
    deadline = time.perf_counter() + max_wait
    busy = cpu_busy_fraction()
    while busy > threshold and time.perf_counter() < deadline:
        time.sleep(2.0)
        busy = cpu_busy_fraction()
    return busy


def run_child(
    tool: str,
    args: list[str],
    *,
    python: str,
    cache: str,
    input_files: list[Path],
    timeout: float = 3600,
    env: dict | None = None,
    quiet_wait: float = 180.0,
) -> RunSample:
    """Run ``python -m benchmarks.e2e.child TOOL ARGS`` in a fresh process after preparing the
    page cache; measure its wall time and peak RSS (ru_maxrss of exactly that child)."""
    prepare_cache(cache, input_files)
    busy = wait_for_quiet(max_wait=quiet_wait) if quiet_wait > 0 else 0.0
    if cache == "cold":  # waiting may have let something read the inputs back in
        drop_caches()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        err_file = Path(tmp) / "stderr.txt"
        cmd = [python, "-m", "benchmarks.e2e.child", tool, *args, "--result", str(result_file)]
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = str(REPO) + os.pathsep + child_env.get("PYTHONPATH", "")
        with open(err_file, "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.DEVNULL, stderr=err)
            deadline = t0 + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.005)
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        info = json.loads(result_file.read_text()) if result_file.exists() else {}
        stderr_tail = err_file.read_text(errors="replace")[-2000:]
    rc = proc.returncode
    return RunSample(
        tool=tool,
        wall_s=wall,
        run_s=float(info.get("run_s", float("nan"))),
        import_s=float(info.get("import_s", float("nan"))),
        # the child's own VmHWM; ru_maxrss would include the parent's RSS inherited at fork/exec
        peak_rss_bytes=int(info.get("peak_rss_bytes") or usage.ru_maxrss * 1024),
        rc=rc,
        cache=cache,
        cpu_s=usage.ru_utime + usage.ru_stime,
        busy_before=busy,
        gpu_peak_allocated_bytes=info.get("gpu_peak_allocated_bytes"),
        gpu_peak_reserved_bytes=info.get("gpu_peak_reserved_bytes"),
        torch_threads=info.get("torch_threads"),
        tool_version=info.get("tool_version", ""),
        torch_version=info.get("torch_version", ""),
        stderr_tail="" if rc == 0 else stderr_tail,
        extra={k: v for k, v in info.items() if k in ("bytes_read", "bytes_written", "source_hash")},
    )


def same_files(a: Path, b: Path) -> bool:
    """Whether two output folders hold the same files with the same bytes."""
    names = sorted(p.name for p in Path(a).iterdir())
    if names != sorted(p.name for p in Path(b).iterdir()):
        return False
    return all(filecmp.cmp(Path(a) / n, Path(b) / n, shallow=False) for n in names if (Path(a) / n).is_file())


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def _version_in(python: str, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "not installed"
    except Exception:
        return "not installed"


def machine_description(mergekit_python: str | None) -> dict:
    """CPU, cores, RAM, GPU, versions and git commit of this run."""
    import torch

    import tritonmerge

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu_model": machine.cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": machine.mem_total(),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tritonmerge": tritonmerge.__version__,
        "safetensors": _version_in(sys.executable, "safetensors"),
        "mergekit": _version_in(mergekit_python, "mergekit") if mergekit_python else "not installed",
        "mergekit_torch": _version_in(mergekit_python, "torch") if mergekit_python else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": dirty,
        "can_drop_page_cache": can_drop_caches(),
    }
