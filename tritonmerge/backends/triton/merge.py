"""Triton bindings: the task-arithmetic family through the fused merge kernel, and backend
dispatch for the statistics and selection primitives (ops/stats.py, ops/select.py).

Nothing here imports triton at module import; the kernel modules are imported on first use.

Which step runs where, for one tensor of a ``Family(sparsify, consensus)`` method:
- magnitude/ties/breadcrumbs (per tensor): backends/triton/select finds each expert's exact top-k
  (2 histogram reads, a 3rd counting read only when ties at the k-th value are split), then
  one fused read of base + N experts writes the output. Model-scope thresholds (decisions)
  skip the selection.
- task_arithmetic/linear/dare_*: the fused read alone (DARE's mask is a counter hash in-kernel).
- rescale="l1": one extra read for the masked and unmasked L1 norms.
- della/della_linear: not here (rank-based keep probabilities need a per-row sort); the torch
  reference runs them, and ``gta_triton_supports`` says so.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import torch

from ...context import TensorContext
from ...errors import BackendUnavailableError, ParameterError
from .. import self_check
from ...params import per_expert
from ...ops import rng
from ...ops.family import divisor_rule
from ...ops.select import keep_count
from ...ops.sparsify import expert_densities

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


def gta_triton_supports(params: Any, base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: TensorContext, family) -> list[str]:
    """Reasons the fused Triton merge cannot take this call ([] = it can)."""
    reasons = _device_reasons([base]) + _dtype_reasons(base, experts)
    if len(experts) > MAX_EXPERTS:
        reasons.append(f"{len(experts)} experts; the Triton merge takes 1 to {MAX_EXPERTS}")
    if family is not None and family.sparsify == "della":
        reasons.append("DELLA's keep probabilities rank |τ| within each row (a sort); only the torch reference implements it")
    return reasons


def linear_triton_supports(params: Any, base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: TensorContext) -> list[str]:
    """Reasons the Triton kernel cannot run ``linear`` on this call."""
    return gta_triton_supports(params, base, experts, ctx, None)


def _divide_mode(p: Any, family) -> int:
    from . import fused_merge as K

    return {"none": K.DIVIDE_NONE, "weight": K.DIVIDE_WEIGHT, "count": K.DIVIDE_COUNT}[divisor_rule(p, family)]


def gta_triton(base: torch.Tensor, experts: Sequence[torch.Tensor], params: Any, ctx: TensorContext, family, method_name: str) -> torch.Tensor:
    """``methods.task_arithmetic.merge_family`` with the Triton kernels: same masks (exact top-k
    with the lowest-index tie rule, the same counter-hash DARE drops), fp32 arithmetic in the
    reference's order; returns base's dtype."""
    from . import fused_merge as K
    from .select import KEEP_ALL_TIES, topk_spec_triton

    p, n, numel = params, len(experts), base.numel()
    experts = list(experts)
    weights = per_expert(p.weight, n, "weight")
    keep = ctx.decisions.keep
    active = [True] * n if keep is None else [bool(k) for k in keep]
    kw: dict[str, Any] = {}
    sparsify = family.sparsify
    rescale_mode = getattr(p, "rescale", "none")
    if sparsify is None:
        kind, sparsified, densities = K.SPARSIFY_NONE, [False] * n, [1.0] * n
    else:
        densities = expert_densities(p.density, ctx, n)
        thresholds = ctx.decisions.threshold
        if sparsify == "magnitude" and thresholds is not None:
            kind, sparsified = K.SPARSIFY_THRESHOLD, [True] * n
            # the reference compares fp32 |τ| with the threshold rounded to fp32
            kw.update(threshold=[float(torch.tensor(t, dtype=torch.float32)) for t in thresholds], cutoff=[KEEP_ALL_TIES] * n)
        elif sparsify in ("magnitude", "breadcrumbs"):
            kind = K.SPARSIFY_THRESHOLD
            sparsified = [d < 1.0 and a for d, a in zip(densities, active)]
            keep_k = [keep_count(d, numel) if s else numel for d, s in zip(densities, sparsified)]
            if sparsify == "magnitude":
                spec = topk_spec_triton(base, experts, keep_k)
                kw.update(threshold=spec.threshold, cutoff=spec.cutoff)
            else:
                top = [min(int(p.gamma * numel), numel - k) if s else 0 for k, s in zip(keep_k, sparsified)]
                spec = topk_spec_triton(base, experts + experts, [k + t for k, t in zip(keep_k, top)] + top)
                kw.update(
                    threshold=spec.threshold[:n], cutoff=spec.cutoff[:n],
                    upper_threshold=spec.threshold[n:], upper_cutoff=spec.cutoff[n:],
                )
        elif sparsify == "random":
            kind, sparsified = K.SPARSIFY_RANDOM, [d < 1.0 for d in densities]
            kw.update(
                keys=[rng.stream_keys(p.seed, ctx.name, i) for i in range(n)],
                element_offset=ctx.element_offset,
            )
        else:
            raise ValueError(f"{method_name}: the Triton merge does not implement {sparsify!r} sparsification")
        kw["density"] = [d if s else 1.0 for d, s in zip(densities, sparsified)]
    rescale = K.RESCALE_NONE
    if sparsify is not None and rescale_mode == "keep_prob":
        rescale = K.RESCALE_DIVIDE
    elif sparsify is not None and rescale_mode == "l1":
        rescale = K.RESCALE_MULTIPLY
        before, after = K.masked_l1_triton(base, experts, sparsify=kind, **kw)
        kw["scale"] = [
            float(b / a) if s and not (b < 1e-7 or a < 1e-7) else 1.0
            for b, a, s in zip(before, after, sparsified)
        ]
    elect = K.ELECT_NONE
    if family.consensus:
        elect = K.ELECT_SUM if p.consensus == "sum" else K.ELECT_COUNT
    return K.fused_merge_triton(
        base,
        experts,
        weights=weights,
        lam=getattr(p, "lambda_", 1.0),
        active=active,
        sparsify=kind,
        rescale=rescale,
        elect=elect,
        divide=_divide_mode(p, family),
        **kw,
    )


def linear_triton(base: torch.Tensor, experts: Sequence[torch.Tensor], params: Any, ctx: TensorContext) -> torch.Tensor:
    """``methods.task_arithmetic.merge_linear`` with the fused kernel (Σ wᵢ·expertᵢ [/ Σ wᵢ])."""
    from . import fused_merge as K

    weights = per_expert(params.weight, len(experts), "weight")
    divide, denominator = K.DIVIDE_NONE, 1.0
    if params.normalize:
        denominator = sum(weights)
        if abs(denominator) < 1e-8:
            raise ParameterError(f"linear: the weights sum to {denominator}; cannot normalise (set normalize=false)")
        divide = K.DIVIDE_CONST
    return K.fused_merge_triton(
        base, list(experts), weights=weights, has_base=False, divide=divide, const_divisor=denominator
    )


def triton_impl(family, method_name: str) -> tuple[Callable, Callable]:
    """(merge fn, supports fn) in the registry's signatures for one family member:
    ``fn, supports = triton_impl(family, name); spec.register_impl("triton", supports=supports)(fn)``."""

    def fn(base, experts, p, ctx):
        return gta_triton(base, experts, p, ctx, family, method_name)

    def supports(p, base, experts, ctx):
        return gta_triton_supports(p, base, experts, ctx, family)

    return fn, supports


# ---------------------------------------------------------------------------------------------
# dispatch for the primitives of ops/stats.py and ops/select.py


def use_triton(tensor: torch.Tensor | None, backend: str | None = None) -> bool:
    """Whether a primitive should run its Triton kernel: ``backend`` (else TRITONMERGE_BACKEND)
    "torch"/"cpu" → no; "triton" → yes, or BackendUnavailableError with the reason; "auto"/"cuda"
    → yes for CUDA tensors of a supported dtype when triton can run (there is no CUDA-extension
    version of these primitives; the Triton kernel is their fast path)."""
    from ... import backends

    want = backends.requested_backend(backend)
    if want in ("torch", "cpu"):
        return False
    reasons = []
    if why := backends.triton_status():
        reasons.append(why)
    if tensor is not None:
        reasons += _device_reasons([tensor])
        if tensor.dtype not in (*KERNEL_DTYPES, torch.float64):
            reasons.append(f"dtype {tensor.dtype} is not a float dtype the kernels read")
    if want == "triton":
        if tensor is not None and not reasons and (why := self_check.failure("triton", tensor.device)):
            reasons.append(why)
        if reasons:
            raise BackendUnavailableError("backend 'triton' cannot run this primitive: " + "; ".join(reasons))
        return True
    if reasons or tensor is None or not tensor.is_cuda:
        return False
    if self_check.failure("triton", tensor.device):
        self_check.announce("triton", tensor.device, "the torch reference")
        return False
    return True


def _triton_or_reference(what: str, tensor: torch.Tensor, backend: str | None, fast: Callable, reference: Callable):
    """fast(); under auto selection a kernel that raises disables triton on the tensor's device
    and reference() redoes the call (an explicit backend="triton" re-raises)."""
    from ... import backends

    try:
        return fast()
    except Exception as exc:
        if backends.requested_backend(backend) != "auto" or not backends.kernel_fault(exc):
            raise
        self_check.disable("triton", tensor.device, f"{what} {tuple(tensor.shape)}: {type(exc).__name__}: {exc}")
        self_check.announce("triton", tensor.device, "the torch reference")
        return reference()


def task_vector_stats(base: torch.Tensor, experts: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """ops/stats.task_vector_stats with dispatch: the fused kernel on CUDA, else the reference."""
    from ...ops.stats import task_vector_stats_reference

    if experts and len({e.dtype for e in experts}) == 1 and use_triton(base, backend):
        from .stats import task_stats_triton

        return _triton_or_reference(
            "task_stats", base, backend,
            lambda: task_stats_triton(base, experts)[0], lambda: task_vector_stats_reference(base, experts),
        )
    if base.device.type == "cpu" and all(e.device.type == "cpu" for e in experts):
        from ..cpu.merge import task_vector_stats_cpu  # falls back to the reference where the C loops can't run

        return task_vector_stats_cpu(base, experts)
    return task_vector_stats_reference(base, experts)


def kth_largest(magnitude: torch.Tensor, k: int, *, backend: str | None = None) -> float:
    """ops/select.kth_largest with dispatch."""
    from ...ops.select import kth_largest as reference

    if use_triton(magnitude, backend):
        from .select import kth_largest_triton

        return _triton_or_reference(
            "kth_largest", magnitude, backend, lambda: kth_largest_triton(magnitude, k), lambda: reference(magnitude, k)
        )
    return reference(magnitude, k)


def topk_mask(magnitude: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """ops/select.topk_mask with dispatch (same set: exactly k, ties to the lowest flat index)."""
    from ...ops.select import topk_mask as reference

    if use_triton(magnitude, backend):
        from .select import topk_mask_triton

        return _triton_or_reference(
            "topk_mask", magnitude, backend, lambda: topk_mask_triton(magnitude, k), lambda: reference(magnitude, k)
        )
    return reference(magnitude, k)


def model_thresholds(
    magnitudes: Callable[[], Iterable[Sequence[torch.Tensor]]],
    keep_counts: Sequence[int],
    *,
    backend: str | None = None,
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """ops/select.model_thresholds with dispatch, decided on ``device`` (where the tensors
    live), else on the first tensor's (one extra load of the first item of ``magnitudes()``).
    ``combine`` as in ops/select."""
    from ...ops.select import model_thresholds as reference

    if device is not None:
        first = torch.empty(0, device=device)
    else:
        first = None
        for per_expert_tensors in magnitudes():
            first = per_expert_tensors[0] if per_expert_tensors else None
            break
    if use_triton(first, backend):
        from .select import model_thresholds_triton

        fast = lambda: model_thresholds_triton(magnitudes, keep_counts, combine=combine, device=device)  # noqa: E731
        if first is None:
            return fast()
        if combine is not None:
            # a fallback after a kernel fault would leave the other processes waiting in a
            # collective this one no longer makes: fail instead
            return fast()
        return _triton_or_reference(
            "model_thresholds", first, backend, fast, lambda: reference(magnitudes, keep_counts),
        )
    return reference(magnitudes, keep_counts, combine)
