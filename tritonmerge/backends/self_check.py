"""Self-check of the fast backends (cuda, triton, cpu) on first use, and the record of which are disabled.

No fast kernel has been proven on every machine it may meet, so the first time a process would
use backend B on a device, every kernel of B runs once on a small deterministic input and is
compared with the torch reference under the project's tolerance rule
(``testing.assert_close_budget``). A kernel that fails to compile, raises or disagrees disables B
on that device for the process; auto selection moves on to the next backend and logs one
warning line, an explicit request for B raises ``BackendUnavailableError`` with the reason.

- ``CHECKS`` is the table of checks: backend -> {kernel: check(device)}. The merge kernels are
  reached through the method registry (``MergeMethod.impls``), the table ``backends.choose``
  dispatches through, so a check exercises exactly what a merge would call.
- Results are cached in a JSON file (``cache_path()``: ``$TRITONMERGE_SELF_CHECK_CACHE``, else
  ``self_check.json`` in the folder of the compiled CPU loops), keyed by backend, device name,
  compute capability, driver, torch, triton and tritonmerge versions and a hash of the kernel
  sources: a machine pays for the check once, and editing a kernel runs it again. A cached
  failure disables without running anything.
- A kernel that raises on a real merge (``disable``) is disabled for the process only, not cached.
- ``TRITONMERGE_SELF_CHECK=0`` skips the check (every fast backend counts as passed).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger("tritonmerge")

SWITCH_ENV = "TRITONMERGE_SELF_CHECK"
CACHE_ENV = "TRITONMERGE_SELF_CHECK_CACHE"
CACHE_FORMAT = 1
REPORT_HINT = "please report it on the tritonmerge issue tracker with this line and the output of `tritonmerge info`"
CHECKED_BACKENDS = ("cuda", "triton", "cpu")

KernelCheck = Callable[[torch.device], None]  # raises (AssertionError from the tolerance rule, or the kernel's error)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str | None  # why it failed: "<kernel>: <error>"
    origin: str  # "checked" (this process), "cache" (an earlier process), "run time" (a real call raised)
    when: str = ""


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip() != "0"


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from .cpu.kernels import cache_dir

    return cache_dir() / "self_check.json"


# ---------------------------------------------------------------------------------------------
# the checks


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _method_check(backend: str, method: str, params: dict, *, tied: bool, n_experts: int = 3) -> KernelCheck:
    """The registered ``backend`` implementation of ``method`` against its torch reference in bf16
    (float64 golden); the implementation is looked up when the check runs."""

    def check(device: torch.device) -> None:
        from ..context import TensorContext
        from ..registry import get_method
        from ..testing import assert_close_budget, make_inputs, make_tied_inputs

        spec = get_method(method)
        impl = spec.implementation(backend)
        if impl is None:
            raise LookupError(f"{method} has no {backend} implementation registered")
        p = spec.validate(params)
        factory = make_tied_inputs if tied else make_inputs
        base, experts = factory((16, 8), n_experts, torch.bfloat16, seed=7, device=device)
        ctx = TensorContext(name="self_check.weight")
        out = impl.fn(base, experts, p, ctx).to(torch.bfloat16)
        base_cpu, experts_cpu = base.cpu(), [e.cpu() for e in experts]
        ref_lowp = spec.merge_tensor(base_cpu, experts_cpu, p, ctx).to(torch.bfloat16)
        golden = spec.merge_tensor(base_cpu.double(), [e.double() for e in experts_cpu], p, ctx)
        assert_close_budget(out, golden, ref_lowp, torch.bfloat16, what=f"{backend} {method}")

    return check


def _columns_close(got: torch.Tensor, golden: torch.Tensor, what: str) -> None:
    from ..testing import assert_close_budget

    # per column: each statistic has its own scale. The tied inputs make every sum exact in
    # fp32 whatever the order, so the golden value is also what any fp32 kernel must give.
    for col in range(golden.shape[1]):
        assert_close_budget(got[:, col], golden[:, col], golden[:, col], torch.float32, what=f"{what} column {col}")


def _check_task_stats_triton(device: torch.device) -> None:
    from .triton import stats as kernel
    from ..ops.stats import task_vector_stats_reference
    from ..testing import make_tied_inputs

    base, experts = make_tied_inputs((16, 8), 3, torch.bfloat16, seed=8, device=device)
    got, _ = kernel.task_stats_triton(base, experts)
    golden = task_vector_stats_reference(base.cpu().double(), [e.cpu().double() for e in experts])
    _columns_close(got.cpu(), golden, "triton task_stats")


def _magnitudes(device: torch.device) -> torch.Tensor:
    from ..testing import make_inputs

    base, experts = make_inputs((16, 8), 1, torch.float32, seed=9, device=device)
    return (experts[0] - base).abs()


def _check_select_triton(device: torch.device) -> None:
    from .triton import select as kernel
    from ..ops import select as reference
    from ..testing import assert_close_budget

    m = _magnitudes(device)
    m_cpu = m.cpu()
    for k in (1, 37, m.numel()):
        got = torch.tensor([kernel.kth_largest_triton(m, k)], dtype=torch.float64)
        want = torch.tensor([reference.kth_largest(m_cpu, k)], dtype=torch.float64)
        assert_close_budget(got, want, want, torch.float32, what=f"triton kth_largest k={k}")
    mask = kernel.topk_mask_triton(m, 37).cpu().double()
    want_mask = reference.topk_mask(m_cpu, 37).double()
    assert_close_budget(mask, want_mask, want_mask, torch.float32, what="triton topk_mask k=37")
    halves = [m[:8], m[8:]]
    thresholds = kernel.model_thresholds_triton(lambda: iter([[h, h] for h in halves]), [5, 60])
    want_thr = reference.model_thresholds(lambda: iter([[h.cpu(), h.cpu()] for h in halves]), [5, 60])
    got_t, want_t = torch.tensor(thresholds, dtype=torch.float64), torch.tensor(want_thr, dtype=torch.float64)
    assert_close_budget(got_t, want_t, want_t, torch.float32, what="triton model_thresholds")


def _check_task_stats_cpu(device: torch.device) -> None:
    from .cpu import kernels as cpu_kernels
    from ..ops.stats import task_vector_stats_reference
    from ..testing import make_tied_inputs

    base, experts = make_tied_inputs((16, 8), 3, torch.bfloat16, seed=8)
    golden = task_vector_stats_reference(base.double(), [e.double() for e in experts])
    _columns_close(cpu_kernels.tau_stats(base, experts), golden, "cpu task_stats")


def _check_count_nonfinite_cpu(device: torch.device) -> None:
    from .cpu import kernels as cpu_kernels

    x = torch.linspace(-1, 1, 97, dtype=torch.float32)
    x[[3, 50, 96]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = cpu_kernels.count_nonfinite(x.to(dtype))
        if got != 3:
            raise AssertionError(f"cpu count_nonfinite ({dtype}): counted {got} NaN/Inf of 3")


def _check_wudi_adam_step(device: torch.device) -> None:
    from ..ops import wudi_solve
    from ..testing import assert_close_budget

    gen = torch.Generator().manual_seed(10)
    task_vectors = 0.1 * torch.randn(2, 3, 8, 16, generator=gen, dtype=torch.float64)

    from .cuda import adam_step

    def solve(dtype: torch.dtype, step) -> torch.Tensor:
        problem = wudi_solve.precompute(task_vectors.to(device=device, dtype=dtype))
        tau, _, _ = wudi_solve.adam_loop(problem, steps=10, lr=1e-3, adam_step=step, init_loss=False)
        return tau

    out = solve(torch.float32, adam_step)
    assert_close_budget(out, solve(torch.float64, None), solve(torch.float32, None), torch.float32, what="cuda wudi_adam_step")


CHECKS: dict[str, dict[str, KernelCheck]] = {
    "triton": {
        "fused_merge (ties, exact top-k with ties)": _method_check("triton", "ties", {"density": 0.4}, tied=True),
        "fused_merge (breadcrumbs_ties)": _method_check("triton", "breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, tied=False),
        "fused_merge (dare_linear, L1 rescale)": _method_check("triton", "dare_linear", {"density": 0.5, "rescale": "l1"}, tied=False),
        "fused_merge (linear)": _method_check("triton", "linear", {"weight": [0.5, 0.3, 0.2]}, tied=False),
        "task_stats": _check_task_stats_triton,
        "select (kth_largest, topk_mask, model_thresholds)": _check_select_triton,
    },
    "cuda": {
        "wudi_adam_step": _check_wudi_adam_step,
    },
    "cpu": {
        "merge (ties, exact top-k with ties)": _method_check("cpu", "ties", {"density": 0.4}, tied=True),
        "merge (dare_linear, L1 rescale)": _method_check("cpu", "dare_linear", {"density": 0.5, "rescale": "l1"}, tied=False),
        "merge (linear)": _method_check("cpu", "linear", {"weight": [0.5, 0.3, 0.2]}, tied=False),
        "task_stats": _check_task_stats_cpu,
        "count_nonfinite": _check_count_nonfinite_cpu,
    },
}

# files whose edit must re-run a backend's check (with this module: the checks themselves)
_SOURCES = {
    "triton": ("backends/triton/fused_merge.py", "backends/triton/select.py", "backends/triton/stats.py", "backends/triton/merge.py"),
    "cuda": ("ops/wudi_solve.py", "backends/cuda.py"),
    "cpu": ("backends/cpu/merge_cpu.c", "backends/cpu/kernels.py", "backends/cpu/merge.py"),
}


# ---------------------------------------------------------------------------------------------
# what the cache is keyed by


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def _cuda_driver() -> str:
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            return str(getter())
    with contextlib.suppress(Exception):
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return str(version.value)
    return "unknown"


def _interpreting(backend: str, device: torch.device) -> bool:
    return backend == "triton" and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _device_facts(backend: str, device: torch.device) -> dict[str, str]:
    if backend == "cpu":
        from .cpu import kernels as cpu_kernels

        return {"device": _cpu_model(), "capability": platform.machine(), "driver": cpu_kernels.build_info()}
    if _interpreting(backend, device):
        return {"device": "cpu-interpreter", "capability": "interpreter", "driver": "none"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "device": torch.cuda.get_device_name(index),
        "capability": f"sm_{major}{minor}",
        "driver": f"{_cuda_driver()} (CUDA runtime {torch.version.cuda})",
    }


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


_source_hashes: dict[str, str] = {}


def _source_hash(backend: str) -> str:
    if backend not in _source_hashes:
        here = Path(__file__).resolve().parent.parent  # tritonmerge/
        digest = hashlib.sha256()
        paths = [here / "backends" / "self_check.py", *(here / rel for rel in _SOURCES[backend])]
        if backend == "cuda":
            from .status import extension_status

            ext = extension_status()[0]
            if ext is not None and getattr(ext, "__file__", None):
                paths.append(Path(ext.__file__))
        for path in paths:
            digest.update(path.name.encode())
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
        _source_hashes[backend] = digest.hexdigest()[:16]
    return _source_hashes[backend]


def cache_key(backend: str, device: torch.device) -> dict[str, str]:
    """Everything a result depends on; a change in any of these runs the check again."""
    from .. import __version__

    return {
        "backend": backend,
        **_device_facts(backend, device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "tritonmerge": __version__,
        "sources": _source_hash(backend),
    }


def _key_text(key: dict[str, str]) -> str:
    return " | ".join(f"{k}={v}" for k, v in key.items())


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # absent or damaged: check again
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(key: dict[str, str], outcome: Outcome) -> None:
    path = cache_path()
    entries = _read_cache()
    entries[_key_text(key)] = {**key, "passed": outcome.passed, "reason": outcome.reason, "checked": outcome.when}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".self_check-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:  # an unwritable cache costs a re-check next time, nothing more
        log.debug("cannot write the self-check cache %s: %s", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# per process state


_lock = threading.RLock()
_outcomes: dict[tuple, Outcome] = {}
_running: set[tuple] = set()
_announced: set[tuple] = set()


def _slot(backend: str, device: torch.device) -> tuple:
    device = torch.device(device)
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    return backend, device.type, index, _interpreting(backend, device)


def describe_device(backend: str, device: torch.device) -> str:
    device = torch.device(device)
    if _interpreting(backend, device):
        return "cpu-interpreter"
    return str(device) if backend != "cpu" else "cpu"


def reset() -> None:
    """Forget this process's results and warnings (tests)."""
    with _lock:
        _outcomes.clear()
        _running.clear()
        _announced.clear()
        _source_hashes.clear()


def run_checks(backend: str, device: torch.device) -> str | None:
    """Run every check of ``backend`` on ``device`` now; None when all pass, else the first failure."""
    for kernel, check in CHECKS[backend].items():
        try:
            with torch.no_grad():
                check(device)
        except Exception as exc:  # a compile error, a crash or a disagreement: all disable the backend
            return _one_line(f"{kernel}: {type(exc).__name__}: {exc}")
    return None


def failure(backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` may run on ``device`` (checked now if it has not been), else why not.

    Called by every dispatch point just before it would use a fast backend; after the first
    call per (backend, device) it is a dictionary lookup."""
    if backend not in CHECKED_BACKENDS:
        return None
    device = torch.device(device)
    slot = _slot(backend, device)
    outcome = _outcomes.get(slot)
    if not enabled() and (outcome is None or outcome.origin != "run time"):
        return None  # the switch skips the check, not what a real call already showed
    if outcome is None:
        with _lock:
            if slot in _running:  # the check itself calls the dispatching code
                return None
            outcome = _outcomes.get(slot)
            if outcome is None:
                outcome = _check_or_recall(backend, device)
                _outcomes[slot] = outcome
    if outcome.passed:
        return None
    if outcome.origin == "run time":
        return f"disabled on {describe_device(backend, device)} after raising during a merge: {outcome.reason}"
    return f"self-check failed on {describe_device(backend, device)}: {outcome.reason}"


def _check_or_recall(backend: str, device: torch.device) -> Outcome:
    slot = _slot(backend, device)
    _running.add(slot)
    try:
        try:
            key: dict[str, str] | None = cache_key(backend, device)
        except Exception as exc:  # the device facts cannot be read: check, but cache nothing
            log.debug("self-check of %s: no cache key (%s)", backend, exc)
            key = None
        cached = _read_cache().get(_key_text(key)) if key is not None else None
        if cached is not None:
            return Outcome(bool(cached.get("passed")), cached.get("reason"), "cache", str(cached.get("checked", "")))
        log.debug("self-check of the %s backend on %s", backend, describe_device(backend, device))
        reason = run_checks(backend, device)
        outcome = Outcome(reason is None, reason, "checked", datetime.datetime.now().isoformat(timespec="seconds"))
        if key is not None:
            _write_cache(key, outcome)
        return outcome
    finally:
        _running.discard(slot)


def disabled(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` is known to be disabled on ``device`` (never runs a check)."""
    outcome = _outcomes.get(_slot(backend, torch.device(device)))
    return outcome is not None and not outcome.passed and (enabled() or outcome.origin == "run time")


def disable(backend: str, device: torch.device | str, reason: str) -> None:
    """A real call of ``backend`` raised: disable it on ``device`` for the rest of the process."""
    with _lock:
        _outcomes[_slot(backend, torch.device(device))] = Outcome(
            False, _one_line(reason), "run time", datetime.datetime.now().isoformat(timespec="seconds")
        )


def announce(backend: str, device: torch.device | str, continues_on: str) -> None:
    """The one warning line, once per (backend, device) and process, when auto selection skips a
    backend that failed its check (or raised at run time)."""
    device = torch.device(device)
    slot = _slot(backend, device)
    outcome = _outcomes.get(slot)
    if outcome is None or outcome.passed or slot in _announced:
        return
    _announced.add(slot)
    what = "raised during a merge" if outcome.origin == "run time" else "failed its self-check"
    log.warning(
        "the %s backend %s on %s (%s) and is disabled for this process; the merge continues on %s. "
        "This is a bug: %s.",
        backend, what, describe_device(backend, device), outcome.reason, continues_on, REPORT_HINT,
    )


def status_line(backend: str, devices: Sequence[torch.device]) -> str:
    """For ``tritonmerge info``: passed / failed (reason) / not run yet / skipped, per device."""
    if not enabled():
        return f"skipped ({SWITCH_ENV}=0)"
    parts = []
    entries = None
    for device in devices:
        where = describe_device(backend, device)
        outcome = _outcomes.get(_slot(backend, device))
        if outcome is None:
            if entries is None:
                entries = _read_cache()
            try:
                cached = entries.get(_key_text(cache_key(backend, device)))
            except Exception as exc:  # the device facts could not be read
                parts.append(f"{where}: unknown ({_one_line(exc)})")
                continue
            if cached is None:
                parts.append(f"{where}: not run yet (runs on first use)")
                continue
            outcome = Outcome(bool(cached.get("passed")), cached.get("reason"), "cache", str(cached.get("checked", "")))
        since = f", cached {outcome.when}" if outcome.origin == "cache" and outcome.when else ""
        if outcome.passed:
            parts.append(f"{where}: passed{since}")
        elif outcome.origin == "run time":
            parts.append(f"{where}: disabled after raising during a merge: {outcome.reason}")
        else:
            parts.append(f"{where}: failed{since}: {outcome.reason}")
    return "; ".join(parts)
