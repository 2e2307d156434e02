"""Merge configurations: mergekit's YAML schema (for the methods we share) -> ``MergeConfig``.

Accepted keys: ``merge_method``, ``base_model``, ``models`` (each ``model`` plus optional
``parameters``), ``parameters`` (global), ``dtype`` (inputs are cast to it before merging),
``out_dtype`` (default: ``dtype``, else each tensor's stored dtype), ``tokenizer_source: base``.

A parameter value is a scalar, a *gradient* (a list of numbers interpolated over the layer
index, ``t = layer / (n_layers - 1)``; tensors outside the layers take t = 0 for embeddings and
t = 1 otherwise, as in mergekit), or a *filter list* ``[{filter: substring, value: ...}, ...]``
where the first entry whose ``filter`` is a substring of the tensor name wins and ``"*"`` or a
missing filter matches everything. Per-model values take precedence over global ones.

A mergekit method name gets mergekit's semantics: defaults (``density`` 1.0, ``normalize``,
``rescale``) and the boolean ``rescale`` mapped to our ``rescale`` choice (``true`` -> ``"l1"``,
mergekit's L1-norm matching), and for the consensus methods ``normalize`` mapped to our
``disjoint`` rule. Our own methods and options work under their own names.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from .errors import ConfigError, TritonMergeError, UnknownMethodError
from .params import MethodParams, param_names
from .catalog import get_method
from .registry import MergeMethod

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under `models`",
    "modules": "multi-module configs are not supported; list whole models under `models`",
    "tokenizer": "tokenizer surgery is not supported; the output uses the base model's tokenizer",
    "chat_template": "chat_template is not supported; the base model's tokenizer files are copied as they are",
}

# mergekit's methods that tritonmerge does not implement (none of 0.1.5's): named as such, so a
# user is not told "did you mean 'slerp'?" for a method that exists, just not here
MERGEKIT_ONLY_METHODS: tuple[str, ...] = ()
# mergekit options that change memory use only, never the result: dropped for the methods that
# do not declare them (the task-arithmetic family and sce declare int8_mask, as mergekit does)
_IGNORED_MERGEKIT_PARAMS = {"int8_mask"}


def dtype_from_name(value: Any, what: str) -> torch.dtype | None:
    if value is None:
        return None
    key = str(value).strip().lower().replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"{what}: {value!r} is not a dtype; choose float32, bfloat16, float16 or float64")
    return DTYPES[key]


@dataclass
class ModelEntry:
    """One input model: as written in the config, where it is, and its per-model parameters."""

    name: str
    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A validated merge configuration. ``resolve(tensor_name, t)`` gives the parameters of one
    tensor (per-model values as one list entry per expert), ready for ``MergeMethod.validate``."""

    merge_method: str
    spec: MergeMethod
    base: ModelEntry
    experts: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str = "base"
    raw: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None  # the YAML file it was read from, if any
    # False: the config names no base_model and ``base`` is the first model, a stand-in that
    # the method does not merge as a base
    base_given: bool = True
    # user-facing parameter names -> True if per-model
    _per_model: dict[str, bool] = field(default_factory=dict)
    _literal_lists: set[str] = field(default_factory=set)
    _defaults: dict[str, Any] = field(default_factory=dict)

    # The dtype policy, in one place: what each tensor is written as and what its inputs are
    # cast to before the method sees them.

    def output_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a tensor stored as ``stored`` is written in: ``out_dtype``, else ``dtype``,
        else as stored. Integer tensors (buffers) always keep their dtype."""
        if not stored.is_floating_point:
            return stored
        return self.out_dtype or self.dtype or stored

    def input_dtype(self, stored: torch.dtype, output: torch.dtype) -> torch.dtype | None:
        """What float inputs stored as ``stored`` are cast to before merging (None: as stored).
        ``dtype: float32`` over inputs already in the output dtype is no cast: every method
        accumulates in float32 and rounds once to the output dtype, so upcasting first would
        only cost a pass over the inputs and their memory for the same result."""
        if self.dtype is None or not stored.is_floating_point or stored == self.dtype:
            return None
        if self.dtype == torch.float32 and stored == output:
            return None
        return self.dtype

    @property
    def mergekit_semantics(self) -> tuple[bool, bool, bool] | None:
        return _mergekit_defaults(self._inner_name())

    def _inner_name(self) -> str:
        """The method that finally merges each tensor (through tadrop/lwptv wrappers)."""
        spec, params = self.spec, dict(self.parameters)
        while spec.modifier:
            inner = params.get("merge_method")
            if not isinstance(inner, str):
                return ""
            spec, params = get_method(inner), _unwrap(params)
        return spec.name

    # -- resolution --------------------------------------------------------------------------

    def resolve(self, tensor_name: str = "", t: float = 0.0) -> dict[str, Any]:
        """Parameters for one tensor at relative depth ``t`` in [0, 1]."""
        out: dict[str, Any] = {}
        for pname, per_model in self._per_model.items():
            literal = pname in self._literal_lists
            if per_model:
                values = []
                any_set = False
                for m in self.experts:
                    v = evaluate(m.parameters[pname], tensor_name, t, literal) if pname in m.parameters else None
                    if v is None and pname in self.parameters:
                        v = evaluate(self.parameters[pname], tensor_name, t, literal)
                    any_set = any_set or v is not None
                    values.append(v)
                if not any_set:
                    if pname in self._defaults:
                        out[pname] = self._defaults[pname]
                    continue
                default = self._defaults.get(pname, self._field_default(pname))
                if any(v is None for v in values) and default is None:
                    missing = [m.name for m, v in zip(self.experts, values) if v is None]
                    raise ConfigError(
                        f"parameter {pname!r} has no value for model(s) {missing} at tensor {tensor_name!r}; "
                        f"set it for every model or in the global parameters"
                    )
                out[pname] = [default if v is None else v for v in values]
            elif pname in self.parameters:
                v = evaluate(self.parameters[pname], tensor_name, t, literal)
                if v is not None:
                    out[pname] = v
                elif pname in self._defaults:
                    out[pname] = self._defaults[pname]
            elif pname in self._defaults:
                out[pname] = self._defaults[pname]
        return self._apply_mergekit(out)

    def _field_default(self, pname: str) -> Any:
        for model in _param_models(self.spec, self.parameters):
            names = param_names(model)
            if pname in names:
                info = model.model_fields[names[pname]]
                return None if info.is_required() else info.default
        return None

    def _apply_mergekit(self, p: dict[str, Any]) -> dict[str, Any]:
        sem = self.mergekit_semantics
        for key in _IGNORED_MERGEKIT_PARAMS - self._known_fields():
            p.pop(key, None)
        if sem is None:
            return p
        consensus, normalize_default, rescale_default = sem
        has_rescale = "rescale" in self._known_fields()
        rescale = p.pop("rescale", None)
        if has_rescale:
            if rescale is None:
                rescale = rescale_default
            if isinstance(rescale, bool):
                rescale = "l1" if rescale else "none"
            p["rescale"] = rescale
        if consensus and "disjoint" not in p:
            normalize = p.get("normalize", normalize_default)
            p["disjoint"] = "mean" if normalize else "sum"
            p["normalize"] = bool(normalize)
        return p

    def _known_fields(self) -> set[str]:
        names: set[str] = set()
        for model in _param_models(self.spec, self.parameters):
            names.update(param_names(model))
        return names

    # -- output ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (absolute paths), in mergekit's schema."""
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_given:
            d["base_model"] = str(self.base.path)
        d["models"] = [
            {"model": str(m.path), **({"parameters": m.parameters} if m.parameters else {})} for m in self.experts
        ]
        if self.parameters:
            d["parameters"] = self.parameters
        if self.dtype is not None:
            d["dtype"] = str(self.dtype).replace("torch.", "")
        if self.out_dtype is not None:
            d["out_dtype"] = str(self.out_dtype).replace("torch.", "")
        d["tokenizer_source"] = self.tokenizer_source
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def evaluate(setting: Any, tensor_name: str, t: float, literal_list: bool = False) -> Any:
    """Value of a parameter setting for one tensor (mergekit's ``evaluate_setting``): None when a
    filter list has no matching entry."""
    if isinstance(setting, list):
        if literal_list and all(not isinstance(e, dict) for e in setting):
            return list(setting)
        if not setting:
            return None
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                flt = cond.get("filter")
                if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                    return evaluate(cond["value"], tensor_name, t, literal_list)
            return None
        if all(_is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = min(int(math.floor(scaled)), len(setting) - 1)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    if isinstance(setting, dict):
        if "value" in setting:
            return evaluate([setting], tensor_name, t, literal_list)
        raise ConfigError(f"parameter setting {setting!r} is neither a value, a gradient nor a filter list")
    return setting


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def tensor_t(name: str, n_layers: int) -> float:
    """Relative depth of a tensor for gradients: layer/(n_layers-1); embeddings 0, other
    non-layer tensors (final norm, lm_head) 1 — mergekit's pre/post weights."""
    from .context import layer_index

    layer = layer_index(name)
    if layer is None:
        return 0.0 if re.search(r"embed|wte|wpe|tok_embeddings", name) else 1.0
    if n_layers <= 1:
        return 1.0
    return min(max(layer / (n_layers - 1), 0.0), 1.0)


def _param_models(spec: MergeMethod, parameters: Mapping[str, Any]) -> list[type[MethodParams]]:
    if not spec.modifier:
        return [spec.params]
    models: list[type[MethodParams]] = [spec.params]
    inner_name = parameters.get("merge_method")
    if isinstance(inner_name, str):
        try:
            inner = get_method(inner_name)
        except TritonMergeError as exc:
            raise ConfigError(f"{spec.name}: parameter merge_method: {exc}") from None
        models.extend(_param_models(inner, _unwrap(parameters)))
    return models


def _mergekit_defaults(method: str) -> tuple[bool, bool, bool] | None:
    """mergekit's (consensus, normalize, rescale) for its task-arithmetic method of this name
    (arcee-ai/mergekit merge_methods/registry.py), as the family member records them."""
    try:
        family = get_method(method).family
    except UnknownMethodError:
        return None
    return None if family is None else family.mergekit_defaults


def _unwrap(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as the wrapped method sees them: a modifier wrapping another modifier names
    that one's inner method ``inner_merge_method`` (see methods/lwptv.py)."""
    params = dict(parameters)
    params.pop("merge_method", None)
    if "inner_merge_method" in params:
        params["merge_method"] = params.pop("inner_merge_method")
    return params


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.\-/]+)?$")


def resolve_model_path(ref: Any, config_dir: Path | None, what: str) -> tuple[str, Path]:
    """Local folder or weights file for a model reference; hub ids and LoRA refs are errors."""
    if isinstance(ref, dict):
        ref = ref.get("model", ref.get("path"))
    if not isinstance(ref, (str, os.PathLike)) or not str(ref).strip():
        raise ConfigError(f"{what}: expected a local path, got {ref!r}")
    text = str(ref).strip()
    p = Path(os.path.expanduser(text))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([config_dir / p] if config_dir else [])
    for c in candidates:
        if c.exists():
            return text, c.resolve()
    if "+" in text and not any(Path(part).exists() for part in text.split("+")[:1]):
        raise ConfigError(f"{what}: {text!r} looks like a model+LoRA reference; LoRA inputs are not supported, merge the adapter first")
    if _HUB_ID.match(text):
        raise ConfigError(
            f"{what}: {text!r} is not a local folder; it looks like a Hugging Face Hub id, and tritonmerge reads "
            f"local checkpoints only. Download it first (e.g. `huggingface-cli download {text.split('@')[0]} "
            f"--local-dir ./{text.split('/')[-1].split('@')[0]}`) and give that path"
        )
    where = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"{what}: {text!r} does not exist (looked for {where})")


def load_config(source: str | os.PathLike | Mapping[str, Any], *, config_dir: str | os.PathLike | None = None) -> MergeConfig:
    """Read and validate a merge config from a YAML file, a YAML string or a dict.

    Relative model paths are looked up in the current directory, then beside the config file."""
    cdir = Path(config_dir) if config_dir is not None else None
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        text = None
        p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if p is not None:
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {p}: {exc}") from None
            cdir = cdir or p.resolve().parent
        else:
            text = str(source)
        where = f"config file {p}" if p is not None else "the config"
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
        except RecursionError:
            raise ConfigError(f"{where} is nested too deeply to be a merge config (a YAML depth bomb?)") from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a YAML mapping with at least merge_method and models")
    _check_depth(raw)
    cfg = _build(raw, cdir)
    if not isinstance(source, Mapping) and p is not None:
        cfg.source_path = p.resolve()
    return cfg


MAX_CONFIG_DEPTH = 32  # mergekit configs nest 5 or 6 levels; anything near this is not a config


def _check_depth(raw: Any) -> None:
    """Refuse absurdly nested configs up front (iteratively), before recursive code sees them."""
    stack = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"the config is nested more than {MAX_CONFIG_DEPTH} levels deep; a merge config never is")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _yaml_problem(exc: Exception) -> str:
    """A YAML parser error as one line: what went wrong and where (line, column)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def did_you_mean(word: str, choices: Any) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(raw: dict[str, Any], cdir: Path | None) -> MergeConfig:
    for key in raw:
        if key in UNSUPPORTED_KEYS:
            raise ConfigError(f"config key {key!r}: {UNSUPPORTED_KEYS[key]}")
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"unknown config key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)}; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}"
            )
    method_name = raw.get("merge_method")
    if not isinstance(method_name, str):
        raise ConfigError("merge_method is required (e.g. merge_method: ties)")
    if method_name in MERGEKIT_ONLY_METHODS:
        from .catalog import list_methods

        raise ConfigError(
            f"merge_method {method_name!r} is a mergekit method that tritonmerge does not implement; "
            f"tritonmerge implements: {', '.join(list_methods())}"
        )
    try:
        spec = get_method(method_name)
    except TritonMergeError as exc:
        raise ConfigError(f"merge_method: {exc}") from None
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models: give a non-empty list of `- model: PATH` entries")
    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise ConfigError("parameters must be a mapping of parameter name -> value")

    entries: list[ModelEntry] = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models[{i}]: expected `model: PATH` with optional `parameters`, got {m!r}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            first = sorted(extra)[0]
            raise ConfigError(
                f"models[{i}]: unknown key(s) {sorted(extra)}{did_you_mean(first, ('model', 'parameters'))}; "
                f"allowed: model, parameters"
            )
        name, path = resolve_model_path(m["model"], cdir, f"models[{i}]")
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}] ({name}): parameters must be a mapping")
        entries.append(ModelEntry(name, path, dict(params)))

    base_ref = raw.get("base_model")
    role = spec.base_role
    if base_ref is None:
        if role == "required":
            raise ConfigError(f"{method_name} merges task vectors and needs base_model: PATH")
        base = ModelEntry(entries[0].name, entries[0].path)
        experts = list(entries)
    else:
        bname, bpath = resolve_model_path(base_ref, cdir, "base_model")
        base = ModelEntry(bname, bpath)
        listed = any(e.path == base.path for e in entries)
        if role == "input":
            # mergekit adds an unlisted base model after the listed ones, as one more input
            experts = entries + ([] if listed else [base])
        elif role == "unused":
            experts = list(entries)
        else:
            # mergekit lets the base appear in `models`; methods with a base leave it out of the experts
            experts = [e for e in entries if e.path != base.path]
    if not experts:
        raise ConfigError(f"{method_name}: no models to merge besides the base model {base.name!r}")
    if not spec.modifier:
        _check_input_count(spec, experts, base_ref is not None)

    tok = raw.get("tokenizer_source")
    if tok not in (None, "base"):
        raise ConfigError(f"tokenizer_source: {tok!r} is not supported; only `base` (the base model's tokenizer is copied)")

    dtype = dtype_from_name(raw.get("dtype"), "dtype")
    out_dtype = dtype_from_name(raw.get("out_dtype"), "out_dtype") or dtype

    cfg = MergeConfig(
        merge_method=method_name,
        spec=spec,
        base=base,
        experts=experts,
        parameters=dict(global_params),
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source="base",
        raw=raw,
        base_given=base_ref is not None,
    )
    _classify_params(cfg)
    _base_origin(cfg)
    _check_required(cfg)
    # catch bad values now (scalars and gradient ends); the engine validates every tensor
    for t in (0.0, 1.0):
        validate_resolved(cfg, cfg.resolve("", t), "")
    return cfg


def _classify_params(cfg: MergeConfig) -> None:
    per_model: dict[str, bool] = {}
    literal: set[str] = set()
    for model in _param_models(cfg.spec, cfg.parameters):
        for pname, attr in param_names(model).items():
            info = model.model_fields[attr]
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            per_model[pname] = per_model.get(pname, False) or bool(extra.get("per_model"))
            if not extra.get("per_model") and "list" in str(info.annotation):
                literal.add(pname)
    allowed = set(per_model)
    sem = _mergekit_defaults(cfg._inner_name())
    mergekit_extra = set(_IGNORED_MERGEKIT_PARAMS)
    if sem is not None:
        mergekit_extra.add("rescale")  # mergekit's boolean; a no-op for task_arithmetic
    for pname in cfg.parameters:
        if pname not in allowed and pname not in mergekit_extra:
            raise ConfigError(
                f"{cfg.merge_method}: unknown parameter {pname!r} in parameters{did_you_mean(pname, allowed)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
    for m in cfg.experts:
        for pname in m.parameters:
            if pname in mergekit_extra and pname not in allowed:
                continue
            if pname not in allowed:
                raise ConfigError(
                    f"{cfg.merge_method}: unknown parameter {pname!r} for model {m.name!r}{did_you_mean(pname, allowed)}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )
            if not per_model[pname]:
                raise ConfigError(
                    f"{cfg.merge_method}: parameter {pname!r} is global (one value for all models); set it under the "
                    f"top-level `parameters`, not under model {m.name!r}"
                )
    if "rescale" in mergekit_extra and "rescale" not in allowed:
        per_model["rescale"] = False  # resolved, then dropped by _apply_mergekit
    for k in _IGNORED_MERGEKIT_PARAMS - allowed:
        per_model.pop(k, None)
    cfg._per_model = per_model
    cfg._literal_lists = literal
    # mergekit's density default is 1.0 (keep everything), ours is method-specific
    if sem is not None and "density" in per_model:
        cfg._defaults["density"] = 1.0


def _check_input_count(spec: MergeMethod, experts: list[ModelEntry], base_given: bool) -> None:
    """mergekit's input contract of the method: how many models it merges, in one line."""
    lo, hi, n = spec.min_experts, spec.max_experts, len(experts)
    if lo <= n and (hi is None or n <= hi):
        return
    need = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
    if spec.base_role == "input":
        raise ConfigError(
            f"{spec.name} takes {need} input model(s), the base model counting as one when given; the config gives {n}"
        )
    if spec.base_role == "optional" and base_given:
        raise ConfigError(
            f"{spec.name} needs {need} model(s) besides the base model, which cannot be one of them; the config gives {n}"
        )
    besides = " besides the base model" if spec.base_role == "required" else ""
    raise ConfigError(f"{spec.name} needs {need} model(s){besides}; the config gives {n}")


def _base_origin(cfg: MergeConfig) -> None:
    """An optional-base method merges raw weights when the config names no base model."""
    if cfg.spec.base_role != "optional" or "origin" not in cfg._per_model:
        return
    if not cfg.base_given:
        if cfg.parameters.get("origin", "zero") != "zero":
            raise ConfigError(
                f"{cfg.merge_method}: origin {cfg.parameters['origin']!r} needs base_model: PATH; without one the "
                f"models are merged as raw weights (origin: zero)"
            )
        cfg._defaults["origin"] = "zero"


def _check_required(cfg: MergeConfig) -> None:
    """Parameters mergekit gives no default must be set, here as there (the API defaults them
    to None and the method says so)."""
    for model in _param_models(cfg.spec, cfg.parameters):
        for pname in getattr(model, "config_required", ()):
            if pname not in cfg.parameters and not any(pname in m.parameters for m in cfg.experts):
                where = "for every model or in the global parameters" if cfg._per_model.get(pname) else "in parameters"
                raise ConfigError(
                    f"{cfg.merge_method}: parameter {pname!r} is required (mergekit gives it no default); set it {where}"
                )


def validate_resolved(cfg: MergeConfig, params: dict[str, Any], tensor_name: str) -> Any:
    """``spec.validate`` for one tensor's resolved parameters; errors become ConfigError naming
    the tensor."""
    try:
        return cfg.spec.validate(params)
    except TritonMergeError as exc:
        where = f" (tensor {tensor_name!r})" if tensor_name else ""
        raise ConfigError(f"{exc}{where}") from None
