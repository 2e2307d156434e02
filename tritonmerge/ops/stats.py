"""Per-(expert, tensor) distribution statistics of task vectors.

One read of base and experts gives, for every expert i, the moments of τᵢ = expertᵢ − base:
count, Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴ (float64 accumulation). TADrop's densities and LwPTV's
layer scores are computed from these; ``STAT_COLUMNS`` names the columns. This is the torch
reference; ``backends.run_op("task_vector_stats", base, experts)`` picks the fused C loop or the
Triton kernel where they can run. ``sign_agreement_reference`` is TADrop's cross-task statistic
(``backends.run_op("sign_agreement", ...)``: the fused C loop on the CPU).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .select import keep_count, topk_mask

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


def sign_agreement_reference(
    base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float]
) -> torch.Tensor:
    """Per expert i: the share of τᵢ's top-⌊dᵢ·n⌋ entries by |τᵢ| (``ops.select.topk_mask``'s tie
    rule, as TIES keeps them) whose sign agrees with the sign of Σ_{l≠i} τ_l at the same position
    (a zero sum agrees with nothing). τ in float32 (float64 for float64 inputs), the sums in
    float64 in expert order; [N] float64 on the CPU, NaN for a zero τᵢ or fewer than two experts."""
    n = len(experts)
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    if n < 2:
        return out
    dt = torch.float64 if any(t.dtype == torch.float64 for t in (base, *experts)) else torch.float32
    b = base.detach().to(dt)
    taus = [e.detach().to(dt) - b for e in experts]
    total = torch.zeros(b.shape, dtype=torch.float64, device=b.device)
    for t in taus:
        total += t.to(torch.float64)
    for i, t in enumerate(taus):
        k = keep_count(float(densities[i]), t.numel())
        if k == 0 or not bool((t != 0).any()):
            continue
        top = topk_mask(t.abs(), k)
        mine = t[top].to(torch.float64)
        others = total[top] - mine  # only the selected entries in float64, not a second full copy
        agree = (torch.sign(mine) * torch.sign(others)) > 0
        out[i] = float(agree.to(torch.float64).sum()) / int(top.sum())
    return out


# element chunk of the references that work in float64: a few N × 8 MiB of scratch at a time
CHUNK = 1 << 20


def task_vector_chunks(base: torch.Tensor, experts: Sequence[torch.Tensor]):
    """The task vectors [N, c] in float64, element chunk after element chunk (``CHUNK``)."""
    b = base.detach().reshape(-1)
    flat = [e.detach().reshape(-1) for e in experts]
    for start in range(0, b.numel(), CHUNK):
        stop = min(start + CHUNK, b.numel())
        bb = b[start:stop].to(torch.float64)
        yield torch.stack([f[start:stop].to(torch.float64) - bb for f in flat])


def sign_counts_reference(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N, 2] float64 on the CPU: per expert t, the entries where sign(τ_t) opposes
    sign(Σ_{k≠t} τ_k), and those where the two agree (a zero on either side is neither). τ in
    float64, Σ_k τ_k summed in expert order, the others' sum = Σ_k τ_k − τ_t; element chunks of
    ``CHUNK``, so the scratch stays small whatever the tensor's size."""
    n = len(experts)
    out = torch.zeros(n, 2, dtype=torch.float64, device=base.device)
    for x in task_vector_chunks(base, experts):
        total = torch.zeros_like(x[0])
        for row in x:
            total += row
        product = torch.sign(x) * torch.sign(total.unsqueeze(0) - x)
        out[:, 0] += (product < 0).sum(1)
        out[:, 1] += (product > 0).sum(1)
    return out.cpu()
