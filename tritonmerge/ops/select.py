"""Exact top-k selection on magnitudes: thresholds and masks.

Tie rule (everywhere in tritonmerge):
- per tensor (``topk_mask``): exactly k = ⌊density·n⌋ entries are kept (at least 1); among
  entries equal to the k-th largest magnitude, those with the lowest flat index win — the
  same set as a stable descending sort, the deterministic version of mergekit's argsort.
- across a model (``model_thresholds``): every entry with |τ| >= the k-th largest magnitude
  over all tensors is kept, so ties at the threshold are all kept (the TIES paper's rule).

The k-th largest magnitude is found by radix select on the float32 bit pattern: for
non-negative floats, the int32 view orders like the values. Two histogram passes of 16 bits
each give the exact value without sorting.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

HIGH_BINS = 1 << 15  # |x| has a zero sign bit: bits 30..16 select the bin
LOW_BINS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """k = ⌊density·n⌋, at least one element of a non-empty tensor."""
    if numel == 0:
        return 0
    return min(numel, max(1, int(density * numel)))


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.detach().to(torch.float32).contiguous().view(torch.int32).flatten()


def kth_largest(magnitude: torch.Tensor, k: int) -> float:
    """The k-th largest value (1-based) of a non-negative tensor, by radix select."""
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    bits = _bits(magnitude)
    high = torch.bincount(bits >> 16, minlength=HIGH_BINS)
    above = torch.flip(torch.cumsum(torch.flip(high, [0]), 0), [0])  # count with high bin >= b
    b = int(torch.nonzero(above >= k).max())
    remaining = k - (int(above[b + 1]) if b + 1 < HIGH_BINS else 0)
    low = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=LOW_BINS)
    low_above = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0])
    lo = int(torch.nonzero(low_above >= remaining).max())
    return float(torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32))


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the largest magnitude (ties: lowest index first)."""
    flat = magnitude.flatten()
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    need = k - int(mask.sum())
    if need > 0:  # ties at the threshold: the lowest flat indices win
        mask[torch.nonzero(flat == threshold).flatten()[:need]] = True
    return mask.view(magnitude.shape)


def topk_mask_sorted(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The same mask through a stable sort: the literal statement of the tie rule (tests)."""
    flat = magnitude.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices[: max(k, 0)]
    mask[order] = True
    return mask.view(magnitude.shape)


def model_thresholds(
    magnitudes: Callable[[], Iterable[Sequence[torch.Tensor]]],
    keep_counts: Sequence[int],
) -> list[float]:
    """Per expert, the k-th largest magnitude over all of its tensors (exact, two streaming passes).

    ``magnitudes()`` yields, tensor after tensor, one magnitude tensor per expert; it is called
    twice. ``keep_counts[i]`` is expert i's k over the whole model. Returns one threshold per
    expert; entries with |τ| >= threshold are kept.
    """
    n = len(keep_counts)
    high = [torch.zeros(HIGH_BINS, dtype=torch.int64) for _ in range(n)]
    for per_expert in magnitudes():
        for i, m in enumerate(per_expert):
            high[i] += torch.bincount(_bits(m) >> 16, minlength=HIGH_BINS).cpu()
    bins, remaining = [], []
    for i in range(n):
        above = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0])
        total = int(above[0])
        k = keep_counts[i]
        if not 1 <= k <= total:
            raise ValueError(f"expert {i}: keep count {k} out of range for {total} elements")
        b = int(torch.nonzero(above >= k).max())
        bins.append(b)
        remaining.append(k - (int(above[b + 1]) if b + 1 < HIGH_BINS else 0))
    low = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in range(n)]
    for per_expert in magnitudes():
        for i, m in enumerate(per_expert):
            bits = _bits(m)
            low[i] += torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=LOW_BINS).cpu()
    thresholds = []
    for i in range(n):
        low_above = torch.flip(torch.cumsum(torch.flip(low[i], [0]), 0), [0])
        lo = int(torch.nonzero(low_above >= remaining[i]).max())
        thresholds.append(float(torch.tensor([(bins[i] << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return thresholds
