"""Exact top-k of |τ| by radix select on the float32 bit pattern: histograms, no sort.

For a non-negative float32 the int32 view orders like the value, so the k-th largest |τ| is
found digit by digit: a histogram of bits 30..16 (HIGH_BINS bins) picks the high half, a
histogram of bits 15..0 over the elements in that bin (LOW_BINS bins) picks the low half —
two reads of the inputs, whatever k, and k may differ for every expert (TADrop).

A top-k set is then described per expert by two numbers (``threshold``, ``cutoff``): an entry
at flat index j is kept iff |τ| > threshold, or |τ| == threshold and j <= cutoff. The cutoff
implements ops/select's tie rule (exactly k kept; among entries equal to the k-th largest the
lowest flat indices win) and costs a third, counting-only read only when some but not all of
the tied entries are kept. ``cutoff = KEEP_ALL_TIES`` keeps every tie (the model-scope rule).

Inputs are either (base, experts) — τᵢ formed in registers — or magnitudes directly
(``base=None``). Every kernel reads (N + 1) × input bytes per element (N without a base).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import triton
import triton.language as tl

from ...ops.select import HIGH_BINS, LOW_BINS
from . import specializations as S

# 1024 elements per program: histogram passes are atomic-bound, not load-bound; small blocks
# give the scheduler many programs to hide atomic latency.
HIST_BLOCK = 1024
TIE_BLOCK = 4096
KEEP_ALL_TIES = (1 << 63) - 1
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _radix_histogram_kernel(
    base_ptr,
    expert_ptrs,  # int64 [N] data_ptr()s, all of proto_ptr's dtype
    proto_ptr,
    hist_ptr,  # int64 [N, BINS], accumulated into
    prefix_ptr,  # int32 [N]: the selected high digit per expert (LOW_PASS only)
    numel,
    n_experts,
    HAS_BASE: tl.constexpr,
    LOW_PASS: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """High pass: count bits 30..16 of |τᵢ|. Low pass: count bits 15..0 of the |τᵢ| whose high
    bits equal prefix[i]. Bytes per element: (N + HAS_BASE) × input bytes read; one int64 atomic
    per element and expert (high pass) or per matching element (low pass)."""
    # int64 only in the per-block scalars: per element the index within the block is int32, half
    # the registers of int64 offsets (those were live across the expert loop, and spilled)
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    valid = lanes < tl.minimum(numel - block_start, BLOCK).to(tl.int32)
    if HAS_BASE:
        b = tl.load(base_ptr + block_start + lanes, mask=valid, other=0.0).to(tl.float32)
    ones = tl.full([BLOCK], 1, tl.int64)
    for i in range(n_experts):
        e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype) + block_start
        x = tl.load(e_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
        if HAS_BASE:
            x = x - b
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        row = hist_ptr + i * BINS
        # relaxed: the counts are read only after the kernel ends, and the default (acq_rel) puts a
        # GPU-wide fence before every atomic
        if LOW_PASS:
            prefix = tl.load(prefix_ptr + i)
            hit = valid & ((bits >> 16) == prefix)
            tl.atomic_add(row + (bits & 0xFFFF), ones, mask=hit, sem="relaxed")
        else:
            tl.atomic_add(row + (bits >> 16), ones, mask=valid, sem="relaxed")


@triton.jit
def _tie_count_kernel(
    base_ptr,
    expert_ptrs,
    proto_ptr,
    threshold_ptr,  # fp32 [N]
    counts_ptr,  # int32 [N, n_blocks]
    numel,
    n_experts,
    n_blocks,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block and expert, the number of entries with |τᵢ| == threshold[i]. Bytes per element:
    (N + HAS_BASE) × input bytes read; 4 bytes written per block and expert."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for i in range(n_experts):
        e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype)
        x = tl.load(e_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_BASE:
            x = x - b
        tie = valid & (tl.abs(x) == tl.load(threshold_ptr + i))
        tl.store(counts_ptr + i * n_blocks + pid, tl.sum(tie.to(tl.int32), 0))


@triton.jit
def _topk_mask_kernel(
    base_ptr,
    expert_ptrs,
    proto_ptr,
    threshold_ptr,  # fp32 [N]
    cutoff_ptr,  # int64 [N]
    mask_ptr,  # bool [N, numel]
    numel,
    n_experts,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The boolean top-k masks. Bytes per element: (N + HAS_BASE) × input bytes read, N written."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mask_row = mask_ptr
    for i in range(n_experts):
        e_ptr = tl.load(expert_ptrs + i).to(proto_ptr.dtype)
        x = tl.load(e_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_BASE:
            x = x - b
        a = tl.abs(x)
        t = tl.load(threshold_ptr + i)
        keep = (a > t) | ((a == t) & (offs <= tl.load(cutoff_ptr + i)))
        tl.store(mask_row + offs, keep, mask=valid)
        mask_row += numel  # pointer arithmetic: i·numel never overflows int32


# ---------------------------------------------------------------------------------------------
# the specialisations the launchers below pass (checked at every launch, compiled by
# tests/test_aot_compile.py). Without a base the launchers pass the first expert in its place.


def _select_inputs(has_base: bool):
    if has_base:
        return S.input_dtype_sets(("base", "experts"), S.READ_DTYPES)
    return S.input_dtype_sets(("experts",), S.READ_DTYPES)


def _select_table(kernel, flag_sets, scalar_types, pointer_dtypes) -> S.LaunchTable:
    specs = []
    for flags in flag_sets:
        specs += S.specializations([flags], _select_inputs(flags["HAS_BASE"]), pointer_dtypes)
    return S.LaunchTable(kernel, scalar_types=scalar_types, specializations=specs)


def _inputs_pointers(d):
    return dict(base_ptr=d.get("base", d["experts"]), expert_ptrs=torch.int64, proto_ptr=d["experts"])


RADIX_HISTOGRAM_LAUNCHES = _select_table(
    _radix_histogram_kernel,
    # the high pass counts into HIGH_BINS bins, the low pass (given the high digit) into LOW_BINS
    [dict(HAS_BASE=has_base, LOW_PASS=low, BINS=LOW_BINS if low else HIGH_BINS, BLOCK=HIST_BLOCK)
     for has_base in (True, False) for low in (False, True)],
    dict(numel="i32", n_experts="i32"),
    # without a prefix the high pass passes the pointer table as a stand-in prefix_ptr
    lambda flags, d: dict(**_inputs_pointers(d), hist_ptr=torch.int64,
                          prefix_ptr=torch.int32 if flags["LOW_PASS"] else torch.int64),
)
TIE_COUNT_LAUNCHES = _select_table(
    _tie_count_kernel,
    [dict(HAS_BASE=has_base, BLOCK=TIE_BLOCK) for has_base in (True, False)],
    dict(numel="i32", n_experts="i32", n_blocks="i32"),
    lambda flags, d: dict(**_inputs_pointers(d), threshold_ptr=torch.float32, counts_ptr=torch.int32),
)
TOPK_MASK_LAUNCHES = _select_table(
    _topk_mask_kernel,
    [dict(HAS_BASE=has_base, BLOCK=HIST_BLOCK) for has_base in (True, False)],
    dict(numel="i32", n_experts="i32"),
    lambda flags, d: dict(**_inputs_pointers(d), threshold_ptr=torch.float32, cutoff_ptr=torch.int64,
                          mask_ptr=torch.bool),
)


# ---------------------------------------------------------------------------------------------
# launch helpers shared by the kernel modules


def device_context(device: torch.device):
    """Launch on the inputs' GPU (Triton uses the current device), nothing for CPU/interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def expert_pointer_table(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 tensor of the experts' data_ptr()s on their device: N inputs without stacking them.
    The kernels cast each entry to the first expert's pointer type, so all share one dtype."""
    dtypes = {e.dtype for e in experts}
    if len(dtypes) != 1:
        raise ValueError(f"all experts must share one dtype, got {sorted(str(d) for d in dtypes)}")
    return torch.tensor([e.data_ptr() for e in experts], dtype=torch.int64, device=experts[0].device)


def persistent_grid(n_blocks: int, device: torch.device) -> int:
    """Programs for a grid-stride kernel: a few waves of the GPU, or few programs on the CPU."""
    if device.type == "cuda":
        return max(1, min(n_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_blocks, 16))


def _flat_inputs(base: torch.Tensor | None, experts: Sequence[torch.Tensor]):
    experts = [e.contiguous().reshape(-1) for e in experts]
    if base is not None:
        base = base.contiguous().reshape(-1)
    return base, experts


# ---------------------------------------------------------------------------------------------
# host side


@dataclass
class TopkSpec:
    """Per expert: keep |τ| > threshold, and |τ| == threshold at flat indices <= cutoff."""

    threshold: list[float]
    cutoff: list[int]
    kept: list[int]  # the number of entries kept (exactly k per expert)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(self.threshold, dtype=torch.float32, device=device),
            torch.tensor(self.cutoff, dtype=torch.int64, device=device),
        )


def _histogram(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    out: torch.Tensor,
    prefix: torch.Tensor | None = None,
) -> None:
    """Accumulate the high (prefix None) or low digit histogram of |τ| into ``out`` [N, bins]."""
    numel = experts[0].numel()
    if numel == 0:
        return
    ptrs = expert_pointer_table(experts)
    with device_context(experts[0].device):
        RADIX_HISTOGRAM_LAUNCHES.launch(
            (triton.cdiv(numel, HIST_BLOCK),),
            base if base is not None else experts[0],
            ptrs,
            experts[0],
            out,
            prefix if prefix is not None else ptrs,
            numel,
            len(experts),
            HAS_BASE=base is not None,
            LOW_PASS=prefix is not None,
            BINS=out.shape[1],
            BLOCK=HIST_BLOCK,
        )


def _digit_at_rank(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the digit d holding the rank-th largest element (1-based), and how many
    elements lie above d. ``hist`` [R, B] int64, ``rank`` [R] int64 with 1 <= rank <= row total."""
    above = hist.flip(1).cumsum(1).flip(1)  # above[:, d] = count with digit >= d
    digit = (above >= rank[:, None]).sum(1) - 1  # above is non-increasing in d
    padded = torch.cat([above, torch.zeros_like(above[:, :1])], 1)
    return digit, padded.gather(1, (digit + 1)[:, None]).squeeze(1)


def radix_select(
    high: torch.Tensor,
    ks: torch.Tensor,
    low_histogram: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-th largest value per row from its high-digit histogram ``high`` [R, HIGH_BINS] and a
    callback computing the low-digit histogram [R, LOW_BINS] for given high digits (int32 [R]).
    Returns (threshold bits int32 [R], count strictly greater [R], count equal [R])."""
    b, above_b = _digit_at_rank(high, ks)
    low = low_histogram(b.to(torch.int32))
    lo, above_lo = _digit_at_rank(low, ks - above_b)
    equal = low.gather(1, lo[:, None]).squeeze(1)
    return ((b << 16) | lo).to(torch.int32), above_b + above_lo, equal


def topk_spec_triton(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    ks: Sequence[int],
    *,
    high_hist: torch.Tensor | None = None,
) -> TopkSpec:
    """Exact top-k of |τᵢ| for every expert i with its own kᵢ (k <= 0 keeps nothing, k >= n keeps
    everything). ``base=None`` takes the experts as magnitudes. ``high_hist`` may pass the
    [N, HIGH_BINS] histogram from backends/triton/stats.task_stats_triton(histogram=True) to skip a read.
    One host synchronisation; a third read of the inputs only where ties at the k-th value are
    split (some kept, some not)."""
    base, experts = _flat_inputs(base, experts)
    numel, device = experts[0].numel(), experts[0].device
    threshold = [float("inf")] * len(experts)
    cutoff = [-1] * len(experts)
    kept = [0] * len(experts)
    chosen = []
    for i, k in enumerate(ks):
        if k >= numel:
            threshold[i], cutoff[i], kept[i] = 0.0, KEEP_ALL_TIES, numel
        elif k > 0:
            chosen.append(i)
    if not chosen:
        return TopkSpec(threshold, cutoff, kept)
    sub = [experts[i] for i in chosen]
    k_sel = torch.tensor([ks[i] for i in chosen], dtype=torch.int64, device=device)
    if high_hist is not None:
        high = high_hist[chosen].to(device=device, dtype=torch.int64)
    else:
        high = torch.zeros((len(sub), HIGH_BINS), dtype=torch.int64, device=device)
        _histogram(base, sub, high)

    def low_histogram(prefix: torch.Tensor) -> torch.Tensor:
        low = torch.zeros((len(sub), LOW_BINS), dtype=torch.int64, device=device)
        _histogram(base, sub, low, prefix)
        return low

    bits, greater, equal = radix_select(high, k_sel, low_histogram)
    values = bits.view(torch.float32).cpu().tolist()
    need = (k_sel - greater).cpu().tolist()
    equal = equal.cpu().tolist()
    split = []
    for j, i in enumerate(chosen):
        threshold[i], kept[i] = values[j], ks[i]
        cutoff[i] = KEEP_ALL_TIES
        if need[j] < equal[j]:
            split.append(j)
    if split:
        for j, cut in zip(split, _tie_cutoffs(base, [sub[j] for j in split], [values[j] for j in split], [need[j] for j in split])):
            cutoff[chosen[j]] = cut
    return TopkSpec(threshold, cutoff, kept)


def _tie_cutoffs(
    base: torch.Tensor | None, experts: Sequence[torch.Tensor], thresholds: Sequence[float], need: Sequence[int]
) -> list[int]:
    """Flat index of the need-th entry (1-based, by index) with |τ| == threshold, per expert."""
    numel, device = experts[0].numel(), experts[0].device
    n_blocks = triton.cdiv(numel, TIE_BLOCK)
    counts = torch.empty((len(experts), n_blocks), dtype=torch.int32, device=device)
    thr = torch.tensor(thresholds, dtype=torch.float32, device=device)
    with device_context(device):
        TIE_COUNT_LAUNCHES.launch(
            (n_blocks,),
            base if base is not None else experts[0],
            expert_pointer_table(experts),
            experts[0],
            thr,
            counts,
            numel,
            len(experts),
            n_blocks,
            HAS_BASE=base is not None,
            BLOCK=TIE_BLOCK,
        )
    cumulative = counts.to(torch.int64).cumsum(1)
    need_t = torch.tensor(need, dtype=torch.int64, device=device)
    block = (cumulative < need_t[:, None]).sum(1)  # the first block whose running count reaches need
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp_min(0)[:, None]).squeeze(1), 0)
    block, before = block.cpu().tolist(), before.cpu().tolist()
    cutoffs = []
    for j, e in enumerate(experts):
        start = block[j] * TIE_BLOCK
        x = e[start : start + TIE_BLOCK].to(torch.float32)
        if base is not None:
            x = x - base[start : start + TIE_BLOCK].to(torch.float32)
        ties = torch.nonzero(x.abs() == thr[j]).flatten()
        cutoffs.append(start + int(ties[need[j] - before[j] - 1]))
    return cutoffs


def topk_masks_triton(base: torch.Tensor | None, experts: Sequence[torch.Tensor], spec: TopkSpec) -> torch.Tensor:
    """[N, *shape] bool masks of a TopkSpec (used where a mask itself is wanted; the fused merge
    applies the spec in registers instead)."""
    shape = experts[0].shape
    base, flat = _flat_inputs(base, experts)
    numel, device = flat[0].numel(), flat[0].device
    masks = torch.empty((len(flat), numel), dtype=torch.bool, device=device)
    if numel:
        thr, cut = spec.tensors(device)
        with device_context(device):
            TOPK_MASK_LAUNCHES.launch(
                (triton.cdiv(numel, HIST_BLOCK),),
                base if base is not None else flat[0],
                expert_pointer_table(flat),
                flat[0],
                thr,
                cut,
                masks,
                numel,
                len(flat),
                HAS_BASE=base is not None,
                BLOCK=HIST_BLOCK,
            )
    return masks.view(len(flat), *shape)


def kth_largest_triton(magnitude: torch.Tensor, k: int) -> float:
    """ops/select.kth_largest on the GPU: the k-th largest value of a non-negative tensor."""
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    flat = magnitude.detach().contiguous().reshape(-1)
    high = torch.zeros((1, HIGH_BINS), dtype=torch.int64, device=flat.device)
    _histogram(None, [flat], high)

    def low_histogram(prefix: torch.Tensor) -> torch.Tensor:
        low = torch.zeros((1, LOW_BINS), dtype=torch.int64, device=flat.device)
        _histogram(None, [flat], low, prefix)
        return low

    bits, _, _ = radix_select(high, torch.tensor([k], device=flat.device), low_histogram)
    return float(bits.view(torch.float32).item())


def topk_mask_triton(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """ops/select.topk_mask on the GPU: exactly k entries, ties to the lowest flat index."""
    spec = topk_spec_triton(None, [magnitude.detach()], [k])
    return topk_masks_triton(None, [magnitude.detach()], spec)[0]


def model_thresholds_triton(
    magnitudes: Callable[[], Iterable[Sequence[torch.Tensor]]],
    keep_counts: Sequence[int],
    *,
    with_base: bool = False,
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """ops/select.model_thresholds with histogram kernels: per expert, the k-th largest magnitude
    over all of its tensors (ties at the threshold are all kept by the caller's ``>=``).

    ``magnitudes()`` is called twice and yields, tensor by tensor, one magnitude tensor per expert;
    with ``with_base=True`` it yields ``(base, experts)`` instead and |expert − base| is formed in
    registers (no magnitude tensor is materialised). ``combine`` as in ops/select (then
    ``device`` says where the counts live when this process's share is empty)."""
    n = len(keep_counts)
    if combine is not None:
        empty = torch.device(device) if device is not None else torch.device("cpu")

        def passes_combined(hist, prefix, bins):
            counts = passes(hist, prefix, bins)
            return combine(counts if counts is not None else torch.zeros((n, bins), dtype=torch.int64, device=empty))
    else:
        passes_combined = None

    def passes(hist: torch.Tensor | None, prefix: torch.Tensor | None, bins: int):
        for item in magnitudes():
            base, experts = item if with_base else (None, item)
            if hist is None:
                hist = torch.zeros((n, bins), dtype=torch.int64, device=experts[0].device)
            b, flat = _flat_inputs(base, experts)
            low_prefix = None if prefix is None else prefix.to(hist.device)
            if len({e.dtype for e in flat}) == 1:
                _histogram(b, flat, hist, low_prefix)
            else:  # the pointer table needs one dtype: one launch per expert
                for i, e in enumerate(flat):
                    _histogram(b, [e], hist[i : i + 1], None if low_prefix is None else low_prefix[i : i + 1])
        return hist

    counted = passes_combined or passes
    high = counted(None, None, HIGH_BINS)
    if high is None:
        raise ValueError("model_thresholds_triton: the model has no tensors")
    totals = high.sum(1).cpu().tolist()
    for i, (k, total) in enumerate(zip(keep_counts, totals)):
        if not 1 <= k <= total:
            raise ValueError(f"expert {i}: keep count {k} out of range for {total} elements")
    ks = torch.tensor(list(keep_counts), dtype=torch.int64, device=high.device)
    bits, _, _ = radix_select(high, ks, lambda prefix: counted(None, prefix, LOW_BINS))
    return bits.view(torch.float32).cpu().tolist()
