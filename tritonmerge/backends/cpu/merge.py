"""The "cpu" backend: merge specs (ops/merge_spec.py) and the analyses' building blocks on the
fused C loops of backends/cpu/kernels.py.

One tensor costs one read of base + N experts for the merge itself, plus, for exact per-tensor
top-k (``Keep.TOPK``), usually one more read that finds every expert's threshold (a 1/64 sample
brackets it, one pass counts and collects the entries in the bracket, an exact selection among
those finishes; ops/select's tie rule; the two-pass radix select on the float32 bits remains as
the fallback), and for the L1 rescale one more read for the norms. Task vectors are never
materialised and no N-way stack is built. The merge also counts the NaN/Inf it writes
(``known_nonfinite``), and ``task_vector_stats_cpu`` gives ops/stats' per-expert moments in one
read.

Results equal ``merge_by_spec`` bit for bit: same float32 operations in the same order, then
the same rounding to the output dtype. The one exception is the L1 rescale, whose float64 norms
are summed in a different order (the scale factor can differ in its last float32 bit).

Not covered (``merge_cpu_reasons`` says so and the torch reference runs instead): outlier
removal (breadcrumbs), rank-based random keeps (DELLA), more than 16 experts, non-CPU tensors,
float64 tensors.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Sequence

import torch

from .. import self_check
from ...ops.merge_spec import Aggregate, Divide, Elect, Keep, MergeSpec, Rescale
from . import kernels as ck

# id(output tensor) -> (weak reference, tensor version, NaN/Inf entries the fused merge wrote),
# counted in the merge pass itself. Keyed by id (a tensor's == is elementwise, so it cannot be a
# WeakKeyDictionary key); an entry goes when its tensor does.
_NONFINITE: dict[int, tuple[weakref.ref, int, int]] = {}


def known_nonfinite(out: torch.Tensor) -> int | None:
    """The number of NaN/Inf entries of ``out`` if the fused CPU merge produced it (and it was
    not modified since), else None. Lets the engine skip a read of the output for its
    finiteness check: ``n = known_nonfinite(out); ok = n == 0 if n is not None else all_finite(out)``."""
    entry = _NONFINITE.get(id(out))
    if entry is None or entry[0]() is not out or out._version != entry[1]:
        return None
    return entry[2]


def _remember_nonfinite(out: torch.Tensor, count: int) -> None:
    key = id(out)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _NONFINITE.get(key, (None,))[0] is ref:
            del _NONFINITE[key]

    _NONFINITE[key] = (weakref.ref(out, forget), out._version, count)


def _tensor_reasons(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[str]:
    reasons = []
    devices = {t.device.type for t in (base, *experts)}
    if devices != {"cpu"}:
        reasons.append(f"the fused CPU kernels take CPU tensors, got {', '.join(sorted(devices))}")
    dtypes = {t.dtype for t in (base, *experts)} - set(ck.DTYPE_CODES)
    if dtypes:
        reasons.append(f"the fused CPU kernels take float32/bfloat16/float16, got {', '.join(map(str, dtypes))}")
    if len(experts) > ck.MAX_EXPERTS:
        reasons.append(f"the fused CPU kernels take at most {ck.MAX_EXPERTS} experts, got {len(experts)}")
    if (why := ck.status()) is not None:
        reasons.append(why)
    return reasons


# what merge_cpu.c implements; a spec with anything else goes to the torch reference
SUPPORTED_KEEPS = {Keep.ALL, Keep.NONE, Keep.THRESHOLD, Keep.TOPK, Keep.RANDOM}
SUPPORTED_ELECTIONS = {Elect.NONE, Elect.SUM, Elect.COUNT}
SUPPORTED_DIVISORS = {Divide.NONE, Divide.WEIGHT, Divide.COUNT, Divide.CONSTANT}
_WHY_NOT = {Keep.RANKED_RANDOM: " (DELLA's rank-based keep probabilities need a per-row sort)"}


def merge_cpu_reasons(spec: MergeSpec, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[str]:
    """Reasons the fused CPU loops cannot execute ``spec`` on these tensors ([] when they can)."""
    reasons = _tensor_reasons(base, experts)
    for keep in sorted(spec.keeps - SUPPORTED_KEEPS):
        reasons.append(f"keep rule {keep.name} is not implemented in the fused CPU loops" + _WHY_NOT.get(keep, ""))
    if spec.elect not in SUPPORTED_ELECTIONS:
        reasons.append(f"sign election {spec.elect.name} is not implemented in the fused CPU loops")
    if spec.divide not in SUPPORTED_DIVISORS:
        reasons.append(f"divisor {spec.divide.name} is not implemented in the fused CPU loops")
    if spec.aggregate != Aggregate.SUM:
        reasons.append(f"aggregate {spec.aggregate.name} is not implemented in the fused CPU loops")
    if any(rule.keep == Keep.TOPK and rule.outliers for rule in spec.experts):
        reasons.append("removing the largest entries (breadcrumbs) is not implemented in the fused CPU loops")
    return reasons


def merge_cpu(spec: MergeSpec, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``merge_by_spec`` on the fused CPU loops."""
    n, numel = len(experts), base.numel()
    a, alive = ck.make_args(
        base if spec.task_vectors else None,
        [None if rule.keep == Keep.NONE else e for e, rule in zip(experts, spec.experts)],
        numel=numel,
        subtract_base=spec.task_vectors,
        offset=spec.element_offset,
    )
    out = torch.empty(base.shape, dtype=spec.out_dtype or base.dtype)
    a.out = out.data_ptr()
    a.out_dtype = ck.DTYPE_CODES[out.dtype]
    a.add_base = int(spec.task_vectors)
    a.lambda_ = spec.lam
    for i, rule in enumerate(spec.experts):
        a.weight[i] = rule.weight
    a.election = int(spec.elect)
    a.divide = int(spec.divide)
    a.divide_constant = spec.divide_constant
    if numel > 0:
        _set_keep_rules(a, spec, n, numel)
    _remember_nonfinite(out, ck.merge(a) if numel > 0 else 0)
    del alive
    return out


def _set_keep_rules(a: ck.Args, spec: MergeSpec, n: int, numel: int) -> None:
    """Per-expert mask and rescale codes; top-k thresholds and L1 factors measured here."""
    topk: dict[int, int] = {}
    l1 = []
    for i, rule in enumerate(spec.experts):
        if not rule.masked:
            continue
        if rule.keep == Keep.THRESHOLD:
            a.keep_mode[i] = int(Keep.THRESHOLD)
            a.threshold[i] = rule.threshold
        elif rule.keep == Keep.TOPK:
            if rule.k < numel:
                a.keep_mode[i] = int(Keep.TOPK)
                topk[i] = rule.k
        else:
            a.keep_mode[i] = int(Keep.RANDOM)
            a.keep_prob[i] = rule.density
            a.key0[i], a.key1[i] = rule.keys
        if rule.rescale == "keep_prob":
            a.rescale_mode[i] = int(Rescale.DIVIDE)
            a.rescale_value[i] = rule.density
        elif rule.rescale == "l1":
            l1.append(i)
    if topk:
        thr, greater, tied = ck.topk_select(a, list(topk), [topk.get(i, 0) for i in range(n)])
        for i, k in topk.items():
            a.threshold[i] = thr[i]
            a.need[i] = k - greater[i]
            a.tied[i] = tied[i]
    if l1:
        before, after = ck.abs_sums(a)
        for i in l1:
            if before[i] >= 1e-7 and after[i] >= 1e-7:  # mergekit's guard, as merge_spec.kept_task_vector
                a.rescale_mode[i] = int(Rescale.MULTIPLY)
                a.rescale_value[i] = before[i] / after[i]


# (run, supports) for methods/task_arithmetic's registration of every spec executor
EXECUTOR = (merge_cpu, merge_cpu_reasons)


def _tau_bits(base: torch.Tensor, expert: torch.Tensor | None) -> torch.Tensor:
    """int32 bit patterns of |τ| (float32), on the tensors' device; zeros for a pruned expert."""
    if expert is None:
        return torch.zeros(base.numel(), dtype=torch.int32, device=base.device)
    tau = expert.to(torch.float32) - base.to(torch.float32)
    return tau.abs().contiguous().view(torch.int32).flatten()


def _fast(base: torch.Tensor, experts: Sequence[torch.Tensor | None]) -> bool:
    tensors = [base, *(e for e in experts if e is not None)]
    return (
        ck.status() is None
        and self_check.failure("cpu", torch.device("cpu")) is None
        and len(experts) <= ck.MAX_EXPERTS
        and all(t.device.type == "cpu" and t.dtype in ck.DTYPE_CODES for t in tensors)
    )


def model_thresholds_cpu(
    tensors: Callable[[], Iterable[tuple[torch.Tensor, Sequence[torch.Tensor | None]]]],
    keep_counts: Sequence[int],
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """ops.select.model_thresholds for TIES ``topk_scope="model"``, from (base, experts) pairs:
    per expert the keep_counts[i]-th largest |τᵢ| over every tensor (entries >= it are kept).

    ``tensors()`` yields (base, [expertᵢ or None]) tensor after tensor and is called twice; None
    is a zero task vector (an LwPTV-pruned layer, counted as zeros like the reference). Each
    pass reads base and experts once through the fused histograms (torch bincount for tensors
    the C loops do not take); τ is never materialised. ``combine`` as in ops.select."""
    n = len(keep_counts)
    combine = combine or (lambda counts: counts)
    high = torch.zeros((n, ck.HIGH_BINS), dtype=torch.int64)
    for base, experts in tensors():
        if _fast(base, experts):
            high += ck.hist_high(base, list(experts))
        else:
            for i, e in enumerate(experts):
                high[i] += torch.bincount(_tau_bits(base, e) >> 16, minlength=ck.HIGH_BINS).cpu()
    high = combine(high)
    bins, remaining = [], []
    for i in range(n):
        above = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0])
        total, k = int(above[0]), keep_counts[i]
        if not 1 <= k <= total:
            raise ValueError(f"expert {i}: keep count {k} out of range for {total} elements")
        b = int(torch.nonzero(above >= k).max())
        bins.append(b)
        remaining.append(k - (int(above[b + 1]) if b + 1 < ck.HIGH_BINS else 0))
    low = torch.zeros((n, ck.LOW_BINS), dtype=torch.int64)
    for base, experts in tensors():
        if _fast(base, experts):
            low += ck.hist_low(base, list(experts), bins)
        else:
            for i, e in enumerate(experts):
                bits = _tau_bits(base, e)
                low[i] += torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=ck.LOW_BINS).cpu()
    low = combine(low)
    thresholds = []
    for i in range(n):
        low_above = torch.flip(torch.cumsum(torch.flip(low[i], [0]), 0), [0])
        lo = int(torch.nonzero(low_above >= remaining[i]).max())
        thresholds.append(float(torch.tensor([(bins[i] << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return thresholds


def task_vector_stats_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """ops/stats.task_vector_stats_reference on the fused CPU loop: [N, 7] float64 (count, Σx,
    Σx², Σ|x|, max|x|, Σx³, Σx⁴ of τᵢ = expertᵢ − base in float64), reading base once per 16
    experts and each expert once, without materialising τ.

    count and max|x| are exact; the sums differ from the reference's only by the order of the
    float64 additions: |got − ref| ≤ ~1e-12 · Σ|x|ᵖ for the p-th power column (tested at 1e-10
    relative to Σ|x|ᵖ). Tensors the C loop does not take (not CPU, float64 or other dtypes, a
    shape differing from base's, or the library unavailable) go to the reference."""
    from ...ops.stats import task_vector_stats_reference

    experts = list(experts)
    supported = all(_fast(base, experts[g : g + ck.MAX_EXPERTS]) for g in range(0, len(experts), ck.MAX_EXPERTS))
    if not experts or not supported or any(e.shape != base.shape for e in experts):
        return task_vector_stats_reference(base, experts)
    rows = [ck.tau_stats(base, experts[g : g + ck.MAX_EXPERTS]) for g in range(0, len(experts), ck.MAX_EXPERTS)]
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def sign_agreement_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float]) -> torch.Tensor:
    """ops/stats.sign_agreement_reference on the fused CPU loops (one top-k selection pass and one
    counting pass); the same counts, so the same values bit for bit. Tensors the C loops do not
    take, or more experts than one call holds, go to the reference."""
    from ...ops.select import keep_count
    from ...ops.stats import sign_agreement_reference

    experts = list(experts)
    n = len(experts)
    if n < 2 or n > ck.MAX_EXPERTS or not _fast(base, experts) or any(e.shape != base.shape for e in experts):
        return sign_agreement_reference(base, experts, densities)
    numel = base.numel()
    k = [keep_count(float(d), numel) for d in densities]
    agree, nonzero = ck.sign_agreement(base, experts, k)
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for i in range(n):
        if k[i] > 0 and nonzero[i] > 0:
            out[i] = agree[i] / k[i]
    return out


def sign_counts_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """ops/stats.sign_counts_reference on the fused CPU loop, one read: the same float64 sums in
    the same order, so the same counts. Other inputs go to the reference."""
    from ...ops.stats import sign_counts_reference

    experts = list(experts)
    if not experts or not _fast(base, experts) or any(e.shape != base.shape for e in experts):
        return sign_counts_reference(base, experts)
    conflict, agree = ck.sign_counts(base, experts)
    return torch.tensor([conflict, agree], dtype=torch.float64).T.contiguous()


def all_finite_cpu(t: torch.Tensor) -> bool:
    """ops/stats.all_finite in one fused read (tensors the C loop does not take: the reference)."""
    if t.numel() == 0 or t.device.type != "cpu" or t.dtype not in ck.DTYPE_CODES:
        from ...ops.stats import all_finite

        return all_finite(t)
    return ck.count_nonfinite(t) == 0
