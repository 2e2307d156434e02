"""The fused CPU loops (tritonmerge/backends/cpu/merge_cpu.c), compiled on first use and called through ctypes.

Why compiled at run time: most users merge on CPU and plain torch spends ~0.2 s per pass over a
33M-element tensor, while the fused C loop makes one pass for the whole merge. Compiling on first
use needs only a C compiler (no torch headers, no build step at install time), and the result is
cached per user, keyed by the source, the compiler's version and the flags.

- Source: ``tritonmerge/backends/cpu/merge_cpu.c``, shipped inside the package.
- Compiler: ``$TRITONMERGE_CC``, else ``$CC``, else ``cc``/``gcc``/``clang`` on PATH. Flags are
  portable (``-O3 -fopenmp -fPIC -shared -ffp-contract=off``, never ``-march=native``); the hot
  loops carry AVX2/AVX-512 clones chosen at load time, so a cache shared between machines works.
  Without OpenMP the library is built single-threaded (still one fused pass).
- Cache: ``$TRITONMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tritonmerge``, else
  ``~/.cache/tritonmerge``; the .so is written to a temporary name and renamed atomically.
- ``TRITONMERGE_CPU_ISA=baseline`` builds without the AVX2/AVX-512 clones (tests the portable
  loops; results are identical, only slower).
- ``TRITONMERGE_DISABLE_CPU_KERNELS=1`` turns the whole path off (checked in backends.cpu_status).

``status()`` is None when the library loads, else the reason (callers fall back to torch).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...ops.merge_spec import Divide, Elect, Keep, Rescale

MAX_EXPERTS = 16
ABI_VERSION = 4
HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# the mode codes of merge_cpu.c's enums, defined once in ops/merge_spec.py (a test compares them
# with the C source)
KEEP_ALL, KEEP_NONE, KEEP_THRESHOLD, KEEP_TOPK, KEEP_RANDOM = (
    int(Keep.ALL), int(Keep.NONE), int(Keep.THRESHOLD), int(Keep.TOPK), int(Keep.RANDOM)
)
RESCALE_NONE, RESCALE_DIVIDE, RESCALE_MULTIPLY = int(Rescale.NONE), int(Rescale.DIVIDE), int(Rescale.MULTIPLY)
ELECT_NONE, ELECT_SUM, ELECT_COUNT = int(Elect.NONE), int(Elect.SUM), int(Elect.COUNT)
DIV_NONE, DIV_WEIGHT, DIV_COUNT, DIV_CONSTANT = int(Divide.NONE), int(Divide.WEIGHT), int(Divide.COUNT), int(Divide.CONSTANT)

_ERRORS = {-1: "out of memory", -2: "invalid arguments", -3: "k out of range"}
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]


class Args(ctypes.Structure):
    """Mirror of ``tm_args`` in merge_cpu.c (the library checks the size)."""

    _fields_ = [
        ("n_experts", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
        ("numel", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("base", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("base_dtype", ctypes.c_int32),
        ("out_dtype", ctypes.c_int32),
        ("subtract_base", ctypes.c_int32),
        ("add_base", ctypes.c_int32),
        ("election", ctypes.c_int32),
        ("divide", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("divide_constant", ctypes.c_float),
        ("experts", ctypes.c_void_p * MAX_EXPERTS),
        ("expert_dtype", ctypes.c_int32 * MAX_EXPERTS),
        ("keep_mode", ctypes.c_int32 * MAX_EXPERTS),
        ("rescale_mode", ctypes.c_int32 * MAX_EXPERTS),
        ("threshold", ctypes.c_float * MAX_EXPERTS),
        ("keep_prob", ctypes.c_float * MAX_EXPERTS),
        ("rescale_value", ctypes.c_float * MAX_EXPERTS),
        ("weight", ctypes.c_float * MAX_EXPERTS),
        ("key0", ctypes.c_uint32 * MAX_EXPERTS),
        ("key1", ctypes.c_uint32 * MAX_EXPERTS),
        ("need", ctypes.c_int64 * MAX_EXPERTS),
        ("tied", ctypes.c_int64 * MAX_EXPERTS),
        ("seg_ties", ctypes.c_void_p),
        ("n_segments", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("nonfinite", ctypes.c_void_p),
        ("input_nonfinite", ctypes.c_void_p),
    ]


_lock = threading.Lock()
_state: dict[str, object] = {}


def reset() -> None:
    """Forget the loaded library and any failure (tests; after changing TRITONMERGE_CC)."""
    with _lock:
        _state.clear()


def source_path() -> Path | None:
    """The C source: inside the package (installed) or in the repository (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "merge_cpu.c",):
        if candidate.is_file():
            return candidate
    return None


def _compiler() -> str | None:
    for var in ("TRITONMERGE_CC", "CC"):
        value = os.environ.get(var)
        if value:
            return value
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    if os.environ.get("TRITONMERGE_CACHE_DIR"):
        return Path(os.environ["TRITONMERGE_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tritonmerge"


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300)


def _compiler_version(cc: str) -> str:
    try:
        proc = _run([cc, "--version"])
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} cannot be run: {exc}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"C compiler {cc!r} --version failed: {proc.stderr.strip()[:300]}")
    return proc.stdout.strip()


def _build(source: Path, cc: str) -> tuple[Path, str]:
    """Compile (or find in the cache) the shared library; returns (path, build description)."""
    text = source.read_bytes()
    version = _compiler_version(cc)
    variants = [  # best first; each later one drops something a toolchain may lack
        (["-fopenmp"], "OpenMP, AVX2/AVX-512 clones"),
        (["-fopenmp", "-DTM_NO_TARGET_CLONES"], "OpenMP, baseline ISA"),
        (["-DTM_NO_TARGET_CLONES"], "no OpenMP (single thread), baseline ISA"),
    ]
    if os.environ.get("TRITONMERGE_CPU_ISA", "").strip().lower() == "baseline":
        variants = variants[1:]
    directory = cache_dir()
    errors = []
    for extra, description in variants:
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(text + version.encode() + " ".join(flags).encode() + cc.encode()).hexdigest()[:20]
        target = directory / f"merge_cpu-{key}.so"
        if target.is_file():
            return target, description
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"cannot create the kernel cache {directory}: {exc}") from None
        fd, tmp = tempfile.mkstemp(prefix=".merge_cpu-", suffix=".so", dir=directory)
        os.close(fd)
        try:
            proc = _run([cc, *flags, str(source), "-o", tmp, "-lm"])
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders all end with a whole file
                return target, description
            lines = proc.stderr.strip().splitlines()
            first_error = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit status {proc.returncode}")
            errors.append(f"{' '.join(extra) or 'plain'}: {first_error.strip()[:300]}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(extra) or 'plain'}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"compiling {source} with {cc} failed: " + "; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p_args = ctypes.POINTER(Args)
    lib.tm_abi_version.restype = ctypes.c_int
    lib.tm_args_size.restype = ctypes.c_int64
    lib.tm_has_openmp.restype = ctypes.c_int
    lib.tm_hist_high.argtypes = [p_args, ctypes.c_uint32, ctypes.c_void_p]
    lib.tm_hist_low.argtypes = [p_args, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    lib.tm_segment_count.argtypes = [ctypes.c_int64, ctypes.c_int32]
    lib.tm_segment_count.restype = ctypes.c_int32
    lib.tm_topk_select.argtypes = [p_args, ctypes.c_uint32] + [ctypes.c_void_p] * 5 + [ctypes.c_uint32, ctypes.c_void_p]
    lib.tm_merge.argtypes = [p_args]
    lib.tm_abs_sums.argtypes = [p_args, ctypes.c_void_p, ctypes.c_void_p]
    lib.tm_tau_stats.argtypes = [p_args, ctypes.c_void_p]
    lib.tm_tau_stats.restype = ctypes.c_int
    lib.tm_tau_stats_gram.argtypes = [p_args, ctypes.c_void_p, ctypes.c_void_p]
    lib.tm_tau_stats_gram.restype = ctypes.c_int
    lib.tm_sign_agreement.argtypes = [p_args, ctypes.c_void_p, ctypes.c_void_p]
    lib.tm_sign_agreement.restype = ctypes.c_int
    lib.tm_sign_agreement_topk.argtypes = [p_args, ctypes.c_void_p, ctypes.c_uint32] + [ctypes.c_void_p] * 3
    lib.tm_sign_agreement_topk.restype = ctypes.c_int
    lib.tm_sign_counts.argtypes = [p_args, ctypes.c_void_p, ctypes.c_void_p]
    lib.tm_sign_counts.restype = ctypes.c_int
    lib.tm_count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    lib.tm_count_nonfinite.restype = ctypes.c_int64
    lib.tm_xxh64_state_size.restype = ctypes.c_int64
    lib.tm_xxh64_reset.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.tm_xxh64_reset.restype = None
    lib.tm_xxh64_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.tm_xxh64_update.restype = None
    lib.tm_xxh64_digest.argtypes = [ctypes.c_void_p]
    lib.tm_xxh64_digest.restype = ctypes.c_uint64
    for fn in (lib.tm_hist_high, lib.tm_hist_low, lib.tm_topk_select, lib.tm_merge, lib.tm_abs_sums):
        fn.restype = ctypes.c_int


def _load() -> None:
    source = source_path()
    if source is None:
        raise RuntimeError(
            "the C source merge_cpu.c is not installed with the package (expected in tritonmerge/backends/cpu/)"
        )
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set TRITONMERGE_CC or CC, or install gcc)")
    path, description = _build(source, cc)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise RuntimeError(f"cannot load {path}: {exc}") from None
    _declare(lib)
    if lib.tm_abi_version() != ABI_VERSION or lib.tm_args_size() != ctypes.sizeof(Args):
        raise RuntimeError(f"{path} does not match this version of tritonmerge (ABI or argument layout)")
    _state["lib"] = lib
    _state["info"] = f"{path} ({description}; {cc})"


def _ensure() -> None:
    with _lock:
        if "lib" in _state or "error" in _state:
            return
        try:
            _load()
        except Exception as exc:  # any failure becomes a reason; callers fall back to torch
            _state["error"] = f"fused CPU kernels unavailable: {exc}"


def status() -> str | None:
    """None when the fused CPU kernels are compiled and loaded, else why not (never raises)."""
    _ensure()
    return _state.get("error")  # type: ignore[return-value]


def build_info() -> str:
    """The loaded library and how it was built, or the reason it is unavailable."""
    _ensure()
    return str(_state.get("info") or _state.get("error"))


def library() -> ctypes.CDLL:
    why = status()
    if why is not None:
        raise RuntimeError(why)
    return _state["lib"]  # type: ignore[return-value]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"fused CPU kernel {what} failed: {_ERRORS.get(rc, rc)}")


# ---------------------------------------------------------------------------------------------
# Tensor-level wrappers (raw pointers; the caller keeps the tensors alive during the call)


_thread_limit = threading.local()


def default_threads() -> int:
    """Threads of a fused call that does not name its count: torch's intra-op count, or the
    limit set on this thread by ``limit_threads``."""
    return getattr(_thread_limit, "threads", None) or torch.get_num_threads()


def limit_threads(n: int | None) -> None:
    """Fused calls made from this thread use at most ``n`` threads (None: torch's count). For
    helper threads (the engine's reader): an OpenMP team started from a second thread makes the
    runtime throttle the idle spinning of every team while it lives, and BLAS on the compute
    thread, which relies on that spinning between its many short parallel regions, then runs
    1.5× slower (eigh of 2000×2000: 0.53 s alone, 0.83 s beside an idle second team). One
    thread starts no team."""
    _thread_limit.threads = n


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"fused CPU kernels take CPU tensors, got {t.device}")
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"fused CPU kernels take float32/bfloat16/float16, got {t.dtype}")
    return t.contiguous()


def make_args(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor | None],
    *,
    numel: int,
    subtract_base: bool = True,
    offset: int = 0,
    threads: int | None = None,
) -> tuple[Args, list[torch.Tensor]]:
    """An ``Args`` for these tensors (contiguous copies where needed) plus the tensors to keep
    alive. An expert given as None has a zero task vector (KEEP_NONE: it is never read)."""
    if len(experts) > MAX_EXPERTS:
        raise ValueError(f"fused CPU kernels take at most {MAX_EXPERTS} experts, got {len(experts)}")
    a = Args()
    keep_alive: list[torch.Tensor] = []
    a.n_experts = len(experts)
    a.n_threads = threads if threads is not None else default_threads()
    a.numel = numel
    a.offset = offset
    a.subtract_base = int(subtract_base)
    if base is not None:
        b = _flat(base)
        keep_alive.append(b)
        a.base = b.data_ptr()
        a.base_dtype = DTYPE_CODES[b.dtype]
    for i, e in enumerate(experts):
        if e is None:
            a.keep_mode[i] = KEEP_NONE
            continue
        f = _flat(e)
        keep_alive.append(f)
        a.experts[i] = f.data_ptr()
        a.expert_dtype[i] = DTYPE_CODES[f.dtype]
        a.weight[i] = 1.0
    return a, keep_alive


def _mask(n: int) -> int:
    return (1 << n) - 1


def hist_high(base: torch.Tensor, experts: Sequence[torch.Tensor | None], threads: int | None = None) -> torch.Tensor:
    """[n_experts, 32768] int64 histogram of the bits 30..16 of |expertᵢ − base| (float32), one read."""
    a, alive = make_args(base, experts, numel=base.numel(), threads=threads)
    out = torch.empty((len(experts), HIGH_BINS), dtype=torch.int64)
    _check(library().tm_hist_high(ctypes.byref(a), _mask(len(experts)), out.data_ptr()), "hist_high")
    del alive
    return out


def hist_low(
    base: torch.Tensor, experts: Sequence[torch.Tensor | None], bins: Sequence[int], threads: int | None = None
) -> torch.Tensor:
    """[n_experts, 65536] int64 histogram of the low 16 bits of |τᵢ| among entries whose high bits
    equal ``bins[i]``."""
    a, alive = make_args(base, experts, numel=base.numel(), threads=threads)
    b = torch.tensor(list(bins) + [0] * (MAX_EXPERTS - len(bins)), dtype=torch.int32)
    out = torch.empty((len(experts), LOW_BINS), dtype=torch.int64)
    _check(library().tm_hist_low(ctypes.byref(a), _mask(len(experts)), b.data_ptr(), out.data_ptr()), "hist_low")
    del alive
    return out


# How tm_topk_select found each threshold (TM_PATH_* in merge_cpu.c), for tests and profiling:
# "bracket/P" = the sample bracket resolved it after P passes over the data (1 in the common case).
_SELECT_PATHS = {0: "none", 1: "quickselect", 2: "histogram", 3: "histogram-fallback"}


def _select_path(code: int) -> str:
    return f"bracket/{code - 10}" if code > 10 else _SELECT_PATHS.get(code, str(code))


# tm_topk_select flags (tests): skip the bracket; a one-value bracket (misses on continuous data);
# 64-entry candidate buffers (overflows, narrowing passes).
SELECT_NO_SAMPLE, SELECT_NARROW, SELECT_TINY = 1, 2, 4


def topk_select(
    args: Args, which: Sequence[int], k: Sequence[int], *, flags: int = 0
) -> tuple[list[float], list[int], list[int]]:
    """For experts in ``which``: the exact k-th largest |τ| (as ops.select.kth_largest), the number
    of entries strictly greater, and the number equal to it (other entries of the lists are 0).

    Large tensors take a sample bracket and one pass over base + experts (two histogram passes
    for an expert whose bracket fails); small ones a quickselect. ``args._select_paths`` records
    per expert which way was taken (e.g. "bracket/1", "histogram"); ``flags`` (SELECT_*) are for tests.

    Also stores in ``args`` the count of entries equal to the threshold per segment, so that
    ``merge(args)`` keeps the lowest-index ties without another read; ``args`` then refers to a
    buffer owned by ``args._seg_ties`` (keep ``args`` alive until the merge has run)."""
    lib = library()
    n = args.n_experts
    mask = 0
    for i in which:
        mask |= 1 << i
    kk = (ctypes.c_int64 * MAX_EXPERTS)(*[int(k[i]) if (mask >> i) & 1 else 0 for i in range(n)])
    thr = (ctypes.c_float * MAX_EXPERTS)()
    greater = (ctypes.c_int64 * MAX_EXPERTS)()
    tied = (ctypes.c_int64 * MAX_EXPERTS)()
    paths = (ctypes.c_int32 * MAX_EXPERTS)()
    segments = lib.tm_segment_count(args.numel, args.n_threads)
    seg_ties = (ctypes.c_int64 * (segments * max(n, 1)))()
    rc = lib.tm_topk_select(
        ctypes.byref(args), mask, ctypes.addressof(kk), ctypes.addressof(thr), ctypes.addressof(greater),
        ctypes.addressof(tied), ctypes.addressof(seg_ties), flags, ctypes.addressof(paths),
    )
    _check(rc, "topk_select")
    args._seg_ties = seg_ties  # ctypes.Structure instances take extra attributes: keeps the buffer alive
    args._select_paths = [_select_path(int(v)) for v in list(paths)[:n]]
    args.seg_ties = ctypes.addressof(seg_ties)
    args.n_segments = segments
    return list(thr)[:n], list(greater)[:n], list(tied)[:n]


def abs_sums(args: Args) -> tuple[list[float], list[float]]:
    """Per expert Σ|τᵢ| and Σ|τᵢ| over the entries its keep rule keeps (float64)."""
    before = (ctypes.c_double * MAX_EXPERTS)()
    after = (ctypes.c_double * MAX_EXPERTS)()
    _check(library().tm_abs_sums(ctypes.byref(args), ctypes.addressof(before), ctypes.addressof(after)), "abs_sums")
    n = args.n_experts
    return list(before)[:n], list(after)[:n]


class InputAudit:
    """What the fused loops read on one thread while the audit is active (``input_audit``): the
    input buffers they read whole (data pointer -> bytes) and a count that is nonzero whenever
    one of them holds a NaN/Inf. Lets the engine's input check ride on the merge's own read;
    a nonzero count may also come from an overflowed τ, so it only says "look exactly"."""

    def __init__(self) -> None:
        self.read: dict[int, int] = {}
        self.nonfinite = 0

    def covers(self, t: torch.Tensor) -> bool:
        """True when a fused loop read every byte of ``t`` (a CPU tensor) while auditing."""
        nbytes = t.numel() * t.element_size()
        return nbytes == 0 or (t.is_contiguous() and self.read.get(t.data_ptr(), 0) >= nbytes)

    def _add(self, ptr: int | None, nbytes: int) -> None:
        if ptr:
            self.read[ptr] = max(self.read.get(ptr, 0), nbytes)


_audits = threading.local()


def start_audit() -> InputAudit:
    """Begin auditing this thread's fused reads (nests: the previous audit is restored by
    ``stop_audit``)."""
    audit = InputAudit()
    audit._previous = getattr(_audits, "current", None)  # type: ignore[attr-defined]
    _audits.current = audit
    return audit


def stop_audit(audit: InputAudit) -> None:
    if getattr(_audits, "current", None) is audit:
        _audits.current = audit._previous  # type: ignore[attr-defined]


def _itemsize(code: int) -> int:
    return 4 if code == DTYPE_CODES[torch.float32] else 2


def merge(args: Args) -> int:
    """Run the fused merge described by ``args`` (output written through ``args.out``); returns
    the number of NaN/Inf entries it wrote (counted in the same pass, while the data is in L1).
    Under an ``InputAudit`` it also counts NaN/Inf in what it reads, in the same pass."""
    count = ctypes.c_int64(0)
    audit = getattr(_audits, "current", None)
    inputs = ctypes.c_int64(0)
    args.nonfinite = ctypes.addressof(count)
    args.input_nonfinite = ctypes.addressof(inputs) if audit is not None else None
    try:
        _check(library().tm_merge(ctypes.byref(args)), "merge")
    finally:
        args.nonfinite = None
        args.input_nonfinite = None
    if audit is not None:
        if args.subtract_base or args.add_base:
            audit._add(args.base, args.numel * _itemsize(args.base_dtype))
        for i in range(args.n_experts):
            if args.keep_mode[i] != KEEP_NONE:
                audit._add(args.experts[i], args.numel * _itemsize(args.expert_dtype[i]))
        audit.nonfinite += int(inputs.value)
    return int(count.value)


def _audit_stats(base: torch.Tensor, experts: Sequence[torch.Tensor], stats: torch.Tensor) -> None:
    """τ is formed in float64 from finite float32 values without overflow, so Σx² (and every
    column) is finite exactly when base and expert are: the stats double as the input check."""
    audit = getattr(_audits, "current", None)
    if audit is None:
        return
    for t in (base, *experts):
        audit._add(t.data_ptr(), t.numel() * t.element_size())
    audit.nonfinite += int((~torch.isfinite(stats)).any(dim=1).sum())


def tau_stats(base: torch.Tensor, experts: Sequence[torch.Tensor], threads: int | None = None) -> torch.Tensor:
    """[N, 7] float64 statistics of τᵢ = expertᵢ − base (ops/stats.STAT_COLUMNS: count, Σx, Σx²,
    Σ|x|, max|x|, Σx³, Σx⁴), τ formed in float64 as the reference does, in one read of base and
    the experts (at most MAX_EXPERTS). Sums are in a fixed order (8 lanes per 64Ki-element
    chunk, then chunks in order): independent of the thread count, different from torch's only
    in the order of float64 additions."""
    a, alive = make_args(base, experts, numel=base.numel(), threads=threads)
    out = torch.empty((len(experts), 7), dtype=torch.float64)
    _check(library().tm_tau_stats(ctypes.byref(a), out.data_ptr()), "tau_stats")
    _audit_stats(alive[0], alive[1:], out)
    del alive
    return out


def tau_stats_gram(
    base: torch.Tensor, experts: Sequence[torch.Tensor], threads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tau_stats`` (the same bits) and the [N, N] float64 Gram matrix G[i, k] = Σ τᵢ·τₖ, in
    one read of base and the experts (at most MAX_EXPERTS). The Gram sums run in a fixed order
    (8 lanes per chunk, chunks in order): independent of the thread count, different from a
    BLAS product only in the order of float64 additions."""
    a, alive = make_args(base, experts, numel=base.numel(), threads=threads)
    n = len(experts)
    stats = torch.empty((n, 7), dtype=torch.float64)
    gram = torch.empty((n, n), dtype=torch.float64)
    _check(library().tm_tau_stats_gram(ctypes.byref(a), stats.data_ptr(), gram.data_ptr()), "tau_stats_gram")
    _audit_stats(alive[0], alive[1:], stats)
    del alive
    return stats, gram


def _audited(a: Args, call: Callable[[], int], what: str, tensors: Sequence[torch.Tensor]) -> None:
    """Run a fused pass that reads ``tensors`` whole; under an ``InputAudit`` it also counts
    their NaN/Inf entries (tm_args.input_nonfinite), and the audit records them as read."""
    audit = getattr(_audits, "current", None)
    inputs = ctypes.c_int64(0)
    a.input_nonfinite = ctypes.addressof(inputs) if audit is not None else None
    try:
        _check(call(), what)
    finally:
        a.input_nonfinite = None
    if audit is not None and a.numel > 0:
        for t in tensors:
            audit._add(t.data_ptr(), t.numel() * t.element_size())
        audit.nonfinite += int(inputs.value)


def sign_agreement(
    base: torch.Tensor, experts: Sequence[torch.Tensor], k: Sequence[int], threads: int | None = None, *, flags: int = 0
) -> tuple[list[int], list[int]]:
    """(agree, nonzero) per expert: how many of its top-``k[i]`` entries by |τᵢ| (ops.select's
    tie rule) agree in sign with Σₗ≠ᵢ τₗ (float64), and how many entries of τᵢ are non-zero.
    One read of base and experts where the sample bracket resolves every top-k on its pass
    (AVX-512), else a selection read and a counting read; ``sign_agreement.reads`` records which
    (1 or 2) for tests, ``flags`` (SELECT_*) force the second way. Under an ``InputAudit`` the
    read is also the NaN/Inf check of base and experts."""
    n = len(experts)
    numel = base.numel()
    a, alive = make_args(base, experts, numel=numel, threads=threads)
    kk = (ctypes.c_int64 * MAX_EXPERTS)()
    for i in range(n):
        if 0 < k[i] < numel:  # k = 0 keeps nothing: counted as KEEP_ALL for nonzero, agree reported 0
            a.keep_mode[i] = KEEP_TOPK
            kk[i] = int(k[i])
    agree = (ctypes.c_int64 * MAX_EXPERTS)()
    nonzero = (ctypes.c_int64 * MAX_EXPERTS)()
    reads = ctypes.c_int32(0)
    _audited(
        a,
        lambda: library().tm_sign_agreement_topk(
            ctypes.byref(a), ctypes.addressof(kk), flags, ctypes.addressof(agree), ctypes.addressof(nonzero),
            ctypes.addressof(reads),
        ),
        "sign_agreement", (base, *experts),
    )
    sign_agreement.reads = int(reads.value)  # type: ignore[attr-defined]
    del alive
    return [0 if k[i] <= 0 else int(agree[i]) for i in range(n)], list(nonzero)[:n]


def sign_counts(base: torch.Tensor, experts: Sequence[torch.Tensor], threads: int | None = None) -> tuple[list[int], list[int]]:
    """(conflict, agree) per expert: entries where sign(τᵢ) opposes / agrees with sign(Σₗ≠ᵢ τₗ),
    float64, in one read of base and experts. Under an ``InputAudit`` that read is also their
    NaN/Inf check."""
    n = len(experts)
    a, alive = make_args(base, experts, numel=base.numel(), threads=threads)
    conflict = (ctypes.c_int64 * MAX_EXPERTS)()
    agree = (ctypes.c_int64 * MAX_EXPERTS)()
    _audited(a, lambda: library().tm_sign_counts(ctypes.byref(a), ctypes.addressof(conflict), ctypes.addressof(agree)),
             "sign_counts", (base, *experts))
    del alive
    return list(conflict)[:n], list(agree)[:n]


def count_nonfinite(t: torch.Tensor, threads: int | None = None) -> int:
    """Number of NaN/Inf entries of a CPU float32/bfloat16/float16 tensor, in one read (about
    30× faster than ``torch.isfinite(t).all()`` on two cores)."""
    f = _flat(t)
    count = library().tm_count_nonfinite(
        f.data_ptr(), f.numel(), DTYPE_CODES[f.dtype], threads if threads is not None else default_threads()
    )
    if count < 0:
        raise RuntimeError("fused CPU kernel count_nonfinite failed: invalid arguments")
    return int(count)


class Xxh64:
    """Streaming XXH64 (seed 0) with hashlib's interface (``update``, ``hexdigest``), for the
    output writer's checksums. ``update`` takes any C-contiguous buffer and releases the GIL
    (a ctypes call), so it overlaps the merge on another thread."""

    name = "xxh64"

    def __init__(self, data: Any = None) -> None:
        lib = library()
        self._lib = lib
        self._state = ctypes.create_string_buffer(int(lib.tm_xxh64_state_size()))
        lib.tm_xxh64_reset(self._state, 0)
        if data is not None:
            self.update(data)

    def update(self, data: Any) -> None:
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("Xxh64.update takes a contiguous buffer")
        n = view.nbytes
        if n == 0:
            return
        if view.readonly:  # ctypes can address writable buffers only; bytes are small here
            self._lib.tm_xxh64_update(self._state, ctypes.c_char_p(view.tobytes()), n)
            return
        address = ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B")))
        self._lib.tm_xxh64_update(self._state, address, n)

    def digest(self) -> bytes:
        return int(self._lib.tm_xxh64_digest(self._state)).to_bytes(8, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()
