"""tritonmerge's methods inside mergekit 0.1.5 (``mergekit-yaml`` and its Python API).

``register()`` adds ``tritonmerge_<name>`` for WUDI, TADrop, LwPTV and every method both tools
implement; ``register(override=True)`` also puts them under mergekit's own names, so an
existing YAML runs on tritonmerge's kernels unchanged. mergekit is imported only here, inside
the functions, so ``import tritonmerge`` never needs it.

mergekit calls a method once per output tensor with the models' tensors (on the GPU with
``--cuda``); each call goes through ``api.merge_one``, so CPU tensors take the fused C loops and
CUDA tensors the GPU backends. Whole-model analyses (TADrop, LwPTV, TIES with
``topk_scope: model``) run once per merge, reading the models through mergekit's loaders.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

from ..errors import ConfigError

PREFIX = "tritonmerge_"
# beyond the methods mergekit also has: tritonmerge's own
EXTRA_METHODS = ("wudi", "tadrop", "lwptv")
# tritonmerge methods whose base model plays the role of mergekit's REQUIRED base; the others
# (linear, karcher, passthrough, nuslerp, multislerp) use the base differently and are left to
# mergekit
_SUPPORTED_ROLES = ("required",)

_lock = threading.Lock()
# (method, base, experts, params, device) -> ModelDecisions of one merge; mergekit's --multi-gpu
# runs executors in threads, hence the lock
_analyses: dict[Any, Any] = {}
# the same key -> the base's tensor names, which a whole-model merge's outputs must be
_names_by_key: dict[Any, list[str]] = {}
# tritonmerge method name -> names it is registered under in mergekit
_registered: dict[str, str] = {}
_planner_hooked = False


class MergekitMissingError(ConfigError):
    pass


def _mergekit():
    try:
        import mergekit.merge_methods as mm
        import mergekit.merge_methods.registry as registry
    except ImportError as exc:
        raise MergekitMissingError(
            f"mergekit is not importable from {sys.executable} ({exc}); install mergekit 0.1.5 in this "
            f"Python or run with the Python that has it"
        ) from None
    return mm, registry


def methods_in_common() -> list[str]:
    """tritonmerge methods that mergekit also has, under the same name."""
    from ..catalog import method_table

    _, registry = _mergekit()
    theirs = {m.spec.name for m in registry.registered_methods()}
    return [
        name
        for name, spec in method_table().items()
        if name in theirs and spec.base_role in _SUPPORTED_ROLES and not name.startswith(PREFIX)
    ]


def register(prefix: str = PREFIX, override: bool = False) -> dict[str, str]:
    """Register tritonmerge's methods in mergekit's registry; returns mergekit name -> tritonmerge
    name. Calling it again is harmless (names already ours are replaced, not duplicated)."""
    _, registry = _mergekit()
    from ..catalog import get_method

    names = sorted(set(methods_in_common()) | set(EXTRA_METHODS))
    done: dict[str, str] = {}
    for name in names:
        spec = get_method(name)
        targets = [prefix + name]
        if override and name not in EXTRA_METHODS:
            targets.append(name)
        for target in targets:
            method = _build_method(target, spec)
            current = registry._METHODS.get(target)
            if current is None:
                registry.register(method)
            elif isinstance(current, _method_class()) or target == name:
                # mergekit's register() refuses a name twice and has no unregister; its get()
                # reads the module's _METHODS dict at every call, so replacing the entry there
                # is what every later look-up (planner, task adapter, model card) sees
                registry._METHODS[target] = method
            else:
                raise ConfigError(f"mergekit already has a method named {target!r} that is not tritonmerge's")
            _registered[target] = name
            done[target] = name
    _hook_planner()
    return done


# -- the mergekit method ----------------------------------------------------------------------

_METHOD_CLASS = None


def _method_class():
    global _METHOD_CLASS
    if _METHOD_CLASS is not None:
        return _METHOD_CLASS
    mm, _ = _mergekit()

    class TritonMergeMethod(mm.GroupMergeMethod):
        """One tritonmerge method as a mergekit group method."""

        def __init__(self, spec: Any, tm_spec: Any):
            self.spec = spec
            self.tm_spec = tm_spec

        def merge_group(self, group: Any, /, **parameters: Any):
            return _merge_group(self.spec.name, self.tm_spec, group, parameters)

    _METHOD_CLASS = TritonMergeMethod
    return _METHOD_CLASS


def _param_rows(tm_spec: Any) -> list[dict[str, Any]]:
    """Parameter rows of a method; for a modifier also those of every method it may wrap
    (which one is known only from the YAML, so they all get a spec and the planner hook
    refuses what the chosen one does not take)."""
    from ..catalog import method_table
    from ..params import describe_params

    rows = {r["name"]: dict(r) for r in describe_params(tm_spec.params)}
    if tm_spec.modifier:
        for inner in method_table().values():
            for r in describe_params(inner.params):
                if r["name"] not in rows:
                    # None = not given: the wrapped method's own default applies
                    rows[r["name"]] = {**r, "default": None, "required": False}
    return list(rows.values())


def _build_method(name: str, tm_spec: Any) -> Any:
    mm, _ = _mergekit()
    from mergekit.merge_methods.base import MISSING, ParameterSpec

    sem = _sem(tm_spec.name)
    params = []
    for row in _param_rows(tm_spec):
        default = MISSING if row["required"] else row["default"]
        if isinstance(default, list):
            default = tuple(default)  # mergekit hashes resolved parameters
        if sem is not None and row["name"] == "density":
            default = 1.0  # mergekit keeps everything unless told otherwise
        if sem is not None and row["name"] == "rescale":
            default = sem[2]
        if sem is not None and row["name"] == "normalize":
            default = sem[1]
        if sem is not None and row["name"] == "disjoint":
            default = None  # follows normalize, as in mergekit
        scope = mm.ParameterScope.NON_BASE if row["per_model"] else mm.ParameterScope.SHARED
        # tritonmerge validates the values itself, so its messages (bounds, choices) reach the user
        params.append(ParameterSpec(row["name"], Any, scope, default=default, description=row["description"]))
    if sem is not None and not any(p.name == "rescale" for p in params):
        params.append(ParameterSpec("rescale", Any, mm.ParameterScope.SHARED, default=sem[2]))
    spec = mm.MergeMethodSpec(
        name=name,
        parameters=tuple(params),
        contract=mm.InputContract(
            base=mm.BasePolicy.REQUIRED,
            min_non_base=tm_spec.min_experts,
            max_non_base=tm_spec.max_experts,
        ),
        pretty_name=f"{tm_spec.name} (tritonmerge)",
        reference_url=tm_spec.reference or None,
    )
    return _method_class()(spec, tm_spec)


def _sem(name: str) -> tuple[bool, bool, bool] | None:
    """mergekit's (consensus, normalize, rescale) defaults where the method is one of its
    task-arithmetic family, through modifiers too (the inner method is named in the YAML)."""
    from ..catalog import get_method

    family = get_method(name).family
    return None if family is None else family.mergekit_defaults


def _tm_params(tm_spec: Any, group: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """mergekit's bound values -> tritonmerge's parameters, with mergekit's meaning of
    ``rescale`` (a boolean) and of ``normalize`` (TIES' disjoint mean)."""
    from mergekit.merge_methods.base import PerInputValues

    out: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, PerInputValues):
            value = value.values_for(group.non_base)
            if all(v is None for v in value):
                continue
        if value is None:
            continue
        out[key] = value
    inner = out.get("merge_method") if tm_spec.modifier else tm_spec.name
    sem = _sem(inner) if isinstance(inner, str) else None
    if sem is not None:
        from ..catalog import get_method
        from ..params import param_names

        known = set(param_names(get_method(inner).params))
        rescale = out.pop("rescale", sem[2])
        if "rescale" in known:
            out["rescale"] = ("l1" if rescale else "none") if isinstance(rescale, bool) else rescale
        if sem[0] and "disjoint" in known and "disjoint" not in out:
            normalize = bool(out.get("normalize", sem[1]))
            out["disjoint"] = "mean" if normalize else "sum"
            out["normalize"] = normalize
        if "density" in known:
            out.setdefault("density", 1.0)
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _merge_group(name: str, tm_spec: Any, group: Any, parameters: dict[str, Any]):
    from .. import api
    from ..context import TensorContext, TensorDecisions
    from ..errors import TritonMergeError

    base = group.base.tensor
    experts = [e.tensor for e in group.non_base]
    tensor_name = group.metadata.name or ""
    raw = _tm_params(tm_spec, group, parameters)
    try:
        p = tm_spec.validate(raw)
    except TritonMergeError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    decisions = None
    if tm_spec.needs_analysis(p):
        key = (
            name,
            group.base.id,
            tuple(e.id for e in group.non_base),
            _freeze(raw),
            str(base.device),
        )
        decisions = _analysis(name, tm_spec, p, key, group, base.device)
        if tensor_name not in _names_by_key[key]:
            raise ConfigError(
                f"{name}: output tensor {tensor_name!r} is not a tensor of the base model; a whole-model "
                f"method needs the output to have the base's tensor names (no slices or layer_range)"
            )
    ctx = TensorContext(
        name=tensor_name,
        decisions=decisions.tensors.get(tensor_name, TensorDecisions()) if decisions is not None else TensorDecisions(),
    )
    return api.merge_one(tm_spec, p, base, experts, ctx)


def _analysis(name: str, tm_spec: Any, p: Any, key: Any, group: Any, device: Any) -> Any:
    with _lock:
        found = _analyses.get(key)
        if found is not None:
            return found
        from .. import api

        source = MergekitSource(group.base.id, [e.id for e in group.non_base], device, label=name)
        decisions = api.analyze(tm_spec, p, source)
        source.close()
        _analyses[key] = decisions
        _names_by_key[key] = list(source.names)
        return decisions


class MergekitSource:
    """tritonmerge's TensorSource over mergekit's own loaders (``LoaderCache``): the analysis
    reads the models the way mergekit's merge does (local folders, HF cache, LoRA), in the
    base's tensor order, with a progress bar."""

    def __init__(self, base: Any, experts: Sequence[Any], device: Any, label: str = ""):
        import torch
        from mergekit.io.tasks import LoaderCache

        self._loaders = [LoaderCache().get(m) for m in (base, *experts)]
        self.names = list(self._loaders[0].index.tensor_paths)
        self.n_experts = len(experts)
        self._device = torch.device(device)
        self._meta: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._bar = None
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.names), desc=f"{label}: whole-model analysis", unit="tensor", leave=False)
        except ImportError:
            print(f"{label}: whole-model analysis of {len(self.names)} tensors", file=sys.stderr)
        self._seen: set[str] = set()

    @property
    def device(self):
        return self._device

    def _load_one(self, i: int, name: str):
        return self._loaders[i].get_tensor(name, device=str(self._device))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._metadata(name)[0]

    def dtype(self, name: str):
        return self._metadata(name)[1]

    def _metadata(self, name: str):
        if name not in self._meta:
            t = self._load_one(0, name)
            self._meta[name] = (tuple(t.shape), t.dtype)
        return self._meta[name]

    def load(self, name: str):
        base = self._load_one(0, name)
        experts = [self._load_one(i, name) for i in range(1, len(self._loaders))]
        self._meta[name] = (tuple(base.shape), base.dtype)
        if self._bar is not None and name not in self._seen:
            self._seen.add(name)
            self._bar.update(1)
        return base, experts

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- refusing what mergekit would silently ignore ---------------------------------------------


def _hook_planner() -> None:
    """mergekit resolves only the parameters a method's spec declares (parameter_resolver), so a
    misspelt parameter is dropped without a word. Its planner sees the whole config first: wrap
    its constructor (in memory, not its files) to check the YAML of our methods there."""
    global _planner_hooked
    if _planner_hooked:
        return
    from mergekit.plan import MergePlanner

    original = MergePlanner.__init__

    def __init__(self, config, *args, **kwargs):
        if config.merge_method in _registered:
            check_config(config)
        original(self, config, *args, **kwargs)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    MergePlanner.__init__ = __init__
    _planner_hooked = True


def _settings(config: Any):
    """(where, parameters dict) of every parameter block of a mergekit config."""
    yield "parameters", config.parameters
    for m in config.models or []:
        yield f"model {m.model}", m.parameters
    for i, s in enumerate(config.slices or []):
        yield f"slices[{i}]", s.parameters
        for src in s.sources:
            yield f"slices[{i}] model {src.model}", src.parameters
    for mod_name, mod in (config.modules or {}).items():
        yield f"modules.{mod_name}", mod.parameters
        for m in mod.models or []:
            yield f"modules.{mod_name} model {m.model}", m.parameters
        for i, s in enumerate(mod.slices or []):
            yield f"modules.{mod_name}.slices[{i}]", s.parameters
            for src in s.sources:
                yield f"modules.{mod_name}.slices[{i}] model {src.model}", src.parameters


def check_config(config: Any) -> None:
    """Refuse unknown parameters, and slices for whole-model methods, with one-line errors."""
    import difflib

    from ..catalog import get_method, method_table
    from ..params import describe_params

    name = config.merge_method
    tm_spec = get_method(_registered[name])
    chain = [tm_spec.name]
    if tm_spec.modifier:
        # the wrapped method(s) are named in the YAML's global parameters
        for key in ("merge_method", "inner_merge_method"):
            inner = (config.parameters or {}).get(key)
            if isinstance(inner, str) and inner in method_table():
                chain.append(inner)
    allowed: set[str] = set()
    per_model: set[str] = set()
    for method in chain:
        for row in describe_params(get_method(method).params):
            allowed.add(row["name"])
            if row["per_model"]:
                per_model.add(row["name"])
    if any(_sem(n) is not None for n in chain):
        allowed.add("rescale")  # mergekit's boolean form of it
    for where, block in _settings(config):
        for key in block or {}:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{name}: unknown parameter {key!r} in {where}{hint}; allowed: {', '.join(sorted(allowed))}"
                )
            if " model " in f" {where}" and key not in per_model and key != "rescale":
                # mergekit reads a global parameter from the global blocks only: this value would be dropped
                raise ConfigError(
                    f"{name}: parameter {key!r} is global (one value for all models); set it under the "
                    f"top-level parameters, not in {where}"
                )
    if _whole_model(tm_spec, config) and (config.slices or config.modules):
        raise ConfigError(
            f"{name}: slices/modules are not supported: this method analyses the whole model and needs the "
            f"output tensors to be the base model's, one for one (use models: without layer_range)"
        )


def _whole_model(tm_spec: Any, config: Any) -> bool:
    if tm_spec.modifier or tm_spec.analyze is None:
        return tm_spec.modifier
    scalars = {k: v for k, v in (config.parameters or {}).items() if isinstance(v, (int, float, str, bool))}
    try:
        return bool(tm_spec.needs_analysis(tm_spec.validate(scalars)))
    except Exception:
        return True


# -- the command line -------------------------------------------------------------------------


def run_mergekit_yaml(argv: Sequence[str], override: bool = True) -> int:
    """``mergekit-yaml ARGS`` with tritonmerge's methods registered; returns the exit code."""
    _mergekit()
    try:
        from mergekit.scripts.run_yaml import main
    except ImportError as exc:
        raise MergekitMissingError(f"mergekit's mergekit-yaml entry is not importable ({exc})") from None
    register(override=override)
    try:
        main.main(args=list(argv), prog_name="tritonmerge mergekit-yaml", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    except ConfigError:
        raise
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        # the planner and the executor wrap our errors in theirs; find ours for a one-line report
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise
    return 0
