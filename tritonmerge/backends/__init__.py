"""Which implementation runs a merge: ``cuda`` -> ``triton`` -> ``cpu`` -> ``torch``, per call, with reasons.

The torch reference is always available and is the specification. Fast implementations
register themselves on a method (``MergeMethod.register_impl``) with a ``supports`` function
that returns the reasons it cannot take a call. Selection: the ``backend=`` argument, else
``TRITONMERGE_BACKEND`` (auto | cuda | triton | cpu | torch), else auto. ``cpu`` is the fused C
loops compiled on first use (backends/cpu/kernels.py); ``cuda`` the compiled extension. An explicit request that
cannot be met raises ``BackendUnavailableError`` with every reason; auto walks the priority
list and logs its choice once. Nothing here imports triton or CUDA code at import time.

Before a fast backend (cuda, triton, cpu) is first used on a device it passes a self-check
(self_check.py); one that fails, or whose kernel raises during a merge (``merge_with_fallback``),
is skipped by auto selection with one warning and refused to explicit requests.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Sequence

import torch

from . import self_check
from ..context import TensorContext
from ..errors import BackendUnavailableError, ParameterError, TritonMergeError
from ..registry import Implementation, MergeMethod

log = logging.getLogger("tritonmerge")

BACKENDS = ("cuda", "triton", "cpu", "torch")
PRIORITY = ("cuda", "triton", "cpu", "torch")
_logged: set[tuple[str, str, str]] = set()


def requested_backend(explicit: str | None = None) -> str:
    value = explicit if explicit is not None else os.environ.get("TRITONMERGE_BACKEND", "auto")
    value = value.strip().lower() or "auto"
    if value not in ("auto", *BACKENDS):
        source = "backend=" if explicit is not None else "TRITONMERGE_BACKEND="
        raise ParameterError(f"{source}{value!r} is not a backend; choose auto, {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when Triton can run kernels here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable: {exc}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


@functools.lru_cache(maxsize=None)
def extension_status() -> tuple[Any, str | None]:
    """(module, None) when the compiled extension ``tritonmerge._C`` loads, else (None, reason)."""
    if os.environ.get("TRITONMERGE_DISABLE_EXT") == "1":
        return None, "disabled by TRITONMERGE_DISABLE_EXT=1"
    try:
        from .. import _C  # type: ignore[attr-defined]
    except Exception as exc:
        return None, (
            f"the CUDA extension tritonmerge._C is not built ({exc}); it is built by setup.py "
            "when nvcc and a CUDA build of torch are present"
        )
    return _C, None


def cpu_status(checked: bool = True) -> str | None:
    """None when the fused C loops are compiled and loadable (and, if ``checked``, passed their
    self-check), else why not."""
    if os.environ.get("TRITONMERGE_DISABLE_CPU_KERNELS") == "1":
        return "disabled by TRITONMERGE_DISABLE_CPU_KERNELS=1"
    try:
        from .cpu import kernels as cpu_kernels
    except Exception as exc:  # pragma: no cover - only when the module is broken
        return f"the fused CPU kernels cannot be imported: {exc}"
    why = cpu_kernels.status()
    if why is None and checked:
        why = self_check.failure("cpu", torch.device("cpu"))
    return why


def _checked_device(backend: str, base: torch.Tensor) -> torch.device:
    """The device a backend's self-check is keyed by: the fused C loops run on the host."""
    return torch.device("cpu") if backend == "cpu" else base.device


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
    if backend == "triton" and (why := triton_status()):
        return [why]
    if backend == "cuda" and (why := extension_status()[1]):
        return [why]
    if backend == "cpu" and (why := cpu_status(checked=False)):
        return [why]
    reasons = list(impl.supports(params, base, experts, ctx))
    if not reasons and (why := self_check.failure(backend, _checked_device(backend, base))):
        reasons.append(why)
    return reasons


def auto_candidates(base: torch.Tensor) -> tuple[str, ...]:
    """The backends auto selection tries for ``base``, best first."""
    if base.is_cuda:
        return PRIORITY
    # the Triton interpreter runs CPU tensors only when asked for explicitly
    return tuple(b for b in PRIORITY if b not in ("cuda", "triton"))


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
                self_check.announce(failed, _checked_device(failed, base), f"the {candidate} backend")
            if key not in _logged:
                _logged.add(key)
                log.debug("%s: using the %s backend for %s tensors", method.name, candidate, base.dtype)
            return _torch_impl(method) if candidate == "torch" else method.impls[candidate]
        if self_check.disabled(candidate, _checked_device(candidate, base)):
            failed_checks.append(candidate)
        if key not in _logged and base.is_cuda:
            _logged.add(key)
            log.debug("%s: %s backend not used: %s", method.name, candidate, "; ".join(why))
    raise AssertionError("the torch backend always supports a call")


def kernel_fault(exc: BaseException) -> bool:
    """Whether an exception from a fast implementation says the kernel is broken here (so the
    next backend should redo the call), rather than the input or the machine's memory."""
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError)
    return isinstance(exc, Exception) and not isinstance(exc, (TritonMergeError, *out_of_memory))


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
                _checked_device(impl.backend, base),
                f"{method.name} on tensor {ctx.name!r} ({tuple(base.shape)}, {base.dtype}): {type(exc).__name__}: {exc}",
            )
    raise AssertionError("every fast backend raised and the torch backend was never chosen")


def method_backends(method: MergeMethod) -> dict[str, str | None]:
    """For ``tritonmerge info``: each backend -> None if it could run here, else why not (the
    self-check is reported separately: info never runs it)."""
    out: dict[str, str | None] = {"torch": None}
    status = {"triton": triton_status, "cuda": lambda: extension_status()[1], "cpu": lambda: cpu_status(checked=False)}
    for b in ("cuda", "triton", "cpu"):
        out[b] = "no implementation" if b not in method.impls else status[b]()
    return out
