"""Per-(expert, tensor) distribution statistics of task vectors.

One read of base and experts gives, for every expert i, the moments of τᵢ = expertᵢ − base:
count, Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴ (float64 accumulation). TADrop's densities and LwPTV's
layer scores are computed from these; ``STAT_COLUMNS`` names the columns. This is the torch
reference; ``backends.run_op("task_vector_stats", base, experts)`` picks the fused C loop or the
Triton kernel where they can run.
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


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/Inf: a sum first (non-finite whenever an element is, ~10x
    cheaper than ``isfinite``), the elementwise check only when the sum is not finite (or
    overflowed)."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
