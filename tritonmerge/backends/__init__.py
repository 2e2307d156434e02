"""Which implementation runs a call: ``cuda`` -> ``triton`` -> ``cpu`` -> ``torch``, with reasons.

One dispatcher for whole methods and for the building blocks the analyses use. The torch
reference is always available and is the specification.

- Methods: fast implementations register on a method (``MergeMethod.register_impl``) with a
  ``supports`` function returning the reasons they cannot take a call; ``choose`` and
  ``merge_with_fallback`` pick one per tensor.
- Building blocks (``OPS``: task-vector statistics, top-k selection, model-wide thresholds,
  the finite check, the WUDI solve): each (op, backend) pair is an entry of the table below
  with its own ``supports``; ``run_op`` picks and runs one.

Selection: the ``backend=`` argument, else ``TRITONMERGE_BACKEND`` (auto | cuda | triton | cpu
| torch), else auto. ``cpu`` is the fused C loops compiled on first use (backends/cpu/);
``triton`` the kernels of backends/triton/; ``cuda`` the compiled extension. An explicit
request that cannot be met raises ``BackendUnavailableError`` with every reason; auto walks the
priority list for the data's device. Before a fast backend is first used on a device it passes
a self-check (self_check.py); one that fails, or whose kernel raises during a call, is skipped
by auto selection with one warning and refused to explicit requests. ``usage()`` says which
backend ran each op (the merge report records it). Nothing here imports triton or CUDA code at
import time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from . import self_check
from .status import BACKENDS, PRIORITY, extension_status, kernel_fault, requested_backend, triton_status
from .status import cpu_status as _cpu_compiled
from ..context import TensorContext
from ..errors import BackendUnavailableError
from ..ops import select as reference_select
from ..ops import stats as reference_stats
from ..ops import wudi_solve as reference_wudi
from ..registry import Implementation, MergeMethod

__all__ = [
    "BACKENDS", "PRIORITY", "OPS", "choose", "cpu_status", "extension_status", "kernel_fault",
    "dispatch", "merge_with_fallback", "method_backends", "op_backends", "recording", "requested_backend", "run_op",
    "triton_status", "usage",
]

log = logging.getLogger("tritonmerge")
_logged: set[tuple[str, str, str]] = set()


def cpu_status(checked: bool = True) -> str | None:
    """None when the fused C loops are compiled and loadable (and, if ``checked``, passed their
    self-check), else why not."""
    why = _cpu_compiled()
    if why is None and checked:
        why = self_check.failure("cpu", torch.device("cpu"))
    return why


def _backend_status(backend: str) -> str | None:
    """Why ``backend`` cannot run anything on this machine (None: it can)."""
    if backend == "triton":
        return triton_status()
    if backend == "cuda":
        return extension_status()[1]
    if backend == "cpu":
        return cpu_status(checked=False)
    return None


# ---------------------------------------------------------------------------------------------
# building blocks


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of a building block. ``load`` imports it on first use (so
    that nothing here imports a kernel module early); ``supports(device, *args, **kwargs)``
    returns the reasons it cannot take a call."""

    load: Callable[[], Callable[..., Any]]
    supports: Callable[..., list[str]]


def _always(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
    return []


def _needs(device_type: str) -> Callable[..., list[str]]:
    def supports(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
        import os

        if device.type == device_type or (device_type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1"):
            return []
        return [f"the data is on {device}; this implementation takes {device_type} tensors"]

    return supports


def _cpu_op(name: str, dtypes: tuple[torch.dtype, ...] | None = None) -> OpImpl:
    """A building block of backends/cpu/merge.py; ``dtypes``: the only dtypes its tensor
    arguments may have (None: it sends the others to the reference itself)."""

    def load():
        from .cpu import merge

        return getattr(merge, name)

    def supports(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
        reasons = _needs("cpu")(device)
        bad = {a.dtype for a in args if isinstance(a, torch.Tensor)} - set(dtypes or ())
        if dtypes is not None and bad:
            reasons.append(f"the C loop takes {', '.join(map(str, dtypes))}, got {', '.join(map(str, bad))}")
        return reasons

    return OpImpl(load, supports)


def _triton_op(op: str) -> OpImpl:
    """Building block ``op`` of backends/triton/merge.py (``<op>_triton``)."""

    def load():
        from .triton import merge

        return getattr(merge, f"{op}_triton")

    def supports(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
        from .triton import merge

        return _needs("cuda")(device) + merge.op_reasons(op, *args, **kwargs)

    return OpImpl(load, supports)


def _reference(fn: Callable[..., Any]) -> OpImpl:
    return OpImpl(lambda: fn, _always)


def _wudi_cuda() -> OpImpl:
    def load():
        from .cuda import wudi_solve_cuda

        return wudi_solve_cuda

    def supports(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
        from .cuda import wudi_solve_reasons

        return wudi_solve_reasons(device, *args, **kwargs)

    return OpImpl(load, supports)


# op -> backend -> implementation. The torch entries are the references in ops/.
OPS: dict[str, dict[str, OpImpl]] = {
    "task_vector_stats": {
        "triton": _triton_op("task_vector_stats"),
        "cpu": _cpu_op("task_vector_stats_cpu"),
        "torch": _reference(reference_stats.task_vector_stats_reference),
    },
    "sign_agreement": {
        "cpu": _cpu_op("sign_agreement_cpu"),
        "torch": _reference(reference_stats.sign_agreement_reference),
    },
    "sign_counts": {
        "cpu": _cpu_op("sign_counts_cpu"),
        "torch": _reference(reference_stats.sign_counts_reference),
    },
    "kth_largest": {"triton": _triton_op("kth_largest"), "torch": _reference(reference_select.kth_largest)},
    "topk_mask": {"triton": _triton_op("topk_mask"), "torch": _reference(reference_select.topk_mask)},
    "model_thresholds": {
        "triton": _triton_op("model_thresholds"),
        "cpu": _cpu_op("model_thresholds_cpu"),
        "torch": _reference(reference_select.model_thresholds_from_pairs),
    },
    "all_finite": {
        "cpu": _cpu_op("all_finite_cpu", (torch.float32, torch.bfloat16, torch.float16)),
        "torch": _reference(reference_stats.all_finite),
    },
    "wudi_solve": {"cuda": _wudi_cuda(), "torch": _reference(reference_wudi.wudi_solve_batched)},
}

_usage: Counter[tuple[str, str]] = Counter()
_usage_lock = threading.Lock()
_recorders = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
    """``with recording() as ran:`` collects op -> the backends that ran it, for the calls this
    thread makes inside the block (another thread's calls, such as the input checks on the
    prefetch thread, are not part of it)."""
    ran: dict[str, set[str]] = {}
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    stack.append(ran)
    try:
        yield ran
    finally:
        stack.pop()


def usage() -> dict[str, dict[str, int]]:
    """op -> backend -> how many calls it ran, in this process."""
    out: dict[str, dict[str, int]] = {}
    with _usage_lock:
        for (op, backend), n in sorted(_usage.items()):
            out.setdefault(op, {})[backend] = n
    return out


def _op_reasons(op: str, backend: str, device: torch.device, args: tuple, kwargs: dict) -> list[str]:
    impl = OPS[op].get(backend)
    if impl is None:
        return [f"{op} has no {backend} implementation"]
    if why := _backend_status(backend):
        return [why]
    reasons = list(impl.supports(device, *args, **kwargs))
    if not reasons and backend != "torch" and (why := self_check.failure(backend, _self_check_device(backend, device))):
        reasons.append(why)
    return reasons


def _self_check_device(backend: str, device: torch.device) -> torch.device:
    """The device a backend's self-check is keyed by: the fused C loops run on the host."""
    return torch.device("cpu") if backend == "cpu" else device


def _candidates(device: torch.device) -> tuple[str, ...]:
    """The backends auto selection tries for data on ``device``, best first."""
    if device.type == "cuda":
        return PRIORITY
    # the Triton interpreter runs CPU tensors only when asked for explicitly
    return tuple(b for b in PRIORITY if b not in ("cuda", "triton"))


def run_op(op: str, *args: Any, device: torch.device | str | None = None, backend: str | None = None, **kwargs: Any) -> Any:
    """``dispatch``'s result alone."""
    return dispatch(op, *args, device=device, backend=backend, **kwargs)[1]


def dispatch(
    op: str, *args: Any, device: torch.device | str | None = None, backend: str | None = None, **kwargs: Any
) -> tuple[str, Any]:
    """(backend that ran, result): building block ``op`` on the best backend for data on
    ``device`` (default: the device of the first tensor argument). Under auto selection a fast implementation that raises is
    disabled for the process and the call redone on the next backend, except for a call that
    takes part in a collective (``combine`` given): the other processes would wait for it."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if device is None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    device = torch.device(device)
    want = requested_backend(backend)
    if want != "auto":
        why = _op_reasons(op, want, device, args, kwargs)
        if why:
            raise BackendUnavailableError(f"backend {want!r} cannot run {op} on {device}: " + "; ".join(why))
        candidates: tuple[str, ...] = (want,)
    else:
        candidates = _candidates(device)
    for candidate in candidates:
        if want == "auto" and _op_reasons(op, candidate, device, args, kwargs):
            if self_check.disabled(candidate, _self_check_device(candidate, device)):
                self_check.announce(candidate, _self_check_device(candidate, device), "the next backend")
            continue
        fn = OPS[op][candidate].load()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if want != "auto" or candidate == "torch" or not kernel_fault(exc) or kwargs.get("combine") is not None:
                raise
            log.debug("%s backend raised in %s", candidate, op, exc_info=True)
            self_check.disable(candidate, _self_check_device(candidate, device), f"{op}: {type(exc).__name__}: {exc}")
            self_check.announce(candidate, _self_check_device(candidate, device), "the next backend")
            continue
        with _usage_lock:
            _usage[(op, candidate)] += 1
        for ran in getattr(_recorders, "stack", ()):
            ran.setdefault(op, set()).add(candidate)
        return candidate, result
    raise AssertionError(f"{op}: the torch reference always takes a call")


def op_backends() -> dict[str, dict[str, str | None]]:
    """For ``tritonmerge info``: op -> backend -> None if it could run here, else why not."""
    return {op: {b: _backend_status(b) for b in impls} for op, impls in OPS.items()}


# ---------------------------------------------------------------------------------------------
# methods


def _torch_impl(method: MergeMethod) -> Implementation:
    return Implementation("torch", method.merge_tensor, lambda *a: [])


def reasons_against(
    method: MergeMethod, backend: str, params: Any, base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: TensorContext
) -> list[str]:
    if backend == "torch":
        return []
    impl = method.implementation(backend)
    if impl is None:
        return [f"{method.name} has no {backend} implementation"]
    if why := _backend_status(backend):
        return [why]
    reasons = list(impl.supports(params, base, experts, ctx))
    if not reasons and (why := self_check.failure(backend, _self_check_device(backend, base.device))):
        reasons.append(why)
    return reasons


def auto_candidates(base: torch.Tensor) -> tuple[str, ...]:
    """The backends auto selection tries for ``base``, best first."""
    return _candidates(base.device)


def choose(
    method: MergeMethod,
    params: Any,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    ctx: TensorContext,
    backend: str | None = None,
) -> Implementation:
    want = requested_backend(backend)
    if want != "auto":
        why = reasons_against(method, want, params, base, experts, ctx)
        if why:
            raise BackendUnavailableError(
                f"backend {want!r} cannot merge tensor {ctx.name!r} with {method.name} "
                f"({tuple(base.shape)}, {base.dtype}, {base.device}, {len(experts)} experts): " + "; ".join(why)
            )
        return _torch_impl(method) if want == "torch" else method.impls[want]
    failed_checks = []
    for candidate in auto_candidates(base):
        why = reasons_against(method, candidate, params, base, experts, ctx)
        key = (method.name, candidate, str(base.dtype))
        if not why:
            for failed in failed_checks:
                self_check.announce(failed, _self_check_device(failed, base.device), f"the {candidate} backend")
            if key not in _logged:
                _logged.add(key)
                log.debug("%s: using the %s backend for %s tensors", method.name, candidate, base.dtype)
            return _torch_impl(method) if candidate == "torch" else method.impls[candidate]
        if self_check.disabled(candidate, _self_check_device(candidate, base.device)):
            failed_checks.append(candidate)
        if key not in _logged and base.is_cuda:
            _logged.add(key)
            log.debug("%s: %s backend not used: %s", method.name, candidate, "; ".join(why))
    raise AssertionError("the torch backend always supports a call")


def merge_with_fallback(
    method: MergeMethod,
    params: Any,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    ctx: TensorContext,
    backend: str | None = None,
) -> tuple[str, torch.Tensor]:
    """(backend that ran, merged tensor): ``choose`` then run. Under auto selection a fast
    implementation that raises (a compile error on a new shape, a crash) is disabled for the
    process and the call is redone on the next backend; an explicit request re-raises."""
    auto = requested_backend(backend) == "auto"
    for _ in range(len(BACKENDS)):
        impl = choose(method, params, base, experts, ctx, backend)
        try:
            return impl.backend, impl.fn(base, experts, params, ctx)
        except Exception as exc:
            if not auto or impl.backend == "torch" or not kernel_fault(exc):
                raise
            log.debug("%s backend raised on tensor %r", impl.backend, ctx.name, exc_info=True)
            self_check.disable(
                impl.backend,
                _self_check_device(impl.backend, base.device),
                f"{method.name} on tensor {ctx.name!r} ({tuple(base.shape)}, {base.dtype}): {type(exc).__name__}: {exc}",
            )
    raise AssertionError("every fast backend raised and the torch backend was never chosen")


def method_backends(method: MergeMethod) -> dict[str, str | None]:
    """For ``tritonmerge info``: each backend -> None if it could run here, else why not (the
    self-check is reported separately: info never runs it)."""
    out: dict[str, str | None] = {"torch": None}
    for b in ("cuda", "triton", "cpu"):
        out[b] = "no implementation" if b not in method.impls else _backend_status(b)
    return out
