"""Typed, validated merge parameters.

Every method declares a pydantic model derived from ``MethodParams``. Fields carry a default,
bounds and a one-line ``description`` (the README's method table is generated from them).
Per-model parameters (``weight``, ``density``...) accept a scalar or one value per expert; the
model keeps what the user gave and ``per_expert`` expands it once the number of experts is known.
"""

from __future__ import annotations

import difflib
import typing
from typing import Annotated, Any, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ParameterError


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown fields are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def per_model(
    default: float | None,
    description: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A field that takes a float or a list of floats (one per expert), each within the bounds."""
    element = Annotated[float, Field(gt=gt, ge=ge, lt=lt, le=le)]
    return Field(
        default=default,
        description=description,
        json_schema_extra={
            "per_model": True,
            "bounds": {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le).items() if v is not None},
        },
    ), Union[element, list[element]]


def PerModel(
    default: float | None, description: str, **bounds: float
) -> Any:  # noqa: N802 - reads as a type in field declarations
    """Annotated type + default for a per-model field: ``density: PerModel(1.0, "...", gt=0, le=1)``."""
    field, typ = per_model(default, description, **bounds)
    return Annotated[typ, field]


def per_expert(value: float | Sequence[float] | None, n_experts: int, name: str) -> list[float]:
    """Expand a scalar-or-list per-model parameter to exactly one value per expert."""
    if value is None:
        raise ParameterError(f"parameter {name!r} is required but was not given")
    if isinstance(value, (int, float)):
        return [float(value)] * n_experts
    values = [float(v) for v in value]
    if len(values) != n_experts:
        raise ParameterError(
            f"parameter {name!r} has {len(values)} values but there are {n_experts} experts; "
            f"give one value per expert or a single scalar"
        )
    return values


def _describe_allowed(model: type[MethodParams], field_name: str) -> str:
    info = model.model_fields[field_name]
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    found: dict[str, Any] = dict(extra.get("bounds", {}))
    for meta in info.metadata:
        for attr in symbols:
            v = getattr(meta, attr, None)
            if v is not None:
                found[attr] = v
    bounds = [f"{symbols[k]} {v}" for k, v in found.items()]
    if extra.get("per_model"):
        text = "a number or one number per expert"
    elif typing.get_origin(info.annotation) is typing.Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(info.annotation))
    else:
        ann = getattr(info.annotation, "__name__", None) or str(info.annotation)
        text = ann.replace("typing.", "")
    if bounds:
        text += ", " + " and ".join(bounds)
    return text


def validate_params(method_name: str, model: type[MethodParams], params: dict[str, Any]) -> MethodParams:
    """Build ``model`` from ``params``; any problem becomes a ParameterError that names the
    method, the parameter, the value given and what is allowed."""
    names = param_names(model)
    allowed = list(names)
    for key in params:
        if key not in names:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(
                f"{method_name}: unknown parameter {key!r}{hint}; "
                f"allowed parameters: {', '.join(allowed) or 'none'}"
            )
    try:
        return model(**params)
    except ValidationError as exc:
        problems = []
        for err in _one_error_per_field(exc.errors(), params):
            loc = err.get("loc", ())
            field = str(loc[0]) if loc else "?"
            attr = names.get(field, field)
            value = params.get(field, err.get("input"))
            detail = err.get("msg", "invalid")
            problems.append(
                f"{method_name}: parameter {field!r} = {value!r} is not allowed ({detail})"
                + (f"; allowed: {field_doc(model, attr)}" if attr in model.model_fields else "")
            )
        raise ParameterError("; ".join(dict.fromkeys(problems))) from None


def _one_error_per_field(errors: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """A scalar-or-list field fails in both union branches; keep the branch the user meant."""
    chosen: dict[str, dict[str, Any]] = {}
    for err in errors:
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else "?"
        is_list_branch = any(isinstance(part, int) for part in loc) or err.get("type") == "list_type"
        meant_list = isinstance(params.get(field), (list, tuple))
        if field not in chosen or (is_list_branch == meant_list and err.get("type") != "list_type"):
            chosen[field] = err
    return list(chosen.values())


def param_names(model: type[MethodParams]) -> dict[str, str]:
    """User-facing parameter name (the alias where one is set, e.g. ``lambda``) -> attribute name."""
    return {(info.alias or name): name for name, info in model.model_fields.items()}


def field_doc(model: type[MethodParams], field_name: str) -> str:
    info = model.model_fields[field_name]
    text = info.description or ""
    return f"{text} ({_describe_allowed(model, field_name)})" if text else _describe_allowed(model, field_name)


def describe_params(model: type[MethodParams]) -> list[dict[str, Any]]:
    """Rows of (name, default, per_model, description, bounds) for docs and ``tritonmerge info``."""
    rows = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        rows.append(
            {
                "name": info.alias or name,
                "default": None if info.is_required() else info.get_default(call_default_factory=True),
                "required": info.is_required(),
                "per_model": bool(extra.get("per_model")),
                "description": info.description or "",
                "allowed": _describe_allowed(model, name),
            }
        )
    return rows
