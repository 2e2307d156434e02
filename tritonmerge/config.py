"""Merge configurations: mergekit's YAML schema (for the methods we share) -> ``MergeConfig``.

Accepted keys: ``merge_method``, ``base_model``, ``models`` (each ``model`` plus optional
``parameters``), ``parameters`` (global), ``dtype`` (inputs are cast to it before merging),
``out_dtype`` (default: ``dtype``, else each tensor's stored dtype), ``tokenizer_source``, the
``tokenizer:`` block and ``chat_template`` (tritonmerge/tokenizer.py), and ``slices`` in place of ``models`` (``_build_slices``, ``slice_tensor_map``; docs/mergekit.md).
A model reference is a local folder or weights file, or mergekit's ``MODEL+LORA_ADAPTER`` (a
local PEFT LoRA folder applied to the model before merging: ``resolve_model_path``, lora.py).

A parameter value is a scalar, a *gradient* (a list of numbers interpolated over the layer
index, ``t = layer / (n_layers - 1)``; tensors outside the layers take t = 0, as in mergekit),
or a *filter list* ``[{filter: substring, value: ...}, ...]``
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
from typing import Any, Mapping, Sequence

import torch
import yaml

from .errors import CheckpointError, ConfigError, TritonMergeError, UnknownMethodError
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

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name"}
UNSUPPORTED_KEYS = {
    "modules": "multi-module configs are not supported; list whole models under `models`",
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
class SliceDef:
    """One output slice: its sources' layer ranges (all the same length) and the roles the
    method sees, decided per slice as mergekit does (a slice may name its own base_model)."""

    sources: list[tuple[ModelEntry, tuple[int, int]]]
    base: ModelEntry
    experts: list[ModelEntry]  # each with its source's parameters
    parameters: dict[str, Any] = field(default_factory=dict)
    base_given: bool = True

    @property
    def n_layers(self) -> int:
        a, b = self.sources[0][1]
        return b - a


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
    # tokenizer_source other than base, a `tokenizer:` block or chat_template (tritonmerge/tokenizer.py)
    tokenizer: Any = None
    raw: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None  # the YAML file it was read from, if any
    # False: the config names no base_model and ``base`` is the first model, a stand-in that
    # the method does not merge as a base
    base_given: bool = True
    # user-facing parameter names -> True if per-model
    _per_model: dict[str, bool] = field(default_factory=dict)
    # a `slices:` config; then ``base``/``experts`` are those of the first slice
    slices: list[SliceDef] | None = None
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

    def resolve(
        self,
        tensor_name: str = "",
        t: float = 0.0,
        slice_index: int | None = None,
        input_names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Parameters for one tensor at relative depth ``t`` in [0, 1]. In a slices config,
        ``slice_index`` picks the slice whose parameters and sources apply, and per-model values
        are matched against each expert's input tensor name (``input_names``), as in mergekit."""
        experts, scopes = self.experts, [self.parameters]
        if slice_index is not None:
            sl = self.slices[slice_index]
            experts, scopes = sl.experts, [sl.parameters, self.parameters]
        names = list(input_names) if input_names is not None else [tensor_name] * len(experts)

        def first(chain: Sequence[Mapping[str, Any]], pname: str, name: str, literal: bool) -> Any:
            for scope in chain:
                if pname in scope:
                    v = evaluate(scope[pname], name, t, literal)
                    if v is not None:
                        return v
            return None

        out: dict[str, Any] = {}
        for pname, per_model in self._per_model.items():
            literal = pname in self._literal_lists
            if per_model:
                values = [first([m.parameters, *scopes], pname, n, literal) for m, n in zip(experts, names)]
                if all(v is None for v in values):
                    if pname in self._defaults:
                        out[pname] = self._defaults[pname]
                    continue
                default = self._defaults.get(pname, self._field_default(pname))
                if any(v is None for v in values) and default is None:
                    missing = [m.name for m, v in zip(experts, values) if v is None]
                    raise ConfigError(
                        f"parameter {pname!r} has no value for model(s) {missing} at tensor {tensor_name!r}; "
                        f"set it for every model or in the global parameters"
                    )
                out[pname] = [default if v is None else v for v in values]
            else:
                v = first(scopes, pname, tensor_name, literal)
                if v is not None:
                    out[pname] = v
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
        if self.slices is not None:
            if self.raw.get("base_model") is not None:
                d["base_model"] = model_ref(self.base.path)
            d["slices"] = [_slice_dict(sl) for sl in self.slices]
        else:
            if self.base_given:
                d["base_model"] = model_ref(self.base.path)
            d["models"] = [
                {"model": model_ref(m.path), **({"parameters": m.parameters} if m.parameters else {})} for m in self.experts
            ]
        if self.parameters:
            d["parameters"] = self.parameters
        if self.dtype is not None:
            d["dtype"] = str(self.dtype).replace("torch.", "")
        if self.out_dtype is not None:
            d["out_dtype"] = str(self.out_dtype).replace("torch.", "")
        if self.tokenizer is not None:
            d.update(self.tokenizer.to_dict())
        if "tokenizer" not in d:
            d.setdefault("tokenizer_source", self.tokenizer_source)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _slice_dict(sl: SliceDef) -> dict[str, Any]:
    d: dict[str, Any] = {
        "sources": [
            {"model": model_ref(m.path), "layer_range": list(r), **({"parameters": m.parameters} if m.parameters else {})}
            for m, r in sl.sources
        ]
    }
    if sl.base_given:
        d["base_model"] = model_ref(sl.base.path)
    if sl.parameters:
        d["parameters"] = sl.parameters
    return d


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


def _output_settings(raw: Mapping[str, Any]) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(dtype, out_dtype) of a config (its tokenizer settings: tokenizer.parse_tokenizer)."""
    dtype = dtype_from_name(raw.get("dtype"), "dtype")
    return dtype, dtype_from_name(raw.get("out_dtype"), "out_dtype") or dtype


def tensor_t(name: str, n_layers: int) -> float:
    """Relative depth of a tensor for gradients: layer/(n_layers-1); every tensor outside the
    layers (embeddings, final norm, lm_head: mergekit's pre and post weights) 0, as mergekit
    0.1.5's planner evaluates them (MergePlanner reads their parameters at t = 0)."""
    from .context import layer_index

    layer = layer_index(name)
    if layer is None:
        return 0.0
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


class LoraModelPath(type(Path())):
    """The model folder of a ``model+lora`` reference, carrying the adapter folder (``lora``).

    It opens, reads and prints as the model's own folder, but compares and hashes with its
    adapter, so ``X`` and ``X+adapter`` are two different inputs wherever models are told apart
    by path (roles, slices, vocabularies); the engine applies the adapter (tritonmerge/lora.py)."""

    lora: Path | None = None

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and getattr(self, "lora", None) == getattr(other, "lora", None)

    def __hash__(self) -> int:
        return hash((super().__hash__(), getattr(self, "lora", None)))

    def __reduce__(self):  # pickling and copying keep the adapter
        return (_lora_path, (str(self), getattr(self, "lora", None)))


def _lora_path(path: str, lora: Path | None) -> Path:
    return with_lora(Path(path), lora) if lora is not None else Path(path)


def with_lora(path: Path, lora: Path) -> LoraModelPath:
    out = LoraModelPath(path)
    out.lora = lora
    return out


def model_ref(path: Path) -> str:
    """A model's reference in a resolved config: its folder, ``+`` its LoRA adapter if any."""
    lora = getattr(path, "lora", None)
    return f"{path}+{lora}" if lora is not None else str(path)


def resolve_model_path(ref: Any, config_dir: Path | None, what: str) -> tuple[str, Path]:
    """Local folder or weights file for a model reference, or ``MODEL+LORA_ADAPTER`` (a local PEFT
    LoRA folder applied to the model: a ``LoraModelPath``); hub ids are errors."""
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
    if "+" in text:
        # mergekit's `MODEL+LORA`: a PEFT LoRA adapter folder applied to the model first
        chunks = text.split("+")
        if len(chunks) != 2 or not all(c.strip() for c in chunks):
            raise ConfigError(f"{what}: {text!r} is not MODEL or MODEL+LORA_ADAPTER (mergekit's model reference)")
        try:
            _, model = resolve_model_path(chunks[0], config_dir, what)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the model of the model+LoRA reference {text!r})") from None
        lp = Path(os.path.expanduser(chunks[1].strip()))
        lcands = [lp] if lp.is_absolute() else [Path.cwd() / lp] + ([config_dir / lp] if config_dir else [])
        found = next((c for c in lcands if c.is_dir()), None)
        if found is None:
            hub = " (it looks like a Hugging Face Hub id; download the adapter first and give its folder)" if _HUB_ID.match(chunks[1].strip()) else ""
            raise ConfigError(
                f"{what}: LoRA adapter {chunks[1].strip()!r} is not a local folder (looked for "
                f"{' or '.join(str(c) for c in lcands)}); tritonmerge reads local adapter folders only{hub}"
            )
        from .lora import LoraAdapter

        LoraAdapter.open(found.resolve(), f"{what}: LoRA adapter")  # adapter_config.json and weight headers
        return text, with_lora(model, found.resolve())
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
    from .tokenizer import parse_tokenizer

    cfg.tokenizer = parse_tokenizer(raw, lambda ref, what: resolve_model_path(ref, cdir, what))
    tok = cfg.tokenizer
    if tok is not None and cfg.slices is not None and (tok.source not in (None, "base") or tok.tokens or tok.pad_to_multiple_of):
        raise ConfigError("a tokenizer other than the base's is not supported with `slices` yet; list whole models under `models`")
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
    if "slices" in raw:
        return _build_slices(raw, cdir, spec, method_name)
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

    dtype, out_dtype = _output_settings(raw)

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


def _roles(spec: MergeMethod, method_name: str, entries: list[ModelEntry], base: ModelEntry | None, where: str) -> tuple[ModelEntry, list[ModelEntry]]:
    """(base, experts) of one slice: mergekit gathers a slice's tensors from its sources only,
    so a base model the method merges must be one of them."""
    role = spec.base_role
    if base is None:
        if role == "required":
            raise ConfigError(f"{where}: {method_name} merges task vectors and needs base_model: PATH")
        return ModelEntry(entries[0].name, entries[0].path), list(entries)
    listed = any(e.path == base.path for e in entries)
    if role == "unused":
        # the method never reads it: stand in a source so the base input exists in each layer
        return (base if listed else ModelEntry(entries[0].name, entries[0].path)), list(entries)
    if not listed:
        raise ConfigError(f"{where}: the base model {base.name!r} must be one of the slice's sources (mergekit reads a slice's tensors from its sources only)")
    if role == "input":
        return base, list(entries)
    return base, [e for e in entries if e.path != base.path]


def _build_slices(raw: dict[str, Any], cdir: Path | None, spec: MergeMethod, method_name: str) -> MergeConfig:
    """A ``slices:`` config (mergekit's OutputSliceDefinition / InputSliceDefinition)."""
    if "models" in raw:
        raise ConfigError("give either `models` or `slices`, not both (as mergekit requires)")
    if spec.modifier:
        raise ConfigError(f"{method_name} runs a whole-model analysis, which is not supported with `slices`; list whole models under `models`")
    slices_raw = raw.get("slices")
    if not isinstance(slices_raw, list) or not slices_raw:
        raise ConfigError("slices: give a non-empty list of `- sources: [{model: PATH, layer_range: [a, b]}]` entries")
    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise ConfigError("parameters must be a mapping of parameter name -> value")
    top_base = None
    if raw.get("base_model") is not None:
        bname, bpath = resolve_model_path(raw["base_model"], cdir, "base_model")
        top_base = ModelEntry(bname, bpath)
    slices: list[SliceDef] = []
    for i, sl in enumerate(slices_raw):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{where}: expected `sources:` with a non-empty list of `model` + `layer_range` entries")
        extra = set(sl) - {"sources", "base_model", "parameters"}
        if extra:
            raise ConfigError(f"{where}: unknown or unsupported key(s) {sorted(extra)}; allowed: sources, base_model, parameters")
        sources: list[tuple[ModelEntry, tuple[int, int]]] = []
        for j, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{w}: expected `model: PATH` and `layer_range: [a, b]`, got {src!r}")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"{w}: unknown key(s) {sorted(extra)}; allowed: model, layer_range, parameters")
            lr = src["layer_range"]
            if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr) and 0 <= lr[0] < lr[1]):
                raise ConfigError(f"{w}: layer_range must be [first, end) with 0 <= first < end, got {lr!r}")
            name, path = resolve_model_path(src["model"], cdir, w)
            params = src.get("parameters") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{w} ({name}): parameters must be a mapping")
            if any(e.path == path for e, _ in sources):
                raise ConfigError(f"{w}: model {name!r} appears twice in one slice; mergekit keys a slice's inputs by model")
            sources.append((ModelEntry(name, path, dict(params)), (lr[0], lr[1])))
        lengths = {b - a for _, (a, b) in sources}
        if len(lengths) != 1:
            raise ConfigError(f"{where}: all sources of a slice must have the same number of layers, got {sorted(lengths)}")
        sparams = sl.get("parameters") or {}
        if not isinstance(sparams, dict):
            raise ConfigError(f"{where}: parameters must be a mapping")
        base = top_base
        if sl.get("base_model") is not None:
            bname, bpath = resolve_model_path(sl["base_model"], cdir, f"{where}.base_model")
            base = ModelEntry(bname, bpath)
        entries = [e for e, _ in sources]
        sbase, experts = _roles(spec, method_name, entries, base, where)
        _check_input_count(spec, experts, base is not None)
        slices.append(SliceDef(sources, sbase, experts, dict(sparams), base is not None))
    if len({len(s.experts) for s in slices}) != 1 or len({s.base_given for s in slices}) != 1:
        raise ConfigError("every slice must give the method the same number of models, and a base model in all or none of them")

    dtype, out_dtype = _output_settings(raw)
    cfg = MergeConfig(
        merge_method=method_name,
        spec=spec,
        base=slices[0].base,
        experts=slices[0].experts,
        parameters=dict(global_params),
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source="base",
        raw=raw,
        base_given=slices[0].base_given,
        slices=slices,
    )
    _classify_params(cfg)
    _base_origin(cfg)
    _check_required(cfg)
    for k in range(len(slices)):
        for t in (0.0, 1.0):
            validate_resolved(cfg, cfg.resolve("", t, slice_index=k), "")
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
    for k, sl in enumerate(cfg.slices or ()):
        for pname in sl.parameters:
            if pname not in allowed and pname not in mergekit_extra:
                raise ConfigError(
                    f"{cfg.merge_method}: unknown parameter {pname!r} in slices[{k}].parameters{did_you_mean(pname, allowed)}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )
    every = cfg.experts if cfg.slices is None else [m for sl in cfg.slices for m in sl.experts]
    for m in every:
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
    n = len(experts)
    need = spec.experts_wanted(n)
    if need is None:
        return
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
            scopes = [m.parameters for m in cfg.experts] + [
                d for sl in cfg.slices or () for d in (sl.parameters, *(m.parameters for m in sl.experts))
            ]
            if pname not in cfg.parameters and not any(pname in d for d in scopes):
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


@dataclass
class SliceTensor:
    """Where one output tensor of a slices config comes from: the slice whose parameters apply,
    the gradient position ``t`` and, for the base and each expert in order, (model path, input
    tensor name)."""

    slice_index: int
    t: float
    inputs: list[tuple[Path, str]]


def slice_tensor_map(
    cfg: MergeConfig, tensor_names: Mapping[Path, Sequence[str]], n_layers: Mapping[Path, int]
) -> tuple[dict[str, SliceTensor], int]:
    """mergekit's MergePlanner over one module: the first slice's models give the non-layer
    tensors before the layers (embeddings), the last slice's those after (norm, lm_head), both
    at t = 0; output layers are numbered on from 0 across slices, and within a slice of n layers
    the j-th is at t = j / (n - 1) (t = 1 for a one-layer slice). Returns (output tensor ->
    source, number of output layers)."""
    from .context import _LAYER_RE

    assert cfg.slices is not None
    for k, sl in enumerate(cfg.slices):
        for m, (a, b) in sl.sources:
            if b > n_layers[m.path]:
                raise ConfigError(f"slices[{k}]: layer_range [{a}, {b}] of {m.name!r} goes past its {n_layers[m.path]} layers")

    def roles(sl: SliceDef) -> list[ModelEntry]:
        return [sl.base, *sl.experts]

    layouts: dict[Path, dict[int, list[tuple[str, tuple[int, int]]]]] = {}
    pre: list[str] = []
    post: list[str] = []
    for path in {m.path for sl in cfg.slices for m, _ in sl.sources}:
        layouts[path] = {}
        for name in tensor_names[path]:
            m = _LAYER_RE.search(name)
            if m is not None:
                layouts[path].setdefault(int(m.group(1)), []).append((name, m.span(1)))
    for name in tensor_names[cfg.slices[0].sources[0][0].path]:
        if _LAYER_RE.search(name) is None:
            (pre if re.search(r"embed|wte|wpe|tok_embeddings", name) else post).append(name)

    out: dict[str, SliceTensor] = {}

    def plain(names: list[str], k: int) -> None:
        sl = cfg.slices[k]
        for name in names:
            for e in roles(sl):
                if name not in tensor_names[e.path]:
                    raise CheckpointError(f"model {e.name!r} has no tensor {name!r} (needed by slices[{k}])")
            out[name] = SliceTensor(k, 0.0, [(e.path, name) for e in roles(sl)])

    plain(pre, 0)
    layer_out = 0
    for k, sl in enumerate(cfg.slices):
        # a layer's tensors are those of the slice's first source; the others must match
        lead, (a0, _) = sl.sources[0]
        start = {e.path: r[0] for e, r in sl.sources}
        n = sl.n_layers
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for name, (s0, s1) in layouts[lead.path].get(a0 + j, []):
                inputs = []
                for e in roles(sl):
                    src = f"{name[:s0]}{start[e.path] + j}{name[s1:]}"
                    if src not in tensor_names[e.path]:
                        raise CheckpointError(f"model {e.name!r} has no tensor {src!r} (needed by slices[{k}])")
                    inputs.append((e.path, src))
                out[f"{name[:s0]}{layer_out}{name[s1:]}"] = SliceTensor(k, t, inputs)
            layer_out += 1
    plain(post, len(cfg.slices) - 1)
    return out, layer_out
