"""Per-(expert, tensor) distribution statistics of task vectors.

One read of base and experts gives, for every expert i, the moments of τᵢ = expertᵢ − base:
count, Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴ (float64 accumulation). TADrop's densities and LwPTV's
layer scores are computed from these; ``STAT_COLUMNS`` names the columns.
"""

from __future__ import annotations

from typing import Sequence

import torch

STAT_COLUMNS = ("count", "sum", "sum_sq", "sum_abs", "max_abs", "sum_cube", "sum_quad")


def task_vector_stats_reference(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, 7] float64 tensor of the statistics above, on the CPU."""
    b = base.detach().to(torch.float64).flatten()
    rows = []
    for e in experts:
        x = e.detach().to(torch.float64).flatten() - b
        rows.append(
            torch.stack(
                [
                    torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                    x.sum(),
                    (x * x).sum(),
                    x.abs().sum(),
                    x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device),
                    (x**3).sum(),
                    (x**4).sum(),
                ]
            )
        )
    return torch.stack(rows).cpu()


def task_vector_stats(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dispatching entry point: the fused Triton kernel on CUDA tensors, else the reference."""
    from ..backends.triton.merge import task_vector_stats as dispatch

    return dispatch(base, experts)
