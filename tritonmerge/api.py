"""The public entry points: ``merge_tensors`` (one tensor) and ``merge_state_dicts`` (whole models).

Both validate everything first (method name, parameters, shapes, dtypes, NaN/Inf), run the
method's whole-model analysis when it needs one, then merge tensor by tensor through
``merge_one`` — the same function the disk-to-disk engine calls.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from . import backends
from .context import MergeReport, ModelDecisions, TensorContext, TensorDecisions
from .errors import InputError, ParameterError
from .params import describe_params, param_names
from .catalog import get_method
from .registry import MergeMethod
from .source import InMemorySource, TensorSource

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN/Inf: one fused read on the CPU where the C loops are compiled,
    else ops/stats.all_finite (a sum first, the elementwise check only when it is not finite)."""
    return backends.run_op("all_finite", t)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise InputError(f"{what} contains {n_nan} NaN and {n_inf} Inf values; refusing to merge it")


def check_tensors(
    name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], *, check_finite: bool = True
) -> None:
    """Tensors, equal shapes, one device, finite values; errors name the tensor."""
    label = f"tensor {name!r}" if name else "tensor"
    if not isinstance(base, torch.Tensor):
        raise InputError(f"{label}: base must be a torch.Tensor, got {type(base).__name__}")
    for i, e in enumerate(experts):
        if not isinstance(e, torch.Tensor):
            raise InputError(f"{label}: expert {i} must be a torch.Tensor, got {type(e).__name__}")
        if e.shape != base.shape:
            raise InputError(
                f"{label}: expert {i} has shape {tuple(e.shape)} but the base has {tuple(base.shape)}"
            )
        if e.device != base.device:
            raise InputError(f"{label}: expert {i} is on {e.device} but the base is on {base.device}")
    if check_finite and base.is_floating_point():
        _check_finite(base, f"{label} of the base")
        for i, e in enumerate(experts):
            _check_finite(e, f"{label} of expert {i}")


def _check_per_model_lengths(spec: MergeMethod, p: Any, n_experts: int) -> None:
    from .registry import Composite

    if isinstance(p, Composite):
        _check_per_model_lengths(spec, p.own, n_experts)
        _check_per_model_lengths(p.inner, p.inner_params, n_experts)
        return
    for row in describe_params(type(p)):
        value = getattr(p, param_names(type(p))[row["name"]])
        if row["per_model"] and isinstance(value, (list, tuple)) and len(value) != n_experts:
            raise ParameterError(
                f"{spec.name}: parameter {row['name']!r} has {len(value)} values but there are "
                f"{n_experts} experts; give one value per expert or a single number"
            )


def _validate_call(method: str, n_experts: int, params: dict[str, Any]) -> tuple[MergeMethod, Any]:
    spec = get_method(method)
    if n_experts == 0:
        raise InputError(f"{method}: the list of experts is empty; give at least {spec.min_experts}")
    p = spec.validate(params)
    _check_per_model_lengths(spec, p, n_experts)
    inner, _ = spec.innermost(p)
    if need := inner.experts_wanted(n_experts):
        raise InputError(f"{inner.name} needs {need} expert(s) besides the base, got {n_experts}")
    return spec, p


def merge_one(
    spec: MergeMethod,
    params: Any,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    ctx: TensorContext,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Merge one tensor with validated parameters; returns it in base's dtype and device.

    Non-float tensors (integer buffers) are taken from the base. LwPTV keep flags: a pruned
    (task, layer) contributes a zero task vector — the family's lowering reads them, every
    other method gets the base in the pruned expert's place.
    """
    if not base.is_floating_point():
        return base.clone()
    method, method_params = spec.innermost(params)
    if method.family is None:
        experts = ctx.decisions.kept_experts(base, experts)
    used, out = backends.merge_with_fallback(method, method_params, base, experts, ctx, backend)
    ctx.record_backend(used)
    return out.to(dtype=base.dtype, device=base.device)


def analyze(spec: MergeMethod, params: Any, source: TensorSource) -> ModelDecisions:
    """The method's whole-model decisions; the summary names the backends each building block
    of the analysis ran on (``analysis_backends``: op -> backends, this process's calls)."""
    decisions = ModelDecisions()
    if spec.needs_analysis(params):
        with backends.recording() as ran:
            spec.run_analysis(params, source, decisions)
        decisions.summary["analysis_backends"] = {op: sorted(used) for op, used in sorted(ran.items())}
    return decisions


def merge_tensors(
    method: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
    name: str = "",
    report: MergeReport | None = None,
    **params: Any,
) -> torch.Tensor:
    """Merge one tensor: ``base`` is the pre-trained tensor, ``experts`` fine-tuned tensors of the
    same shape. Returns the merged tensor in base's dtype and device. Methods that need
    whole-model facts treat the tensor as a one-tensor model. ``name`` is used for per-tensor
    seeding and name-based rules (WUDI's tensor selection)."""
    experts = list(experts)
    spec, p = _validate_call(method, len(experts), params)
    check_tensors(name, base, experts)
    key = name or "tensor"
    merged = _merge_validated(
        spec, p, {key: base}, [{key: e} for e in experts], backend=backend, report=report
    )
    return merged[key]


def _merge_validated(
    spec: MergeMethod,
    p: Any,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    *,
    backend: str | None,
    report: MergeReport | None,
) -> dict[str, torch.Tensor]:
    source = InMemorySource(base, experts)
    decisions = analyze(spec, p, source)
    if report is not None:
        report.method = spec.name
        report.decisions = decisions
    out: dict[str, torch.Tensor] = {}

    def context(key: str) -> TensorContext:
        return TensorContext(name=key, decisions=decisions.tensors.get(key, TensorDecisions()), report=report)

    for group in plan_groups(spec, p, source):
        if len(group) == 1:
            key = group[0]
            b, es = source.load(key)
            out[key] = merge_one(spec, p, b, es, context(key), backend=backend)
            continue
        method, method_params = spec.innermost(p)
        items = [(*source.load(key), context(key)) for key in group]
        for key, merged in zip(group, method.merge_group(method_params, items, backend=backend)):
            out[key] = merged
    return {key: out[key] for key in source.names}


def plan_groups(
    spec: MergeMethod, params: Any, source: TensorSource, device: torch.device | str = "cpu"
) -> list[list[str]]:
    """The order of work: single tensors, and batches of tensors that the method merges together
    (``group_key``/``merge_group``, e.g. same-shaped WUDI layers), each batch within the method's
    memory budget. Every tensor appears exactly once."""
    method, method_params = spec.innermost(params)
    if method.group_key is None or method.merge_group is None:
        return [[name] for name in source.names]
    grouped: dict[Any, list[str]] = {}
    order: list[Any] = []
    for name in source.names:
        key = method.group_key(method_params, name, source.shape(name), source.dtype(name))
        if key is None:
            key = ("single", name)
        if key not in grouped:
            grouped[key] = []
            order.append(key)
        grouped[key].append(name)
    plan: list[list[str]] = []
    for key in order:
        names = grouped[key]
        if key[0] == "single":
            plan.append(names)
            continue
        size = len(names)
        if method.max_group_size is not None:
            size = max(1, method.max_group_size(method_params, source.shape(names[0]), source.n_experts, device))
        plan.extend(names[i : i + size] for i in range(0, len(names), size))
    return plan


def merge_state_dicts(
    method: str,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    *,
    backend: str | None = None,
    report: MergeReport | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge whole models given as dicts of tensors (same keys and shapes in every dict).

    Methods whose decisions span tensors (TIES with ``topk_scope="model"``, TADrop, LwPTV,
    WUDI's choice of tensors) see the whole model here. Pass a ``MergeReport`` to receive
    per-tensor numbers (WUDI's loss), the backend used per tensor and the analysis decisions."""
    experts = list(experts)
    spec, p = _validate_call(method, len(experts), params)
    keys = list(base.keys())
    key_set = set(keys)
    for i, sd in enumerate(experts):
        missing = key_set - set(sd.keys())
        extra = set(sd.keys()) - key_set
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"has extra {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}")
            raise InputError(f"expert {i}'s state dict does not match the base: it {' and '.join(parts)}")
    for key in keys:
        check_tensors(key, base[key], [sd[key] for sd in experts])
    return _merge_validated(spec, p, base, experts, backend=backend, report=report)


def describe(method: str) -> dict[str, Any]:
    """Name, one-line doc, reference and parameter rows of a method (for docs and the CLI)."""
    from .params import describe_params

    spec = get_method(method)
    return {
        "name": spec.name,
        "doc": spec.doc,
        "reference": spec.reference,
        "params": describe_params(spec.params),
        "backends": ["torch", *spec.impls],
    }
