"""What each backend can do on this machine, and which one a call asks for: the leaf that the
dispatcher (backends/__init__.py), the self-check and the backend adapters all read, so that
none of them imports the dispatcher."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from ..errors import ParameterError, TritonMergeError

BACKENDS = ("cuda", "triton", "cpu", "torch")
PRIORITY = ("cuda", "triton", "cpu", "torch")


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


def cpu_status() -> str | None:
    """None when the fused C loops are compiled and loadable, else why not (the self-check is
    the dispatcher's business: ``backends.cpu_status``)."""
    if os.environ.get("TRITONMERGE_DISABLE_CPU_KERNELS") == "1":
        return "disabled by TRITONMERGE_DISABLE_CPU_KERNELS=1"
    try:
        from .cpu import kernels as cpu_kernels
    except Exception as exc:  # pragma: no cover - only when the module is broken
        return f"the fused CPU kernels cannot be imported: {exc}"
    return cpu_kernels.status()


def kernel_fault(exc: BaseException) -> bool:
    """Whether an exception from a fast implementation says the kernel is broken here (so the
    next backend should redo the call), rather than the input or the machine's memory."""
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError)
    return isinstance(exc, Exception) and not isinstance(exc, (TritonMergeError, *out_of_memory))


