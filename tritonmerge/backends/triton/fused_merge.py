"""The fused task-arithmetic merge: one read of base + N experts, one write of the output.

Per element, in fp32 registers, for every expert i (a dynamic loop over a pointer table — no
stacked copies, no N-sized temporaries):

    τᵢ  = expertᵢ − base                     (0 without loading when active[i] is 0: LwPTV)
    τ̃ᵢ  = τᵢ · keepᵢ                          threshold: |τ| > t or (|τ| == t and j <= cutoff)
                                               [minus the upper top set: breadcrumbs' outliers]
                                               random: u(seed, name, i, j) < densityᵢ (DARE)
    τ̃ᵢ /= densityᵢ  or  τ̃ᵢ *= scaleᵢ          (rescale keep_prob | l1)
    wτᵢ = wᵢ τ̃ᵢ

then the sign election and the disjoint sum/mean without a second pass over the experts: the
positive and negative parts are accumulated separately (each in expert order, so the result
equals the reference's sequential sums), and the elected side is chosen at the end.

    out = base + λ · merged / divisor      (written directly in the output dtype)

The uniform u is ops/rng's counter hash (two rounds of fmix32 in uint32 arithmetic), bit-identical
to the torch reference, so DARE masks match exactly.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ...ops.merge_spec import Divide, Elect, Keep, Rescale
from . import specializations as S
from .select import device_context, expert_pointer_table

# 2048 elements per program and 8 warps: 8 elements (16 bytes of bf16) per thread and load,
# N + 1 independent loads in flight per thread to cover DRAM latency.
BLOCK = 2048
NUM_WARPS = 8
# An explicit register budget for ptxas. Without one, Triton 3.9's ptxas (run with
# --regAllocOptLevel=2) picks 48-80 registers for some specialisations and spills 4-16 bytes;
# with a budget of 128 it allocates 56-116 and spills nothing (tools/aot_report.py, every
# specialisation for sm_80/90/100). 128 still fits two 256-thread programs per SM.
MAX_REGISTERS = 128
L1_BLOCK = 4096

# The mode codes, defined once in ops/merge_spec.py and shared with the C loops. SPARSIFY is the
# kernel's one mask kind per launch: no mask (Keep.ALL), a threshold with an exact tie cutoff
# (Keep.THRESHOLD, which also runs Keep.TOPK after the selection) or the counter hash (Keep.RANDOM).
SPARSIFY_NONE, SPARSIFY_THRESHOLD, SPARSIFY_RANDOM = int(Keep.ALL), int(Keep.THRESHOLD), int(Keep.RANDOM)
ELECT_NONE, ELECT_SUM, ELECT_COUNT = int(Elect.NONE), int(Elect.SUM), int(Elect.COUNT)
DIVIDE_NONE, DIVIDE_WEIGHT, DIVIDE_COUNT, DIVIDE_CONST = (
    int(Divide.NONE), int(Divide.WEIGHT), int(Divide.COUNT), int(Divide.CONSTANT)
)
RESCALE_NONE, RESCALE_DIVIDE, RESCALE_MULTIPLY = int(Rescale.NONE), int(Rescale.DIVIDE), int(Rescale.MULTIPLY)
# the same numbers as the constexprs the kernels compare with (a jit function reads only
# constexpr globals)
_K_THRESHOLD, _K_RANDOM = tl.constexpr(SPARSIFY_THRESHOLD), tl.constexpr(SPARSIFY_RANDOM)
_E_NONE, _E_SUM = tl.constexpr(ELECT_NONE), tl.constexpr(ELECT_SUM)
_D_NONE, _D_WEIGHT, _D_COUNT, _D_CONST = (
    tl.constexpr(DIVIDE_NONE), tl.constexpr(DIVIDE_WEIGHT), tl.constexpr(DIVIDE_COUNT), tl.constexpr(DIVIDE_CONST)
)
_R_DIVIDE, _R_MULTIPLY = tl.constexpr(RESCALE_DIVIDE), tl.constexpr(RESCALE_MULTIPLY)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _uniform(lanes, first_index, key0, key1):
    """ops/rng.hash_indices → float32 uniform in [0, 1) for the int64 element indices
    ``first_index + lanes`` (``lanes``: int32 in [0, BLOCK)).

    The reference's ``lo·G + key0`` and ``hi·C1 + key1`` are computed as ``(lo + key0·G⁻¹)·G`` and
    ``(hi + key1·C1⁻¹)·C1`` (equal modulo 2**32: both multipliers are odd), and ``hi + key1·C1⁻¹`` as
    the high word of ``first_index + (key1·C1⁻¹ << 32) + lanes`` (the carry out of the low word is
    the one of ``first_index + lanes``). Written the reference's way, the per-element ``lo·G``,
    ``hi·C1`` (and lo, hi themselves) do not depend on the expert: the compiler hoists them out of
    the per-expert loop and keeps them live across it, which is what made ptxas spill. This way
    every per-element value depends on the expert's keys, and only ``lanes`` stays live."""
    key0_scaled = key0 * 0x0E8B2F51  # 0x0E8B2F51 · 0x9E3779B1 ≡ 1 (mod 2**32)
    key1_scaled = key1 * 0xA5CB9243  # 0xA5CB9243 · 0x85EBCA6B ≡ 1 (mod 2**32)
    high = (first_index.to(tl.uint64) + (key1_scaled.to(tl.uint64) << 32)) + lanes.to(tl.uint64)
    lo_keyed = (first_index.to(tl.uint32) + key0_scaled) + lanes.to(tl.uint32)
    h = _fmix32(lo_keyed * 0x9E3779B1)
    h = _fmix32(h ^ ((high >> 32).to(tl.uint32) * 0x85EBCA6B))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _last_kept_lane(cutoff, block_start, BLOCK: tl.constexpr):
    """``lanes <= _last_kept_lane(...)`` ⟺ ``block_start + lanes <= cutoff`` for lanes in
    [0, BLOCK): the int64 comparison done once per block, so that the per-element one is int32."""
    return tl.minimum(tl.maximum(cutoff - block_start, -1), BLOCK).to(tl.int32)


@triton.jit
def _round_to_bf16(x):
    """fp32 → nearest-even bf16 value (still fp32), so the final cast is exact everywhere: the
    Triton interpreter's fp32→bf16 cast truncates, the GPU's rounds to nearest even."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _sparsified_task_vector(
    tau, lanes, block_start, i, element_offset,
    thr_lo_ptr, cut_lo_ptr, thr_hi_ptr, cut_hi_ptr, density_ptr, scale_ptr, keys_ptr,
    SPARSIFY: tl.constexpr, HAS_UPPER: tl.constexpr, RESCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """τ̃ᵢ for one block (before the weight) of the elements ``block_start + lanes``."""
    if SPARSIFY == _K_THRESHOLD:
        a = tl.abs(tau)
        t = tl.load(thr_lo_ptr + i)
        keep = (a > t) | ((a == t) & (lanes <= _last_kept_lane(tl.load(cut_lo_ptr + i), block_start, BLOCK)))
        if HAS_UPPER:  # breadcrumbs: the top set of the outliers is removed again
            th = tl.load(thr_hi_ptr + i)
            outlier = (a > th) | ((a == th) & (lanes <= _last_kept_lane(tl.load(cut_hi_ptr + i), block_start, BLOCK)))
            keep = keep & ~outlier
        tau = tl.where(keep, tau, 0.0)
    elif SPARSIFY == _K_RANDOM:
        key0 = tl.load(keys_ptr + 2 * i).to(tl.uint32)
        key1 = tl.load(keys_ptr + 2 * i + 1).to(tl.uint32)
        u = _uniform(lanes, block_start + element_offset, key0, key1)
        tau = tl.where(u < tl.load(density_ptr + i), tau, 0.0)
    if RESCALE == _R_DIVIDE:
        tau = tl.math.div_rn(tau, tl.full(tau.shape, 1.0, tl.float32) * tl.load(density_ptr + i))
    elif RESCALE == _R_MULTIPLY:
        tau = tau * tl.load(scale_ptr + i)
    return tau


@triton.jit
def _fused_merge_kernel(
    base_ptr,
    expert_ptrs,  # int64 [N] data_ptr()s, all of proto_ptr's dtype
    proto_ptr,
    out_ptr,
    active_ptr,  # int32 [N]: 0 = this expert's τ is zero here (not loaded)
    weight_ptr,  # fp32 [N]
    thr_lo_ptr, cut_lo_ptr, thr_hi_ptr, cut_hi_ptr,  # fp32/int64 [N]: top-k specs (backends/triton/select)
    density_ptr,  # fp32 [N]: DARE keep probability and keep_prob rescale divisor
    scale_ptr,  # fp32 [N]: l1 rescale factor
    keys_ptr,  # int64 [N, 2]: ops/rng stream keys (uint32 values)
    numel,
    n_experts,
    element_offset,  # flat index of element 0 within the whole tensor (row chunks)
    lam,
    const_divisor,
    HAS_BASE: tl.constexpr,
    SPARSIFY: tl.constexpr,
    HAS_UPPER: tl.constexpr,
    RESCALE: tl.constexpr,
    ELECT: tl.constexpr,
    DIVIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: HAS_BASE × base bytes + Σ over active experts of expert bytes read,
    output bytes written (bf16 TIES with 8 experts: 9 × 2 read + 2 written = 20 bytes)."""
    # int64 only in the per-block scalars (block_start, the pointers); per element the index
    # within the block is int32: half the registers of int64 offsets, held across the expert loop
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    n_valid = tl.minimum(numel - block_start, BLOCK).to(tl.int32)
    valid = lanes < n_valid
    base_ptr += block_start
    out_ptr += block_start
    if HAS_BASE:
        b = tl.load(base_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK], tl.float32)
    total = zero  # election: Σ wτ in expert order (sum) or Σ sign(wτ) (count)
    pos = zero  # Σ of positive wτ / of all wτ without election
    neg = zero  # Σ of negative wτ
    div_pos = zero  # divisor terms of the entries agreeing with +1 / of all entries
    div_neg = zero
    for i in range(n_experts):
        w = tl.load(weight_ptr + i)
        active = tl.load(active_ptr + i) != 0
        e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype) + block_start
        # an inactive expert's lanes are all masked off: no memory traffic for it
        e = tl.load(e_ptr + lanes, mask=lanes < tl.where(active, n_valid, 0), other=0.0).to(tl.float32)
        if HAS_BASE:
            tau = tl.where(active, e - b, 0.0)
        else:
            tau = e
        tau = _sparsified_task_vector(
            tau, lanes, block_start, i, element_offset,
            thr_lo_ptr, cut_lo_ptr, thr_hi_ptr, cut_hi_ptr, density_ptr, scale_ptr, keys_ptr,
            SPARSIFY, HAS_UPPER, RESCALE, BLOCK,
        )
        wt = tau * w
        if ELECT == _E_NONE:
            if HAS_BASE:
                pos += wt
            else:  # linear: one fused multiply-add per expert, as the reference accumulates
                pos = tl.fma(tau, w, pos)
            if DIVIDE == _D_WEIGHT:
                div_pos += w
            elif DIVIDE == _D_COUNT:
                div_pos += (wt != 0).to(tl.float32)
        else:
            if ELECT == _E_SUM:
                total += wt
            else:
                total += tl.where(wt > 0, 1.0, tl.where(wt < 0, -1.0, 0.0))
            pos += tl.where(wt > 0, wt, 0.0)
            neg += tl.where(wt < 0, wt, 0.0)
            if DIVIDE == _D_WEIGHT:
                div_pos += tl.where(wt > 0, w, 0.0)
                div_neg += tl.where(wt < 0, w, 0.0)
            elif DIVIDE == _D_COUNT:
                div_pos += (wt > 0).to(tl.float32)
                div_neg += (wt < 0).to(tl.float32)
    if ELECT == _E_NONE:
        merged = pos
        divisor = div_pos
        if DIVIDE == _D_WEIGHT:
            divisor = tl.where(tl.abs(divisor) < 1e-8, 1.0, divisor)
    else:
        plus = total >= 0  # a zero total elects +1
        merged = tl.where(plus, pos, neg)
        divisor = tl.where(plus, div_pos, div_neg)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    if DIVIDE == _D_CONST:
        merged = tl.math.div_rn(merged, zero + const_divisor)
    elif DIVIDE != _D_NONE:
        merged = tl.math.div_rn(merged, divisor)
    if HAS_BASE:
        merged = b + lam * merged
    if out_ptr.dtype.element_ty == tl.bfloat16:
        merged = _round_to_bf16(merged)
    tl.store(out_ptr + lanes, merged.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_l1_kernel(
    base_ptr, expert_ptrs, proto_ptr, partial_ptr,  # fp32 [N, n_blocks, 2]: Σ|τ|, Σ|τ̃| per block
    thr_lo_ptr, cut_lo_ptr, thr_hi_ptr, cut_hi_ptr, density_ptr, keys_ptr,
    numel, n_experts, n_blocks, element_offset,
    SPARSIFY: tl.constexpr, HAS_UPPER: tl.constexpr, BLOCK: tl.constexpr,
):
    """The L1 norms before and after masking (rescale="l1"), per block, reduced on the host in
    fp64. Bytes per element: (N + 1) × input bytes read."""
    pid = tl.program_id(0).to(tl.int64)
    block_start = pid * BLOCK
    lanes = tl.arange(0, BLOCK)  # int32 per element, as in _fused_merge_kernel
    valid = lanes < tl.minimum(numel - block_start, BLOCK).to(tl.int32)
    b = tl.load(base_ptr + block_start + lanes, mask=valid, other=0.0).to(tl.float32)
    for i in range(n_experts):
        e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype) + block_start
        e = tl.load(e_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
        tau = tl.where(valid, e - b, 0.0)
        kept = _sparsified_task_vector(
            tau, lanes, block_start, i, element_offset,
            thr_lo_ptr, cut_lo_ptr, thr_hi_ptr, cut_hi_ptr, density_ptr, density_ptr, keys_ptr,
            SPARSIFY, HAS_UPPER, 0, BLOCK,
        )
        row = partial_ptr + (i * n_blocks + pid) * 2
        tl.store(row, tl.sum(tl.abs(tau), 0))
        tl.store(row + 1, tl.sum(tl.abs(kept), 0))


# ---------------------------------------------------------------------------------------------
# the specialisations backends/triton/merge dispatches to (checked at every launch, compiled by
# tests/test_aot_compile.py)

# (SPARSIFY, HAS_UPPER): no mask, top-k (magnitude/TIES), top-k minus outliers (breadcrumbs), DARE
_MASKS = ((SPARSIFY_NONE, False), (SPARSIFY_THRESHOLD, False), (SPARSIFY_THRESHOLD, True), (SPARSIFY_RANDOM, False))
# (ELECT, DIVIDE): gta_triton's sum/mean without election, and with either election rule
_COMBINES = (
    (ELECT_NONE, DIVIDE_NONE), (ELECT_NONE, DIVIDE_WEIGHT),
    *((elect, divide) for elect in (ELECT_SUM, ELECT_COUNT) for divide in (DIVIDE_NONE, DIVIDE_WEIGHT, DIVIDE_COUNT)),
)


def _merge_flag_sets():
    for divide in (DIVIDE_NONE, DIVIDE_CONST):  # linear_triton: the experts themselves, Σw-normalised or not
        yield dict(HAS_BASE=False, SPARSIFY=SPARSIFY_NONE, HAS_UPPER=False, RESCALE=RESCALE_NONE,
                   ELECT=ELECT_NONE, DIVIDE=divide, BLOCK=BLOCK)
    for (sparsify, upper), rescale, (elect, divide) in itertools.product(
        _MASKS, (RESCALE_NONE, RESCALE_DIVIDE, RESCALE_MULTIPLY), _COMBINES
    ):
        if sparsify == SPARSIFY_NONE and rescale != RESCALE_NONE:
            continue  # rescaling only follows a mask
        yield dict(HAS_BASE=True, SPARSIFY=sparsify, HAS_UPPER=upper, RESCALE=rescale,
                   ELECT=elect, DIVIDE=divide, BLOCK=BLOCK)


_PER_EXPERT_DTYPES = dict(
    expert_ptrs=torch.int64, active_ptr=torch.int32, weight_ptr=torch.float32, thr_lo_ptr=torch.float32,
    cut_lo_ptr=torch.int64, thr_hi_ptr=torch.float32, cut_hi_ptr=torch.int64, density_ptr=torch.float32,
    keys_ptr=torch.int64,
)
_INPUTS = S.input_dtype_sets(("base", "experts"), S.MERGE_DTYPES)

FUSED_MERGE_LAUNCHES = S.LaunchTable(
    _fused_merge_kernel,
    scalar_types=dict(numel="i32", n_experts="i32", element_offset="i32", lam="fp32", const_divisor="fp32"),
    specializations=S.specializations(
        _merge_flag_sets(),
        _INPUTS,
        # out is written in base's dtype (fused_merge_triton's default; no caller passes out_dtype)
        lambda flags, d: dict(base_ptr=d["base"], proto_ptr=d["experts"], out_ptr=d["base"],
                              scale_ptr=torch.float32, **_PER_EXPERT_DTYPES),
    ),
    options=dict(num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS),
)

MASKED_L1_LAUNCHES = S.LaunchTable(
    _masked_l1_kernel,
    scalar_types=dict(numel="i32", n_experts="i32", n_blocks="i32", element_offset="i32"),
    specializations=S.specializations(
        # rescale="l1" after a mask: every mask but none
        (dict(SPARSIFY=sparsify, HAS_UPPER=upper, BLOCK=L1_BLOCK) for sparsify, upper in _MASKS[1:]),
        _INPUTS,
        lambda flags, d: dict(base_ptr=d["base"], proto_ptr=d["experts"], partial_ptr=torch.float32,
                              **{k: v for k, v in _PER_EXPERT_DTYPES.items() if k not in ("active_ptr", "weight_ptr")}),
    ),
)


def _per_expert(values, dtype, device, n, fill):
    if values is None:
        values = [fill] * n
    return torch.tensor(list(values), dtype=dtype, device=device)


def _arguments(experts, device, n, *, threshold, cutoff, upper_threshold, upper_cutoff, density, keys):
    return (
        _per_expert(threshold, torch.float32, device, n, 0.0),
        _per_expert(cutoff, torch.int64, device, n, 0),
        _per_expert(upper_threshold, torch.float32, device, n, float("inf")),
        _per_expert(upper_cutoff, torch.int64, device, n, -1),
        _per_expert(density, torch.float32, device, n, 1.0),
        torch.tensor(keys if keys is not None else [(0, 0)] * n, dtype=torch.int64, device=device).reshape(n, 2),
    )


def masked_l1_triton(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    sparsify: int,
    threshold=None,
    cutoff=None,
    upper_threshold=None,
    upper_cutoff=None,
    density=None,
    keys=None,
    element_offset: int = 0,
) -> tuple[list[float], list[float]]:
    """Per expert (Σ|τᵢ|, Σ|masked τᵢ|) with the same masks as ``fused_merge_triton``."""
    base, experts = base.contiguous(), [e.contiguous() for e in experts]
    n, numel, device = len(experts), base.numel(), base.device
    n_blocks = triton.cdiv(numel, L1_BLOCK)
    partial = torch.empty((n, n_blocks, 2), dtype=torch.float32, device=device)
    thr, cut, thr_hi, cut_hi, dens, key = _arguments(
        experts, device, n, threshold=threshold, cutoff=cutoff, upper_threshold=upper_threshold,
        upper_cutoff=upper_cutoff, density=density, keys=keys,
    )
    with device_context(device):
        MASKED_L1_LAUNCHES.launch(
            (n_blocks,),
            base, expert_pointer_table(experts), experts[0], partial,
            thr, cut, thr_hi, cut_hi, dens, key,
            numel, n, n_blocks, element_offset,
            SPARSIFY=sparsify, HAS_UPPER=upper_threshold is not None, BLOCK=L1_BLOCK,
        )
    sums = partial.to(torch.float64).sum(1).cpu()
    return sums[:, 0].tolist(), sums[:, 1].tolist()


def fused_merge_triton(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    lam: float = 1.0,
    has_base: bool = True,
    active: Sequence[bool] | None = None,
    sparsify: int = SPARSIFY_NONE,
    threshold: Sequence[float] | None = None,
    cutoff: Sequence[int] | None = None,
    upper_threshold: Sequence[float] | None = None,
    upper_cutoff: Sequence[int] | None = None,
    density: Sequence[float] | None = None,
    keys: Sequence[tuple[int, int]] | None = None,
    element_offset: int = 0,
    rescale: int = RESCALE_NONE,
    scale: Sequence[float] | None = None,
    elect: int = ELECT_NONE,
    divide: int = DIVIDE_NONE,
    const_divisor: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launch the fused merge (see the module docstring). Per-expert lists have N entries.

    ``has_base=False`` merges the experts themselves (linear averaging); then ``base`` only
    gives shape, dtype and device. Threshold specs come from backends/triton/select.topk_spec_triton;
    ``upper_*`` is a second top set removed from the kept one (breadcrumbs). ``keys`` are
    ops/rng.stream_keys per expert. Non-contiguous inputs are copied to contiguous first.
    Returns a contiguous tensor of base's shape in ``out_dtype`` (default: base's dtype)."""
    n, device = len(experts), base.device
    base_c = base.contiguous()
    experts_c = [e.contiguous() for e in experts]
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype, device=device)
    numel = base.numel()
    if numel == 0:
        return out
    thr, cut, thr_hi, cut_hi, dens, key = _arguments(
        experts_c, device, n, threshold=threshold, cutoff=cutoff, upper_threshold=upper_threshold,
        upper_cutoff=upper_cutoff, density=density, keys=keys,
    )
    with device_context(device):
        FUSED_MERGE_LAUNCHES.launch(
            (triton.cdiv(numel, BLOCK),),
            base_c,
            expert_pointer_table(experts_c),
            experts_c[0],
            out,
            _per_expert(None if active is None else [int(a) for a in active], torch.int32, device, n, 1),
            _per_expert(weights, torch.float32, device, n, 1.0),
            thr, cut, thr_hi, cut_hi, dens,
            _per_expert(scale, torch.float32, device, n, 1.0),
            key,
            numel,
            n,
            element_offset,
            float(lam),
            float(const_divisor),
            HAS_BASE=has_base,
            SPARSIFY=sparsify,
            HAS_UPPER=upper_threshold is not None,
            RESCALE=rescale,
            ELECT=elect,
            DIVIDE=divide,
            BLOCK=BLOCK,
        )
    return out
