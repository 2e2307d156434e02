"""The "cuda" backend: WUDI's Adam step as one fused kernel of the compiled extension
``tritonmerge._C`` (csrc/), after the same cuBLAS GEMM as the torch path.

The extension rounds its scalar arguments as torch's CUDA kernels do (ops/wudi_solve.
kernel_step_scalars), so its iterates are torch's on the same device.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..ops import wudi_solve
from .status import extension_status


def adam_step(tau, exp_avg, exp_avg_sq, P, B, step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """``wudi_solve.AdamStep`` on the extension: gradient 2(P − B) and the Adam update in one pass."""
    ext, why = extension_status()
    if ext is None:
        raise RuntimeError(why)
    ext.wudi_adam_step(
        tau, exp_avg, exp_avg_sq, P, B, *wudi_solve.kernel_step_scalars(step, lr, beta1, beta2, eps),
        torch.cuda.current_stream(tau.device).cuda_stream,
    )


def wudi_solve_cuda(task_vectors: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any):
    """``wudi_solve.wudi_solve_batched`` with the fused Adam step."""
    return wudi_solve.wudi_solve_batched(task_vectors, adam_step=adam_step, **kwargs)


def wudi_solve_reasons(device: torch.device, *args: Any, **kwargs: Any) -> list[str]:
    """Why the fused step cannot take a solve on ``device`` ([] when it can)."""
    if kwargs.get("solver", "adam") not in ("adam", "auto"):
        return [f"solver {kwargs['solver']!r} runs in torch; the CUDA step serves the adam solver only"]
    if device.type != "cuda":
        return [f"the data is on {device}; the CUDA extension takes CUDA tensors"]
    ext = extension_status()[0]
    if ext is not None and not hasattr(ext, "wudi_adam_step"):
        return ["tritonmerge._C has no wudi_adam_step (rebuild the extension)"]
    return []
