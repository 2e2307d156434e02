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
SMALL_TENSOR = 1 << 16  # below this a stable sort is cheaper than two histograms of 2**15+ bins


def keep_count(density: float, numel: int) -> int:
    """k = ⌊density·n⌋, at least one element of a non-empty tensor."""
    if numel == 0:
        return 0
    return min(numel, max(1, int(density * numel)))


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.detach().to(torch.float32).contiguous().view(torch.int32).flatten()


def _select_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, counting from the top bin down, and how many
    entries above that bin are already counted."""
    from_top = torch.cumsum(hist.flip(0), 0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, above


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def kth_largest(magnitude: torch.Tensor, k: int) -> float:
    """The k-th largest value (1-based) of a non-negative tensor, by radix select."""
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    bits = _bits(magnitude)
    b, above = _select_bin(torch.bincount(bits >> 16, minlength=HIGH_BINS), k)
    low = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=LOW_BINS)
    lo, _ = _select_bin(low, k - above)
    return _bits_to_float((b << 16) | lo)


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries with the largest magnitude (ties: lowest index first)."""
    flat = magnitude.flatten()
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if n <= SMALL_TENSOR:
        return topk_mask_sorted(magnitude, k)
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
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Per expert, the k-th largest magnitude over all of its tensors (exact, two streaming passes).

    ``magnitudes()`` yields, tensor after tensor, one magnitude tensor per expert; it is called
    twice. ``keep_counts[i]`` is expert i's k over the whole model. Returns one threshold per
    expert; entries with |τ| >= threshold are kept. ``combine`` maps each pass's [N, bins] counts
    to the whole model's where ``magnitudes`` yields one process's share of it (it is called
    once per pass, also when that share is empty).
    """
    n = len(keep_counts)
    combine = combine or (lambda counts: counts)
    high = torch.zeros((n, HIGH_BINS), dtype=torch.int64)
    for per_expert in magnitudes():
        for i, m in enumerate(per_expert):
            high[i] += torch.bincount(_bits(m) >> 16, minlength=HIGH_BINS).cpu()
    high = combine(high)
    bins, remaining = [], []
    for i in range(n):
        total = int(high[i].sum())
        if not 1 <= keep_counts[i] <= total:
            raise ValueError(f"expert {i}: keep count {keep_counts[i]} out of range for {total} elements")
        b, above = _select_bin(high[i], keep_counts[i])
        bins.append(b)
        remaining.append(keep_counts[i] - above)
    low = torch.zeros((n, LOW_BINS), dtype=torch.int64)
    for per_expert in magnitudes():
        for i, m in enumerate(per_expert):
            bits = _bits(m)
            low[i] += torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=LOW_BINS).cpu()
    low = combine(low)
    return [_bits_to_float((bins[i] << 16) | _select_bin(low[i], remaining[i])[0]) for i in range(n)]


def model_thresholds_from_pairs(
    pairs: Callable[[], Iterable[tuple[torch.Tensor, Sequence[torch.Tensor | None]]]],
    keep_counts: Sequence[int],
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """``model_thresholds`` of the task vectors' magnitudes, from ``pairs()`` yielding
    (base, [expertᵢ or None]) tensor after tensor (None: a zero task vector, as an LwPTV-pruned
    layer); the form every backend's implementation takes."""

    def magnitudes():
        for base, experts in pairs():
            b = base.to(torch.float32)
            yield [torch.zeros_like(b) if e is None else (e.to(torch.float32) - b).abs() for e in experts]

    return model_thresholds(magnitudes, keep_counts, combine)
