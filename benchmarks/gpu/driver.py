"""The driver behind ``bash benchmarks/gpu/run.sh``: every GPU check of the project in one run
that fits a fixed time budget, its results as JSON named by device, and a one-screen summary.

Steps, in order (each one or a few subprocesses under a hard timeout):

  preflight  the imports every step needs, checked up front (carried wheels in ``.whl/``
             installed first when something is missing), the device, nvcc
  build      ``pip install --no-deps --no-build-isolation -e .`` (builds the CUDA extension),
             then whether ``tritonmerge._C`` loads
  gpu_tests  ``pytest -m gpu tests``
  kernels    benchmarks/bench_kernels.py: exact threshold selection, fused TIES / TADrop-TIES
  wudi       benchmarks/bench_wudi.py: official loop vs batched solver vs extension vs exact
  e2e        ``python -m benchmarks.e2e.run``: ties, task_arithmetic, wudi (exact solver) against
             the I/O floor of the same run, mergekit beside them where it imports

The synthetic checkpoints of the end-to-end step are generated in the background from the
start (CPU only, 4 threads), so that step does not wait for them; every timed step that runs
while they are generated measures GPU time, and the e2e runs start only once they are done.

Time: the run has a total budget (8 minutes at GPU sizes); each step has a share of it and an
estimate. A step may use its share plus whatever earlier steps left unused, never time that a
later step's share needs; one that would not fit is not started, one that runs over is killed —
both with a note in the summary and in the JSON, never silently. The benchmark files rewrite
their JSON after every case, so a step cut short keeps what it measured.

``--smoke`` runs the same steps at tiny sizes on CPU (Triton's interpreter, the CPU fallbacks, no
extension build) in under 2 minutes, writing to ``benchmarks/.cache/gpu-smoke/`` (git-ignored)
rather than beside the committed results. With ``$OUT`` set (the device tool's output folder)
every result file of the run and the log are copied there too (at most 8 files).

This module imports only the standard library: it must start, and say what is missing, on an
image that lacks the project's dependencies.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
WHEEL_DIR = REPO / ".whl"
DEFAULT_MERGEKIT_PYTHON = os.environ.get("TRITONMERGE_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python")
# The device tool brings back at most this many files from $OUT.
MAX_OUT_FILES = 8

# What each module is installed as, for the "carry a wheel for ..." advice.
WHEELS = {
    "pydantic": "pydantic pydantic-core annotated-types typing-inspection typing-extensions",
    "yaml": "pyyaml",
    "pytest_benchmark": "pytest-benchmark py-cpuinfo",
    "pytest": "pytest pluggy iniconfig",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "numpy": "numpy",
    "setuptools": "setuptools",
    "ninja": "ninja",
    "triton": "triton",
}
NOT_CARRIABLE = {"torch": "the image's own CUDA build of torch (too large to carry)",
                 "tritonmerge": "the checkout itself: its import error names what it lacks"}
# Needed by every step (tritonmerge itself imports the first six).
REQUIRED = ["torch", "numpy", "safetensors", "pydantic", "yaml", "tqdm", "tritonmerge"]
STEP_NEEDS = {
    "build": ["setuptools"],
    "gpu_tests": ["pytest"],
    "kernels": ["pytest", "pytest_benchmark", "triton"],
    "wudi": ["pytest", "pytest_benchmark"],
    "e2e": [],
}
OPTIONAL = ["ninja"]  # the extension builds without it, serially and slower

STEP_TITLES = {
    "preflight": "imports, device, nvcc",
    "build": "install + CUDA extension build",
    "gpu_tests": "pytest -m gpu tests",
    "kernels": "kernel benchmarks",
    "wudi": "WUDI benchmark",
    "e2e": "end-to-end merges vs I/O floor",
}
STEP_ORDER = list(STEP_TITLES)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes, budgets and estimates of one kind of run."""

    name: str
    total_s: float
    budget_s: dict[str, float]  # each step's share of total_s; the rest is for the summary
    estimate_s: dict[str, float]
    kernels_env: dict[str, str]
    wudi_env: dict[str, str]
    wudi_deselect: str  # pytest -k expression for cases left out, with why in wudi_deselect_why
    wudi_deselect_why: str
    e2e_shape: str
    e2e_device: str
    e2e_repeats: int
    e2e_repeats_with_mergekit: int
    e2e_quiet_wait: float
    evaluate_targets: bool


# At GPU sizes on an H200 (benchmarks/gpu/README.md has the arithmetic behind each estimate).
GPU = Profile(
    name="gpu",
    total_s=480,
    budget_s={"preflight": 20, "build": 75, "gpu_tests": 60, "kernels": 90, "wudi": 75, "e2e": 150},
    estimate_s={"preflight": 8, "build": 45, "gpu_tests": 40, "kernels": 65, "wudi": 55, "e2e": 120},
    kernels_env={
        "TRITONMERGE_BENCH_SELECT_SIZES": "1e8,1e9",
        "TRITONMERGE_BENCH_MERGE_SHAPE": "4096x14336",
        "TRITONMERGE_BENCH_EXPERTS": "8",
        "TRITONMERGE_BENCH_ROUNDS": "10",
        # a torch.kthvalue over 1e9 elements takes seconds: rounds are cut to fit
        "TRITONMERGE_BENCH_CASE_SECONDS": "2.5",
    },
    wudi_env={
        "TRITONMERGE_BENCH_WUDI_SHAPES": "4096x4096,4096x14336,14336x4096",
        "TRITONMERGE_BENCH_WUDI_STEPS": "300",
        "TRITONMERGE_BENCH_WUDI_OFFICIAL_STEPS": "5",
        "TRITONMERGE_BENCH_ROUNDS": "1",
        "TRITONMERGE_BENCH_WARMUP": "0",
    },
    wudi_deselect="not whole_model",
    wudi_deselect_why=("whole-model case (224 Llama-7B layers, ~22 PFLOP of fp32 GEMMs per variant, "
                       "~7 min each on an H200) left out: over this run's budget; "
                       "run `pytest benchmarks/bench_wudi.py -k whole_model --benchmark-only` on its own"),
    e2e_shape="1b",
    e2e_device="cuda",
    e2e_repeats=2,
    e2e_repeats_with_mergekit=1,
    e2e_quiet_wait=10,
    evaluate_targets=True,
)

# The same steps at tiny sizes on a 2-core CPU machine; the total must stay under 2 minutes.
SMOKE = Profile(
    name="smoke",
    total_s=118,
    budget_s={"preflight": 15, "build": 14, "gpu_tests": 18, "kernels": 20, "wudi": 18, "e2e": 30},
    estimate_s={"preflight": 4, "build": 8, "gpu_tests": 10, "kernels": 12, "wudi": 12, "e2e": 30},
    kernels_env={
        "TRITONMERGE_BENCH_CPU": "1",
        "TRITONMERGE_BENCH_SELECT_SIZES": "2e3,1e4",
        "TRITONMERGE_BENCH_MERGE_SHAPE": "32x48",
        "TRITONMERGE_BENCH_EXPERTS": "8",
        "TRITONMERGE_BENCH_ROUNDS": "1",
        "TRITONMERGE_BENCH_CASE_SECONDS": "0.01",
    },
    wudi_env={
        "TRITONMERGE_BENCH_CPU": "1",
        "TRITONMERGE_BENCH_WUDI_SHAPES": "32x32,32x64,64x32",
        "TRITONMERGE_BENCH_WUDI_STEPS": "20",
        "TRITONMERGE_BENCH_WUDI_OFFICIAL_STEPS": "20",
        "TRITONMERGE_BENCH_ROUNDS": "1",
        "TRITONMERGE_BENCH_WARMUP": "0",
    },
    wudi_deselect="not whole_model",
    wudi_deselect_why="whole-model case left out, as in the GPU run (over its budget there)",
    e2e_shape="tiny",
    e2e_device="cpu",
    e2e_repeats=1,
    e2e_repeats_with_mergekit=1,
    e2e_quiet_wait=0,  # the CI machine is shared: waiting for quiet could take the whole budget
    evaluate_targets=False,
)

PROBE = r"""
import importlib, importlib.util, json, os, shutil, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}}
for mod in MODULES:
    try:
        m = importlib.import_module(mod)
        out["modules"][mod] = {"ok": True, "version": str(getattr(m, "__version__", ""))}
    except BaseException as exc:
        out["modules"][mod] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
out["mergekit_found"] = importlib.util.find_spec("mergekit") is not None
cuda_home = None
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        out["gpu_count"] = torch.cuda.device_count()
    from torch.utils.cpp_extension import CUDA_HOME as cuda_home
except BaseException as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
nvcc = shutil.which("nvcc")
if nvcc is None and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
out["nvcc"] = nvcc
try:
    from benchmarks import machine
    name = out.get("device_name") or machine.device_name("cpu")
    out.update(device_name=name, slug=machine.slug(name), cpu=machine.cpu_model(), cores=os.cpu_count(),
               ram_bytes=machine.mem_total(), git=machine.git_sha())
except BaseException as exc:
    out["machine_error"] = f"{type(exc).__name__}: {exc}"
out["disk_free_bytes"] = shutil.disk_usage(".").free
print("PROBE-JSON " + json.dumps(out))
"""

EXTENSION_CHECK = r"""
import json
from tritonmerge.backends import extension_status
ext, why = extension_status()
print("EXT-JSON " + json.dumps({"loaded": ext is not None, "why": why, "file": getattr(ext, "__file__", None)}))
"""

MERGEKIT_CHECK = "import mergekit.scripts.run_yaml"

CHECKPOINTS = r"""
import sys
from pathlib import Path
from benchmarks.e2e.checkpoints import ensure_checkpoints
from benchmarks.e2e.shapes import SHAPES
ensure_checkpoints(SHAPES[sys.argv[1]], Path(sys.argv[2]))
"""


@dataclasses.dataclass
class CmdResult:
    rc: int | None
    seconds: float
    cut: bool
    tail: list[str]


@dataclasses.dataclass
class StepResult:
    name: str
    title: str
    estimate_s: float
    budget_s: float
    allowed_s: float = 0.0
    seconds: float = 0.0
    status: str = "not started"  # ok | failed | cut | not started | not run
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Cut(Exception):
    """A command of the step ran past the time the step was allowed."""


class Run:
    """One run of the driver: its clock, log, results folder and step bookkeeping."""

    def __init__(self, profile: Profile, results: Path, out: Path | None, only: set[str] | None, python: str):
        self.profile = profile
        self.results = results
        self.out = out
        self.only = only
        self.python = python
        self.t0 = time.monotonic()
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self.started_wall = time.time()
        self.deadline = self.t0 + profile.total_s
        self.tmp = Path(tempfile.mkdtemp(prefix="tritonmerge-gpu-run-"))
        self.log_path = self.tmp / "run.log"
        self.log_file = open(self.log_path, "a", encoding="utf-8", errors="replace")
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                        TRITONMERGE_BENCH_RESULTS=str(results))
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.probe: dict[str, Any] = {}
        self.steps: dict[str, StepResult] = {
            n: StepResult(n, STEP_TITLES[n], profile.estimate_s[n], profile.budget_s[n]) for n in STEP_ORDER
        }
        self.step_deadline = self.deadline
        self.background: subprocess.Popen | None = None
        self.background_log: Path | None = None
        self.background_t0 = 0.0
        self.e2e_cache: Path | None = None

    # ----------------------------------------------------------------------------------------
    # output

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log(line)

    def log(self, text: str) -> None:
        self.log_file.write(text if text.endswith("\n") else text + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ----------------------------------------------------------------------------------------
    # commands

    def run_cmd(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> CmdResult:
        """Run ``argv`` in the repo root, output into the log; killed (its whole process group)
        when it runs past ``timeout`` or the step's deadline, whichever is first."""
        limit = self.step_deadline - time.monotonic()
        if timeout is not None:
            limit = min(limit, timeout)
        if limit <= 1:
            raise Cut(f"no time left for `{_show(argv)}`")
        self.log(f"$ {_show(argv)}    (limit {limit:.0f} s)")
        start_offset = self.log_file.tell()
        t = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=self.log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        cut = False
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            cut = True
            _kill_group(proc)
            rc = None
        seconds = time.monotonic() - t
        self.log_file.flush()
        tail = _read_from(self.log_path, start_offset).splitlines()[-25:]
        self.log(f"# rc={rc} after {seconds:.1f} s" + (" (killed: over its time limit)" if cut else ""))
        return CmdResult(rc, seconds, cut, tail)

    def python_cmd(self, *args: str) -> list[str]:
        return [self.python, *args]

    # ----------------------------------------------------------------------------------------
    # steps

    def later_budget(self, name: str) -> float:
        later = STEP_ORDER[STEP_ORDER.index(name) + 1:]
        return sum(self.profile.budget_s[n] for n in later if self.wanted(n))

    def wanted(self, name: str) -> bool:
        return name == "preflight" or self.only is None or name in self.only

    def step(self, name: str, body: Callable[[StepResult], None], *, blocked: str | None = None) -> StepResult:
        """Run one step within its allowance: what is left of the total less what the later
        steps' shares need (so never less than its own share while earlier steps keep theirs)."""
        s = self.steps[name]
        index = STEP_ORDER.index(name) + 1
        if not self.wanted(name):
            s.status = "not run"
            s.notes.append("left out by --only")
            return s
        if blocked:
            s.status = "not started"
            s.notes.append(blocked)
            self.say(f"[{index}/{len(STEP_ORDER)}] {name}: not started: {blocked}")
            return s
        reserve = self.profile.total_s - sum(self.profile.budget_s.values())
        s.allowed_s = max(0.0, self.deadline - time.monotonic() - reserve - self.later_budget(name))
        if s.allowed_s < s.estimate_s:
            s.status = "not started"
            s.notes.append(f"would overrun: estimate {s.estimate_s:.0f} s, only {s.allowed_s:.0f} s left for it")
            self.say(f"[{index}/{len(STEP_ORDER)}] {name}: NOT STARTED: {s.notes[-1]}")
            return s
        self.say(f"[{index}/{len(STEP_ORDER)}] {name} ({s.title}): estimate {s.estimate_s:.0f} s, "
                 f"allowed {s.allowed_s:.0f} s  [t={self.elapsed():.0f} s]")
        self.log(f"===== {name} =====")
        self.step_deadline = time.monotonic() + s.allowed_s
        t = time.monotonic()
        try:
            s.status = "ok"
            body(s)
        except Cut as exc:
            s.status = "cut"
            s.notes.append(f"CUT after {time.monotonic() - t:.0f} s (allowed {s.allowed_s:.0f} s): {exc}")
        except Exception as exc:  # a broken step must not take the summary down with it
            s.status = "failed"
            s.notes.append(f"driver error: {type(exc).__name__}: {exc}")
        finally:
            self.step_deadline = self.deadline
        s.seconds = time.monotonic() - t
        self.say(f"      -> {s.status} in {s.seconds:.0f} s" + (f"; {'; '.join(s.notes)}" if s.notes else ""))
        return s

    def check_cmd(self, s: StepResult, res: CmdResult, what: str) -> bool:
        """Turn a command's outcome into the step's status; True when it succeeded."""
        if res.cut:
            raise Cut(f"{what} ran past the step's time")
        if res.rc != 0:
            s.status = "failed"
            s.notes.append(f"{what} exited {res.rc}")
            self.say("      last output:\n" + "\n".join("        " + line for line in res.tail[-12:]))
            return False
        return True

    # -- preflight --------------------------------------------------------------------------

    def run_probe(self) -> dict:
        modules = sorted(set(REQUIRED + OPTIONAL + [m for ms in STEP_NEEDS.values() for m in ms]))
        code = f"MODULES = {modules!r}\n" + PROBE
        res = self.run_cmd(self.python_cmd("-c", code), timeout=120)
        if res.cut:
            raise Cut("the import probe ran past its time")
        found = [line for line in res.tail if line.startswith("PROBE-JSON ")]
        if not found:
            raise RuntimeError(f"the import probe printed nothing usable (rc {res.rc}): {' | '.join(res.tail[-5:])}")
        return json.loads(found[-1][len("PROBE-JSON "):])

    def missing(self, probe: dict, names: list[str]) -> list[str]:
        return [m for m in names if not probe["modules"].get(m, {}).get("ok")]

    def preflight(self, s: StepResult) -> None:
        probe = self.run_probe()
        needed = REQUIRED + [m for n in STEP_ORDER if self.wanted(n) for m in STEP_NEEDS.get(n, [])]
        wheels = sorted(WHEEL_DIR.glob("*.whl"))
        if self.missing(probe, needed) and wheels:
            # --target: the image's site-packages may be read-only; PYTHONPATH puts them first
            site = self.tmp / "site"
            res = self.run_cmd(self.python_cmd("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)),
                               timeout=120)
            s.details["wheels_installed"] = [w.name for w in wheels]
            if res.rc == 0:
                self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
                s.notes.append(f"installed {len(wheels)} carried wheels from .whl/ into {site}")
                probe = self.run_probe()
            else:
                s.notes.append(f"installing the carried wheels from .whl/ failed (rc {res.rc}); see the log")
        self.probe = probe
        s.details["probe"] = probe
        # the 1b checkpoints (4 x 2.5 GB) and two outputs at a time live on this disk
        if self.profile.name == "gpu" and self.wanted("e2e") and probe.get("disk_free_bytes", 1 << 62) < 20e9:
            s.notes.append(f"only {probe['disk_free_bytes'] / 1e9:.0f} GB free on disk; the e2e step needs about 16 GB")
        if self.profile.name == "gpu" and self.wanted("build"):
            for m in self.missing(probe, OPTIONAL):
                s.notes.append(f"optional {m} missing ({_error(probe, m)}): the extension builds serially; "
                               f"carry a wheel for {WHEELS[m]} to speed it up")
        # what stops the run goes first: the summary shows the first notes of a step
        problems = [_advice(probe, m) for m in self.missing(probe, REQUIRED)]
        if self.profile.name == "gpu" and not probe.get("cuda_available"):
            problems.append(f"no CUDA device visible to torch {probe['modules'].get('torch', {}).get('version', '?')} "
                            f"(CUDA build: {probe.get('torch_cuda')}); on a machine without a GPU use --smoke")
        if problems:
            s.status = "failed"
            s.notes[:0] = problems
        for m in self.missing(probe, sorted({m for n in STEP_ORDER if self.wanted(n) for m in STEP_NEEDS.get(n, [])})):
            steps = ", ".join(n for n in STEP_ORDER if m in STEP_NEEDS.get(n, []) and self.wanted(n))
            s.notes.append(f"{steps} will not start: {_advice(probe, m)}")

    def blocked_by_imports(self, name: str) -> str | None:
        if self.steps["preflight"].status != "ok":
            return "preflight failed"
        absent = self.missing(self.probe, STEP_NEEDS.get(name, []))
        return "; ".join(_advice(self.probe, m) for m in absent) if absent else None

    # -- background checkpoints for e2e -----------------------------------------------------

    def start_checkpoints(self) -> None:
        if not self.wanted("e2e"):
            return
        if self.profile.name == "smoke":
            # a private cache: other runs on a shared machine may be writing benchmarks/.cache
            self.e2e_cache = self.tmp / "e2e-cache"
        else:
            self.e2e_cache = REPO / "benchmarks" / ".cache"
        self.background_log = self.tmp / "checkpoints.log"
        env = {**self.env, "OMP_NUM_THREADS": "4"}  # leave the other cores to the build and the tests
        self.background_t0 = time.monotonic()
        with open(self.background_log, "w") as log:
            self.background = subprocess.Popen(
                self.python_cmd("-c", CHECKPOINTS, self.profile.e2e_shape, str(self.e2e_cache)), cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.log(f"# background: generating {self.profile.e2e_shape} checkpoints into {self.e2e_cache} (pid {self.background.pid})")

    def wait_checkpoints(self, s: StepResult) -> None:
        assert self.background is not None and self.background_log is not None
        waited = time.monotonic()
        try:
            rc = self.background.wait(timeout=max(1.0, self.step_deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(self.background)
            raise Cut("the synthetic checkpoints were not ready in time")
        finally:
            self.log("----- background checkpoint generation -----\n" + self.background_log.read_text(errors="replace"))
        s.details["checkpoints_s"] = time.monotonic() - self.background_t0
        s.details["waited_for_checkpoints_s"] = time.monotonic() - waited
        if rc != 0:
            raise RuntimeError(f"generating the {self.profile.e2e_shape} checkpoints failed (rc {rc}); see the log")

    def stop_background(self) -> None:
        if self.background is not None and self.background.poll() is None:
            _kill_group(self.background)

    # -- build --------------------------------------------------------------------------------

    def build(self, s: StepResult) -> None:
        install = self.python_cmd("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", ".")
        if self.profile.name == "smoke":
            torch_cuda = self.probe.get("torch_cuda")
            res = self.run_cmd(install[:4] + ["--dry-run"] + install[4:], timeout=60)
            if not self.check_cmd(s, res, "pip install --dry-run"):
                return
            s.notes.append(f"CUDA build skipped (torch {'CUDA ' + torch_cuda if torch_cuda else 'is a CPU build'}, "
                           f"smoke run); the install command passed as --dry-run")
        else:
            if not self.probe.get("nvcc"):
                s.notes.append("nvcc not found (set CUDA_HOME): installing pure Python, no extension")
            cap = self.probe.get("capability") or [9, 0]
            cores = str(self.probe.get("cores") or os.cpu_count() or 4)
            env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}"),
                   "MAX_JOBS": os.environ.get("MAX_JOBS", cores)}
            s.details["arch"] = env["TORCH_CUDA_ARCH_LIST"]
            res = self.run_cmd(install, env=env)
            if res.cut:
                raise Cut("pip install -e . (extension build) ran past the step's time")
            if res.rc != 0:
                s.notes.append(f"pip install -e . exited {res.rc}; building in place instead")
                res = self.run_cmd(self.python_cmd("setup.py", "build_ext", "--inplace"), env=env)
                if not self.check_cmd(s, res, "setup.py build_ext --inplace"):
                    return
        res = self.run_cmd(self.python_cmd("-c", EXTENSION_CHECK), timeout=60)
        found = [line for line in "\n".join(res.tail).splitlines() if line.startswith("EXT-JSON ")]
        ext = json.loads(found[-1][len("EXT-JSON "):]) if found else {"loaded": False, "why": "extension check failed"}
        s.details["extension"] = ext
        if ext["loaded"]:
            s.notes.append(f"extension loaded ({Path(ext['file']).name})")
        elif self.profile.name == "gpu":
            s.status = "failed"
            s.notes.append(f"extension does not load: {ext['why']}")
        else:
            s.notes.append("extension not loaded, as expected without CUDA")

    # -- tests and benchmarks ---------------------------------------------------------------

    def pytest_step(self, s: StepResult, args: list[str], env: dict[str, str], what: str) -> dict:
        junit = self.tmp / f"{s.name}.xml"
        res = self.run_cmd(self.python_cmd("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args),
                           env=env)
        counts = junit_counts(junit) if junit.exists() else {}
        s.details["pytest"] = counts
        if counts:
            s.notes.append(_count_line(counts))
        if res.cut:
            raise Cut(f"{what} ran past the step's time")
        if res.rc not in (0, 5):  # 5: nothing collected, reported through the counts
            s.status = "failed"
            s.notes.append(f"{what} exited {res.rc}")
            self.say("      last output:\n" + "\n".join("        " + line for line in res.tail[-12:]))
        return counts

    def gpu_tests(self, s: StepResult) -> None:
        self.pytest_step(s, ["-m", "gpu", "tests"], {}, "pytest -m gpu")

    def kernels(self, s: StepResult) -> None:
        s.details["env"] = self.profile.kernels_env
        self.pytest_step(s, ["benchmarks/bench_kernels.py", "--benchmark-only"], self.profile.kernels_env, "bench_kernels")

    def wudi(self, s: StepResult) -> None:
        s.details["env"] = self.profile.wudi_env
        s.notes.append(self.profile.wudi_deselect_why)
        self.pytest_step(s, ["benchmarks/bench_wudi.py", "--benchmark-only", "-k", self.profile.wudi_deselect],
                         self.profile.wudi_env, "bench_wudi")

    def e2e(self, s: StepResult) -> None:
        p = self.profile
        self.wait_checkpoints(s)
        mergekit = None
        if p.name == "gpu":
            if self.probe.get("mergekit_found"):
                res = self.run_cmd(self.python_cmd("-c", MERGEKIT_CHECK), timeout=60)
                if res.rc == 0:
                    mergekit = self.python
                else:
                    s.notes.append(f"mergekit does not import ({_last_error(res.tail)}): {_carry_hint(res.tail)}")
            else:
                s.notes.append("mergekit not installed: beside-runs skipped "
                               "(carry its wheels: bash benchmarks/gpu/make_wheels.sh --mergekit)")
        elif Path(DEFAULT_MERGEKIT_PYTHON).exists():
            mergekit = DEFAULT_MERGEKIT_PYTHON
        else:
            s.notes.append(f"mergekit skipped: no venv at {DEFAULT_MERGEKIT_PYTHON}")
        s.details["mergekit_python"] = mergekit
        repeats = p.e2e_repeats_with_mergekit if mergekit else p.e2e_repeats
        common = ["-m", "benchmarks.e2e.run", "--shape", p.e2e_shape, "--device", p.e2e_device, "--precision", "stored",
                  "--cache", "warm", "--quiet-wait", str(p.e2e_quiet_wait), "--cache-dir", str(self.e2e_cache)]
        # wudi is tritonmerge-only and the slowest case per run: one repeat of it is enough there
        runs = [("ties,task_arithmetic", repeats, mergekit), ("wudi_exact", 1, None)]
        if runs[0][1:] == runs[1][1:]:  # same settings: one invocation saves a runner start-up
            runs = [("ties,task_arithmetic,wudi_exact", 1, None)]
        # several GPUs: the elementwise cases also on 2, 4, 8 ranks (one per GPU; NCCL)
        gpus = int(self.probe.get("gpu_count") or 0) if p.name == "gpu" else 0
        nproc = ",".join(str(n) for n in (1, 2, 4, 8) if n <= gpus) if gpus > 1 else "1"
        s.details["nproc"] = nproc
        if p.name == "gpu" and gpus <= 1:
            s.notes.append("one GPU: the multi-rank e2e rows need a machine with several (the gpu tests ran NCCL on one rank)")
        s.details["runs"] = [{"cases": c, "repeats": r, "mergekit": bool(m)} for c, r, m in runs]
        for cases, reps, mk in runs:
            left = self.step_deadline - time.monotonic()
            ranks = ["--nproc", nproc] if "ties" in cases else []
            res = self.run_cmd(self.python_cmd(*common, "--cases", cases, "--repeats", str(reps), *ranks,
                                               "--mergekit-python", mk or "none", "--timeout", f"{max(5.0, left - 5):.0f}"))
            if not self.check_cmd(s, res, f"e2e {cases}"):
                return

    # -- results ------------------------------------------------------------------------------

    def fresh(self, pattern: str) -> Path | None:
        """The newest results file matching ``pattern`` written during this run."""
        files = [f for f in self.results.glob(pattern) if f.stat().st_mtime >= self.started_wall - 1]
        return max(files, key=lambda f: f.stat().st_mtime) if files else None

    def collect(self) -> tuple[dict[str, Path], list[dict]]:
        files = {kind: self.fresh(pattern) for kind, pattern in
                 [("kernels", "kernels-*.json"), ("wudi", "wudi-*.json"), ("e2e", "e2e_*.json")]}
        files = {k: v for k, v in files.items() if v is not None}
        data = {k: _load(v) for k, v in files.items()}
        return files, targets(self, data)

    def finish(self) -> int:
        slug = self.probe.get("slug") or "unknown-device"
        files, target_rows = self.collect()
        # the committed results folder gets a summary only from a run that got past its checks
        committed = self.profile.name == "gpu"
        kept_in = (self.results if self.steps["preflight"].status == "ok" or not committed
                   else (self.out or REPO / "benchmarks" / ".cache"))
        kept_in.mkdir(parents=True, exist_ok=True)
        summary_path = kept_in / f"gpu-run-{slug}.json"
        wall = self.elapsed()
        summary = {
            "benchmark": "gpu-run",
            "mode": self.profile.name,
            "device": self.probe.get("device_name"),
            "created": self.started_at.isoformat(timespec="seconds"),
            "git": self.probe.get("git"),
            "total_budget_s": self.profile.total_s,
            "wall_s": wall,
            "within_budget": wall <= self.profile.total_s,
            "machine": {k: v for k, v in self.probe.items() if k != "modules"},
            "modules": self.probe.get("modules"),
            "steps": [self.steps[n].to_json() for n in STEP_ORDER],
            "targets": target_rows,
            "files": sorted([p.name for p in files.values()] + [summary_path.name]),
        }
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        # the log is no result to commit: beside the smoke results, or in the git-ignored cache
        keep_log = (self.out or (self.results if self.profile.name == "smoke" else REPO / "benchmarks" / ".cache"))
        keep_log = keep_log / f"gpu-run-{slug}.log"
        print_summary(self, summary, files, summary_path, keep_log)
        self.log_file.close()
        keep_log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.log_path, keep_log)
        if self.out:
            to_copy = [*files.values(), summary_path][: MAX_OUT_FILES - 1]
            for f in to_copy:
                if f.parent.resolve() != self.out.resolve():
                    shutil.copy(f, self.out / f.name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        ok = all(self.steps[n].status in ("ok", "not run") for n in STEP_ORDER)
        return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# targets


def _rows(data: dict | None) -> list[dict]:
    return (data or {}).get("results", [])


def _pick(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def targets(run: Run, data: dict[str, dict]) -> list[dict]:
    """The issue's four targets, each with the measured value and whether it was met (``None``
    in a smoke run: CPU-interpreter times say nothing about a GPU)."""
    evaluate = run.profile.evaluate_targets
    out = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, shown: str, extra: str, step: str) -> None:
        if value is None:
            met, note = (False if evaluate else None), f"not measured (step {step}: {run.steps[step].status})"
        else:
            met, note = (ok if evaluate else None), extra
        out.append({"target": name, "goal": goal, "value": value, "shown": shown if value is not None else "-",
                    "met": met, "note": note if evaluate else f"smoke sizes, not evaluated; {note}"})

    # exact threshold selection vs torch.topk at the largest size
    k = data.get("kernels")
    sizes = (k or {}).get("settings", {}).get("select_sizes", {})
    largest = max(sizes, key=sizes.get) if sizes else run.profile.kernels_env["TRITONMERGE_BENCH_SELECT_SIZES"].split(",")[-1]
    rows = _rows(k)
    sel = {v: _pick(rows, group=f"select-top20%-{largest}", variant=v) for v in ("ours", "topk", "kthvalue", "argsort")}
    t = lambda r: r and r["median_s"]  # noqa: E731
    vs_topk = _ratio(t(sel["topk"]), t(sel["ours"]))
    others = ", ".join(f"{v} {_times(_ratio(t(sel[v]), t(sel['ours'])))}" for v in ("kthvalue", "argsort")
                       if _ratio(t(sel[v]), t(sel["ours"])))
    add(f"exact threshold selection vs torch.topk, {largest or '?'} elements", ">= 10x", vs_topk,
        vs_topk is not None and vs_topk >= 10, _times(vs_topk), others, "kernels")

    # fused TIES / TADrop-TIES vs copy bandwidth
    fused = {w: next((r for r in rows if r["variant"] == "ours" and r["group"].startswith(f"{w}-n")), None)
             for w in ("ties", "tadrop_ties")}
    fractions = [r["copy_fraction"] for r in fused.values() if r]
    worst = min(fractions) if len(fractions) == 2 else None
    ref = {w: next((r for r in rows if r["variant"] == "torch_reference" and r["group"].startswith(f"{w}-n")), None)
           for w in fused}
    detail = ", ".join(f"{w} {_percent(fused[w]['copy_fraction'])} ({_times(_ratio(t(ref[w]), t(fused[w])))} torch ref)"
                       for w in fused if fused[w])
    add("fused TIES and TADrop-TIES (N=8, bf16) vs copy bandwidth", ">= 60 %", worst,
        worst is not None and worst >= 0.6, _percent(worst),
        f"{detail}; copy {k.get('copy_gbps', 0) or 0:.0f} GB/s" if k else detail, "kernels")

    # end-to-end ties and task_arithmetic vs the I/O floor of the same run
    e = data.get("e2e")
    entry = next((r for r in (e or {}).get("runs", []) if r["shape"]["name"] == run.profile.e2e_shape), None)
    since = run.started_at.replace(microsecond=0)
    fresh = [r for r in (entry or {}).get("results", [])
             if r.get("measured_at") and _dt.datetime.fromisoformat(r["measured_at"]) >= since]
    ratios = {r["case"]: r["tritonmerge"].get("floor_ratio") for r in fresh if r.get("tritonmerge")}
    main = [ratios.get(c) for c in ("ties", "task_arithmetic")]
    worst_e2e = max(main) if all(x is not None for x in main) else None
    detail = ", ".join(f"{c} {_times(x)}" for c, x in ratios.items() if x is not None)
    mk = [f"{r['case']} {_times(r['vs_mergekit']['run_speedup'])} mergekit's speed" for r in fresh if r.get("vs_mergekit")]
    add(f"end-to-end ties, task_arithmetic ({run.profile.e2e_shape}, {run.profile.e2e_device}) vs I/O floor",
        "<= 1.5x floor", worst_e2e, worst_e2e is not None and worst_e2e <= 1.5,
        _times(worst_e2e), "; ".join([detail, *mk]), "e2e")

    # WUDI batched solver vs the official loop, same layers, results gated against it
    w = _rows(data.get("wudi"))
    cases = sorted({r["case"] for r in w if r["variant"] == "official_autograd"})
    speedups = {}
    for c in cases:
        official = _pick(w, case=c, variant="official_autograd")
        batched = _pick(w, case=c, variant="torch")
        speedups[c] = _ratio(official and official["seconds_per_layer"], batched and batched["seconds_per_layer"])
    complete = bool(cases) and all(v is not None for v in speedups.values())
    worst_w = min(speedups.values()) if complete else None
    def vs_official(c: str, variant: str) -> str:
        r, official = _pick(w, case=c, variant=variant), _pick(w, case=c, variant="official_autograd")
        return _times(_ratio(official and official["seconds_per_layer"], r and r["seconds_per_layer"]))

    detail = ", ".join(f"{c} {_times(v)}" for c, v in speedups.items())
    others = [f"{c}: " + ", ".join(f"{label} {vs_official(c, v)}" for v, label in (("cuda_ext", "extension"), ("exact", "exact"))
                                  if _pick(w, case=c, variant=v)) for c in cases]
    add("WUDI batched solver vs official loop (same layers, gated)", ">= 10x", worst_w,
        worst_w is not None and worst_w >= 10, _times(worst_w), "; ".join([detail, *others]), "wudi")
    return out


# ------------------------------------------------------------------------------------------------
# summary


def print_summary(run: Run, summary: dict, files: dict[str, Path], summary_path: Path, log_path: Path) -> None:
    p = run.profile
    mode = "GPU sizes" if p.name == "gpu" else "SMOKE: tiny sizes on CPU, times mean nothing"
    lines = ["", "=" * 100,
             f"tritonmerge GPU run ({mode}) on {summary['device'] or 'an unknown device'}: {summary['wall_s']:.0f} s of {p.total_s:.0f} s budget",
             f"{'step':10s} {'status':12s} {'time':>6s} {'allowed':>8s}  notes"]
    for n in STEP_ORDER:
        s = run.steps[n]
        notes = _wrap("; ".join(s.notes), 60, 3) or [""]
        lines.append(f"{n:10s} {s.status:12s} {s.seconds:5.0f}s {s.allowed_s:7.0f}s  {notes[0]}")
        lines.extend(" " * 41 + more for more in notes[1:])
    if run.steps["preflight"].status != "ok":  # what to carry or fix, in full
        lines.append("preflight:")
        lines.extend(f"  - {note}" for note in run.steps["preflight"].notes)
    lines.append("targets:")
    for t in summary["targets"]:
        mark = "NO DATA" if t["value"] is None else {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        lines.append(f"  [{mark:7s}] {t['target']}: {t['shown']} (goal {t['goal']})")
        lines.extend(f"            {more}" for more in _wrap(t["note"], 88, 2))
    shown = ", ".join(sorted(f.name for f in files.values()))
    lines.append(f"results: {summary_path.parent}/ {summary_path.name}" + (f", {shown}" if shown else ""))
    lines.append(f"log: {log_path}" + (f"; results copied to {run.out}" if run.out else ""))
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)
    run.log("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# helpers


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts, the skip reasons and the failing tests of a junit file."""
    root = ET.parse(path).getroot()
    total = failed = skipped = 0
    reasons: collections.Counter[str] = collections.Counter()
    failures = []
    for case in root.iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif (skip := case.find("skipped")) is not None:
            skipped += 1
            reasons[(skip.get("message") or "").strip()[:160]] += 1
    return {"total": total, "passed": total - failed - skipped, "failed": failed, "skipped": skipped,
            "skip_reasons": dict(reasons), "failures": failures}


def _count_line(c: dict) -> str:
    line = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    if c["skip_reasons"]:
        top = sorted(c["skip_reasons"].items(), key=lambda kv: -kv[1])
        line += " (" + "; ".join(f"{n}x {_skip_label(r)}" for r, n in top[:3]) + ")"
    if c["failures"]:
        line += "; failing: " + ", ".join(f.split("::")[-1] for f in c["failures"][:4])
    return line


def _skip_label(reason: str) -> str:
    if "CUDA device" in reason or "torch.cuda.is_available" in reason:
        return "skipped: no CUDA"
    return _clip(reason.replace("Skipped: ", ""), 60)


def _advice(probe: dict, module: str) -> str:
    error = _error(probe, module)
    if module in NOT_CARRIABLE:
        return f"{module} does not import ({error}): needs {NOT_CARRIABLE[module]}"
    names = WHEELS.get(module, module)
    helper = "bash benchmarks/gpu/make_wheels.sh" + ("" if module == "pydantic" else f" {names}")
    return f"missing {module} ({error}): carry a wheel for {names} ({helper}, then name .whl in carry)"


def _error(probe: dict, module: str) -> str:
    return probe.get("modules", {}).get(module, {}).get("error", "not checked")


def _last_error(tail: list[str]) -> str:
    errors = [line for line in tail if "Error" in line]
    return _clip(errors[-1] if errors else (tail[-1] if tail else "no output"), 80)


def _carry_hint(tail: list[str]) -> str:
    found = re.findall(r"No module named '([\w.]+)'", "\n".join(tail))
    if found:
        top = found[-1].split(".")[0]
        return f"carry a wheel for {top} (bash benchmarks/gpu/make_wheels.sh --mergekit {top})"
    return "see the log"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this driver started for ``proc``, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _show(argv: list[str]) -> str:
    return " ".join(a if len(a) < 80 and "\n" not in a else "<script>" for a in argv)


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(text: str, width: int, most: int) -> list[str]:
    """At most ``most`` lines of ``text``; the full text is in the JSON and the log."""
    lines = textwrap.wrap(text, width)
    return lines[: most - 1] + [_clip(" ".join(lines[most - 1:]), width)] if len(lines) > most else lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash benchmarks/gpu/run.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (what CI runs)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the JSON goes (default benchmarks/results/, smoke: benchmarks/.cache/gpu-smoke/)")
    ap.add_argument("--out", type=Path, default=None, help="also copy results and the log here (default: $OUT when set)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds (default 480 at GPU sizes, 118 smoke); every step's share scales with it")
    ap.add_argument("--only", default=None, help=f"comma-separated steps to run (preflight always runs): {','.join(STEP_ORDER)}")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs every step (default: this one)")
    args = ap.parse_args(argv)

    profile = SMOKE if args.smoke else GPU
    if args.budget:
        scale = args.budget / profile.total_s
        profile = dataclasses.replace(profile, total_s=args.budget,
                                      budget_s={k: v * scale for k, v in profile.budget_s.items()},
                                      estimate_s={k: min(v, v * scale) for k, v in profile.estimate_s.items()})
    only = None
    if args.only:
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = only - set(STEP_ORDER)
        if unknown:
            ap.error(f"unknown steps {sorted(unknown)}; steps: {STEP_ORDER}")
    default_results = REPO / "benchmarks" / ("results" if profile.name == "gpu" else ".cache/gpu-smoke")
    results = (args.results or default_results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    if profile.name == "smoke" and args.results is None:
        for stale in [*results.glob("*.json"), *results.glob("*.log")]:  # the folder is the smoke run's own
            stale.unlink()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out:
        out.mkdir(parents=True, exist_ok=True)

    run = Run(profile, results, out, only, args.python)
    run.say(f"tritonmerge GPU run, {profile.name} profile: {profile.total_s:.0f} s budget; results -> {results}"
            + (f"; copies -> {out}" if out else ""))
    try:
        run.step("preflight", run.preflight)
        if run.steps["preflight"].status == "ok":
            run.start_checkpoints()
        run.step("build", run.build, blocked=run.blocked_by_imports("build"))
        run.step("gpu_tests", run.gpu_tests, blocked=run.blocked_by_imports("gpu_tests"))
        run.step("kernels", run.kernels, blocked=run.blocked_by_imports("kernels"))
        run.step("wudi", run.wudi, blocked=run.blocked_by_imports("wudi"))
        run.step("e2e", run.e2e, blocked=run.blocked_by_imports("e2e") or (None if run.background else "no checkpoints"))
    finally:
        run.stop_background()
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
