"""The "triton" backend's adapters: merge specs (ops/merge_spec.py) through the fused merge
kernel, and the analyses' building blocks (statistics, selection, model-wide thresholds)
through their kernels, in the dispatcher's signatures (backends/__init__.py).

Nothing here imports triton at module import; the kernel modules are imported on first use.

Which reads one tensor's spec costs:
- ``Keep.TOPK`` (per-tensor top-k, with or without outliers): backends/triton/select finds each
  expert's exact threshold and tie cutoff (2 histogram reads, a 3rd counting read only when ties
  at the k-th value are split), then one fused read of base + N experts writes the output.
  ``Keep.THRESHOLD`` (model-scope thresholds) skips the selection.
- ``Keep.ALL``/``Keep.RANDOM``: the fused read alone (the random mask is a counter hash in-kernel).
- the L1 rescale: one extra read for the masked and unmasked L1 norms.
- ``Keep.RANKED_RANDOM`` (DELLA): not here (rank-based keep probabilities need a per-row sort);
  the torch reference runs it, and ``merge_triton_reasons`` says so.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import torch

from ...ops.merge_spec import Aggregate, Divide, Elect, Keep, MergeSpec

MAX_EXPERTS = 16  # the kernel loop is dynamic; this is the range the tests cover
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    t = tensors[0]
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"the tensors are on {t.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"]
    return []


def _dtype_reasons(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[str]:
    reasons = []
    dtypes = {base.dtype, *(e.dtype for e in experts)}
    if not dtypes <= set(KERNEL_DTYPES):
        reasons.append(f"dtypes {sorted(map(str, dtypes))} are not all fp32/bf16/fp16")
    if len({e.dtype for e in experts}) > 1:
        reasons.append("the experts have different dtypes (the kernels read them through one pointer type)")
    return reasons


# what the fused merge kernel implements; a spec with anything else goes to the torch reference
SUPPORTED_KEEPS = {Keep.ALL, Keep.NONE, Keep.THRESHOLD, Keep.TOPK, Keep.RANDOM}
SUPPORTED_ELECTIONS = {Elect.NONE, Elect.SUM, Elect.COUNT}
SUPPORTED_DIVISORS = {Divide.NONE, Divide.WEIGHT, Divide.COUNT, Divide.CONSTANT}
_WHY_NOT = {Keep.RANKED_RANDOM: " (DELLA's keep probabilities rank |τ| within each row: a sort)"}


def merge_triton_reasons(spec: MergeSpec, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[str]:
    """Reasons the fused Triton merge cannot execute ``spec`` on these tensors ([] = it can)."""
    reasons = _device_reasons([base]) + _dtype_reasons(base, experts)
    if len(experts) > MAX_EXPERTS:
        reasons.append(f"{len(experts)} experts; the Triton merge takes 1 to {MAX_EXPERTS}")
    keeps = spec.keeps - {Keep.ALL, Keep.NONE}
    unsupported = keeps - SUPPORTED_KEEPS
    for keep in sorted(unsupported):
        reasons.append(f"keep rule {keep.name} is not implemented in the Triton merge" + _WHY_NOT.get(keep, ""))
    if not unsupported and len(keeps - {Keep.TOPK, Keep.THRESHOLD}) + bool(keeps & {Keep.TOPK, Keep.THRESHOLD}) > 1:
        reasons.append("one launch applies one kind of mask; this spec mixes random and threshold masks")
    if len({rule.rescale for rule in spec.experts if rule.masked}) > 1:
        reasons.append("one launch applies one rescale rule; this spec mixes them")
    if spec.elect not in SUPPORTED_ELECTIONS:
        reasons.append(f"sign election {spec.elect.name} is not implemented in the Triton merge")
    if spec.divide not in SUPPORTED_DIVISORS:
        reasons.append(f"divisor {spec.divide.name} is not implemented in the Triton merge")
    if spec.aggregate != Aggregate.SUM:
        reasons.append(f"aggregate {spec.aggregate.name} is not implemented in the Triton merge")
    return reasons


def merge_triton(spec: MergeSpec, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``merge_by_spec`` with the Triton kernels: the same masks (exact top-k with the
    lowest-index tie rule, the same counter-hash random drops), fp32 arithmetic in the
    reference's order, one rounding to the output dtype."""
    from . import fused_merge as K
    from .select import KEEP_ALL_TIES, topk_spec_triton

    n, numel = len(experts), base.numel()
    experts = list(experts)
    rules = spec.experts
    weights = [rule.weight for rule in rules]
    if not spec.task_vectors:
        return K.fused_merge_triton(
            base, experts, weights=weights, has_base=False, divide=int(spec.divide),
            const_divisor=spec.divide_constant, out_dtype=spec.out_dtype,
        )
    active = [rule.keep != Keep.NONE for rule in rules]
    masked = [rule.masked for rule in rules]
    keeps = {rule.keep for rule, m in zip(rules, masked) if m}
    kw: dict[str, Any] = {}
    kind = K.SPARSIFY_NONE
    if keeps & {Keep.TOPK, Keep.THRESHOLD}:
        kind = K.SPARSIFY_THRESHOLD
        if Keep.TOPK in keeps:
            # one selection for every expert: its k (everything for the unmasked ones) and, for
            # breadcrumbs, its k + outliers and outliers as a second set removed from the first
            keep_k = [rule.k + rule.outliers if rule.keep == Keep.TOPK else numel for rule in rules]
            top = [rule.outliers if rule.keep == Keep.TOPK else 0 for rule in rules]
            if any(top):
                sel = topk_spec_triton(base, experts + experts, keep_k + top)
                kw.update(threshold=sel.threshold[:n], cutoff=sel.cutoff[:n],
                          upper_threshold=sel.threshold[n:], upper_cutoff=sel.cutoff[n:])
            else:
                sel = topk_spec_triton(base, experts, keep_k)
                kw.update(threshold=sel.threshold, cutoff=sel.cutoff)
        if Keep.THRESHOLD in keeps:
            threshold = list(kw.get("threshold", [0.0] * n))
            cutoff = list(kw.get("cutoff", [KEEP_ALL_TIES] * n))
            for i, rule in enumerate(rules):
                if rule.keep == Keep.THRESHOLD:
                    # the reference compares fp32 |τ| with the threshold rounded to fp32
                    threshold[i], cutoff[i] = float(torch.tensor(rule.threshold, dtype=torch.float32)), KEEP_ALL_TIES
            kw.update(threshold=threshold, cutoff=cutoff)
    elif Keep.RANDOM in keeps:
        kind = K.SPARSIFY_RANDOM
        kw.update(keys=[rule.keys for rule in rules], element_offset=spec.element_offset)
    kw["density"] = [rule.density if m else 1.0 for rule, m in zip(rules, masked)]
    rescale_rule = next((rule.rescale for rule, m in zip(rules, masked) if m), "none")
    rescale = K.RESCALE_NONE
    if rescale_rule == "keep_prob":
        rescale = K.RESCALE_DIVIDE
    elif rescale_rule == "l1":
        rescale = K.RESCALE_MULTIPLY
        before, after = K.masked_l1_triton(base, experts, sparsify=kind, **kw)
        kw["scale"] = [
            float(b / a) if m and not (b < 1e-7 or a < 1e-7) else 1.0 for b, a, m in zip(before, after, masked)
        ]
    return K.fused_merge_triton(
        base,
        experts,
        weights=weights,
        lam=spec.lam,
        active=active,
        sparsify=kind,
        rescale=rescale,
        elect=int(spec.elect),
        divide=int(spec.divide),
        out_dtype=spec.out_dtype,
        **kw,
    )


# (run, supports) for methods/task_arithmetic's registration of every spec executor
EXECUTOR = (merge_triton, merge_triton_reasons)


# ---------------------------------------------------------------------------------------------
# the building blocks, in the dispatcher's signatures (backends.OPS)


def op_reasons(op: str, *args: Any, **kwargs: Any) -> list[str]:
    """Why the kernel of ``op`` cannot take these arguments ([] when it can); the device is
    the dispatcher's check."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if op == "task_vector_stats":
        base, experts = args[0], list(args[1])
        if not experts:
            return ["no experts"]
        return _dtype_reasons(base, experts)
    for t in tensors:
        if t.dtype not in (*KERNEL_DTYPES, torch.float64):
            return [f"dtype {t.dtype} is not a float dtype the kernels read"]
    return []


def task_vector_stats_triton(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """ops/stats.task_vector_stats_reference with the fused statistics kernel."""
    from .stats import task_stats_triton

    return task_stats_triton(base, list(experts))[0]


def kth_largest_triton(magnitude: torch.Tensor, k: int) -> float:
    from .select import kth_largest_triton as kernel

    return kernel(magnitude, k)


def topk_mask_triton(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    from .select import topk_mask_triton as kernel

    return kernel(magnitude, k)


def model_thresholds_triton(
    pairs: Callable[[], Iterable[tuple[torch.Tensor, Sequence[torch.Tensor | None]]]],
    keep_counts: Sequence[int],
    *,
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """ops/select.model_thresholds_from_pairs with the histogram kernels."""
    from .select import model_thresholds_triton as kernel

    def magnitudes():
        for base, experts in pairs():
            b = base.to(torch.float32)
            yield [torch.zeros_like(b) if e is None else (e.to(torch.float32) - b).abs() for e in experts]

    return kernel(magnitudes, keep_counts, combine=combine, device=device)
