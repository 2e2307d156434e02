"""The method registry: one ``MergeMethod`` per name, registered by the files in ``methods/``.

A method is a parameter model plus a per-tensor torch reference (the specification), with
optional whole-model analysis, optional batched execution and optional fast implementations
per backend. ``methods/__init__.py`` imports every module of the package, so dropping a file
in is the whole registration step.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

from .context import ModelDecisions, TensorContext
from .errors import ParameterError, UnknownMethodError
from .params import MethodParams, validate_params
from .source import TensorSource

# (base, experts, params, ctx) -> merged tensor (any float dtype; the caller casts to base's dtype)
TensorFn = Callable[[torch.Tensor, Sequence[torch.Tensor], Any, TensorContext], torch.Tensor]
# (params, source, decisions) -> None; fills ``decisions`` with whole-model facts
AnalyzeFn = Callable[[Any, TensorSource, ModelDecisions], None]
# (params, tensors) -> list of human-readable reasons why this implementation cannot run; [] = can run
SupportsFn = Callable[[Any, torch.Tensor, Sequence[torch.Tensor], TensorContext], list[str]]


@dataclass
class Implementation:
    backend: str
    fn: TensorFn
    supports: SupportsFn


@dataclass
class MergeMethod:
    name: str
    params: type[MethodParams]
    doc: str
    merge_tensor: TensorFn
    reference: str = ""
    analyze: AnalyzeFn | None = None
    min_experts: int = 1
    max_experts: int | None = None
    stochastic: bool = False
    # What a config's ``base_model`` is to the method (mergekit's input contracts): "required",
    # the origin of the task vectors; "optional", the origin when given, else the experts are
    # merged as raw weights (the method's ``origin`` parameter, which the config loader sets);
    # "input", one more input model like the listed ones; "unused", never read (linear).
    base_role: Literal["required", "optional", "input", "unused"] = "required"
    # modifiers (tadrop, lwptv) wrap the method named by their ``merge_method`` parameter
    modifier: bool = False
    # True when the merge of a row chunk only needs that chunk (given the analysis decisions)
    chunkable: Callable[[Any], bool] = lambda p: False
    impls: dict[str, Implementation] = field(default_factory=dict)
    # Optional batching of tensors across the model (WUDI: same-shaped layers in one bmm).
    # group_key(params, name, shape, dtype) -> hashable or None (None = merge alone);
    # merge_group(params, [(base, experts, ctx)], backend=) -> merged tensors in base dtype;
    # max_group_size(params, shape, n_experts, device) -> how many fit the memory budget.
    group_key: Callable[..., Any] | None = None
    merge_group: Callable[..., list[torch.Tensor]] | None = None
    max_group_size: Callable[..., int] | None = None
    # members of the task-arithmetic family: what sets them apart (ops/family.Family)
    family: Any = None
    # floating-point operations to merge one tensor beyond its elementwise work, where that
    # dominates (WUDI's matrix products): flops(params, name, shape, n_experts); the distributed
    # engine balances ranks by it
    flops: Callable[..., float] | None = None

    def validate(self, params: dict[str, Any]) -> Any:
        """Validated parameters; for a modifier a ``Composite`` of its own and the inner method's."""
        if not self.modifier:
            return validate_params(self.name, self.params, params)
        own_keys = set(self.params.model_fields)
        own = validate_params(self.name, self.params, {k: v for k, v in params.items() if k in own_keys})
        inner = get_method(own.merge_method)
        inner_params = inner.validate({k: v for k, v in params.items() if k not in own_keys})
        return Composite(own=own, inner=inner, inner_params=inner_params)

    def innermost(self, params: Any) -> tuple["MergeMethod", Any]:
        """The method that finally merges each tensor, and its parameters."""
        if isinstance(params, Composite):
            return params.inner.innermost(params.inner_params)
        return self, params

    def run_analysis(self, params: Any, source: TensorSource, decisions: ModelDecisions) -> None:
        """Own analysis first (a modifier's decisions feed the inner method's), then the inner's."""
        if self.analyze is not None:
            self.analyze(params, source, decisions)
        if isinstance(params, Composite):
            params.inner.run_analysis(params.inner_params, source, decisions)

    def needs_analysis(self, params: Any) -> bool:
        if self.analyze is not None and getattr(self.params, "needs_analysis", lambda p: True)(
            params.own if isinstance(params, Composite) else params
        ):
            return True
        return isinstance(params, Composite) and params.inner.needs_analysis(params.inner_params)

    def experts_wanted(self, n: int) -> str | None:
        """None when the method takes ``n`` experts, else how many it takes ("exactly 2",
        "at least 1", "1 to 2"), for the caller's one-line error."""
        lo, hi = self.min_experts, self.max_experts
        if lo <= n and (hi is None or n <= hi):
            return None
        return f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")

    def implementation(self, backend: str) -> Implementation | None:
        return self.impls.get(backend)

    def register_impl(self, backend: str, supports: SupportsFn) -> Callable[[TensorFn], TensorFn]:
        def deco(fn: TensorFn) -> TensorFn:
            self.impls[backend] = Implementation(backend, fn, supports)
            return fn

        return deco


@dataclass(frozen=True)
class Composite:
    """Validated parameters of a modifier: its own, plus the wrapped method and that method's."""

    own: MethodParams
    inner: MergeMethod
    inner_params: Any

    def __getattr__(self, item: str) -> Any:
        return getattr(self.own, item)

    def as_dict(self) -> dict[str, Any]:
        inner = (
            self.inner_params.as_dict()
            if isinstance(self.inner_params, Composite)
            else self.inner_params.model_dump(by_alias=True)
        )
        return {**inner, **self.own.model_dump(by_alias=True)}


# Filled by the method modules as they are imported (tritonmerge.catalog imports them all).
_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}{hint} (available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def list_methods() -> list[str]:
    """Names of every registered merge method, sorted."""
    return sorted(_REGISTRY)


def method_table() -> dict[str, MergeMethod]:
    return dict(sorted(_REGISTRY.items()))
