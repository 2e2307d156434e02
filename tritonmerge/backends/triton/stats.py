"""Fused task-vector statistics: moments and a magnitude-bit histogram in one read of base + N experts.

τᵢ = expertᵢ − base is formed in fp32 registers and never written to memory. Per expert the
kernel produces Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴ (count is the element count) and, optionally,
the histogram of bits 30..16 of |τᵢ| as float32 (ops/select.HIGH_BINS bins: the first pass of
the radix select in backends/triton/select.py).

Error behaviour: each block of BLOCK elements is reduced in fp32 (a tree sum, relative error
about log2(BLOCK)·2⁻²⁴ of that block's Σ|term|), and the block results are accumulated in fp64,
so the error does not grow with the tensor size. The histogram is exact (int64 counters).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ...ops.select import HIGH_BINS
from . import specializations as S
from .select import device_context, expert_pointer_table, persistent_grid

# 2048 elements per block: 16-byte vector loads for 2-byte dtypes with 4 warps × 32 threads × 16
# elements; large enough that the per-(block, expert) fp64 bookkeeping is negligible.
BLOCK = 2048
N_PARTIALS = 6  # Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴


@triton.jit
def _task_stats_kernel(
    base_ptr,
    expert_ptrs,  # int64 [N]: data_ptr() of every expert (all of proto_ptr's dtype)
    proto_ptr,  # the first expert: gives the element type of the pointers in expert_ptrs
    partial_ptr,  # fp64 [programs, N, 6], zero-initialised
    hist_ptr,  # int64 [N, HIGH_BINS], zero-initialised (unused without WITH_HIST)
    numel,
    n_experts,
    n_blocks,
    HIST_BINS: tl.constexpr,
    WITH_HIST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per program: a grid-stride walk over blocks; per block, base is read once and every
    expert once. Bytes per element: (N + 1) × input bytes read, nothing written but the per-block
    scalars and (WITH_HIST) one histogram atomic per element and expert."""
    pid = tl.program_id(0).to(tl.int64)
    n_programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, n_blocks, n_programs):
        # int64 only in the per-block scalars: per element the index within the block stays int32,
        # half the registers of int64 offsets (with the histogram those made ptxas spill)
        block_start = blk * BLOCK
        valid = lanes < tl.minimum(numel - block_start, BLOCK).to(tl.int32)
        b = tl.load(base_ptr + block_start + lanes, mask=valid, other=0.0).to(tl.float32)
        for i in range(n_experts):
            e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype) + block_start
            e = tl.load(e_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
            x = tl.where(valid, e - b, 0.0)
            a = tl.abs(x)
            x2 = x * x
            row = partial_ptr + (pid * n_experts + i) * 6
            tl.store(row + 0, tl.load(row + 0) + tl.sum(x, 0).to(tl.float64))
            tl.store(row + 1, tl.load(row + 1) + tl.sum(x2, 0).to(tl.float64))
            tl.store(row + 2, tl.load(row + 2) + tl.sum(a, 0).to(tl.float64))
            tl.store(row + 3, tl.maximum(tl.load(row + 3), tl.max(a, 0).to(tl.float64)))
            tl.store(row + 4, tl.load(row + 4) + tl.sum(x2 * x, 0).to(tl.float64))
            tl.store(row + 5, tl.load(row + 5) + tl.sum(x2 * x2, 0).to(tl.float64))
            if WITH_HIST:
                bins = a.to(tl.int32, bitcast=True) >> 16  # sign bit is 0: bins in [0, HIST_BINS)
                tl.atomic_add(hist_ptr + i * HIST_BINS + bins, tl.full([BLOCK], 1, tl.int64), mask=valid)


TASK_STATS_LAUNCHES = S.LaunchTable(
    _task_stats_kernel,
    scalar_types=dict(numel="i32", n_experts="i32", n_blocks="i32"),
    specializations=S.specializations(
        (dict(HIST_BINS=HIGH_BINS, WITH_HIST=with_hist, BLOCK=BLOCK) for with_hist in (False, True)),
        S.input_dtype_sets(("base", "experts"), S.READ_DTYPES),
        # without a histogram the partials stand in for hist_ptr
        lambda flags, d: dict(base_ptr=d["base"], expert_ptrs=torch.int64, proto_ptr=d["experts"],
                              partial_ptr=torch.float64, hist_ptr=torch.int64 if flags["WITH_HIST"] else torch.float64),
    ),
)


def _contiguous_inputs(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # A non-contiguous view costs one copy here; the kernels index flat memory.
    return base.contiguous(), [e.contiguous() for e in experts]


def task_stats_triton(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, histogram: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Statistics of τᵢ = expertᵢ − base for every expert.

    Returns ``(stats, hist)``: ``stats`` is the [N, 7] float64 CPU tensor of ops/stats.STAT_COLUMNS
    (count, Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴); ``hist`` is None, or with ``histogram=True`` the
    [N, HIGH_BINS] int64 histogram (on the inputs' device) of bits 30..16 of |τᵢ| as float32.
    All experts must share one dtype (fp32, bf16 or fp16); base may differ.
    """
    if not experts:
        raise ValueError("task_stats_triton needs at least one expert")
    base, experts = _contiguous_inputs(base, experts)
    n, numel, device = len(experts), base.numel(), base.device
    hist = torch.zeros((n, HIGH_BINS), dtype=torch.int64, device=device) if histogram else None
    stats = torch.zeros((n, 7), dtype=torch.float64)
    stats[:, 0] = float(numel)
    if numel == 0:
        return stats, hist
    n_blocks = triton.cdiv(numel, BLOCK)
    grid = persistent_grid(n_blocks, device)
    partial = torch.zeros((grid, n, N_PARTIALS), dtype=torch.float64, device=device)
    ptrs = expert_pointer_table(experts)
    with device_context(device):
        TASK_STATS_LAUNCHES.launch(
            (grid,),
            base,
            ptrs,
            experts[0],
            partial,
            hist if hist is not None else partial,
            numel,
            n,
            n_blocks,
            HIST_BINS=HIGH_BINS,
            WITH_HIST=histogram,
            BLOCK=BLOCK,
        )
    totals = partial.sum(0).cpu()
    stats[:, 1:4] = totals[:, 0:3]
    stats[:, 4] = partial[:, :, 3].amax(0).cpu()
    stats[:, 5:7] = totals[:, 4:6]
    return stats, hist
