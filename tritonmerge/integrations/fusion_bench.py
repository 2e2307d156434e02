"""tritonmerge's methods as a FusionBench algorithm (``fusion_bench`` 0.2.x, tested with 0.2.33).

``TritonMergeAlgorithm(merge_method, **params)`` is a ``fusion_bench.method.BaseAlgorithm``:
``run(modelpool)`` merges the pool's experts into its ``_pretrained_`` model with any tritonmerge
method (wudi, ties, tadrop, lwptv, task_arithmetic, ...) and returns the merged ``nn.Module``.
The parameters are tritonmerge's (``tritonmerge.merge_state_dicts``); a method that itself has
a ``merge_method`` parameter (tadrop, lwptv) takes it inside ``parameters={...}``, as in
mergekit's schema.

Two ways to run, chosen by ``mode``:

* ``"memory"``: the pool's models are loaded (``load_pretrained_model``, ``load_model``), their
  state dicts merged by ``merge_state_dicts``, and the result loaded into the pretrained module
  (a copy of it when the pool holds module instances, so the pool's models stay untouched).
* ``"path"``: the pool's models are checkpoints on disk (``get_model_path`` names a local
  folder or file for every model): tritonmerge's disk engine (``run_merge``, the engine of
  ``tritonmerge merge``) streams them tensor by tensor into a merged checkpoint (kept in
  ``save_dir`` if given, else in a temporary folder), which is loaded into the pretrained
  module. Only the pretrained module and the merged tensors are ever held in memory, never
  the N experts. Parameters are written into the engine's config explicitly, so both modes
  give the same tensors (checked before the merge runs).
* ``"auto"`` (default): ``path`` when every model has a local path, else ``memory``.

FusionBench is imported only when the class is first used (``TritonMergeAlgorithm`` is built
on first access of the module attribute), so ``import tritonmerge`` never needs it. The Hydra
configs ``method=tritonmerge/<name>`` live in ``fusion_bench_config/`` beside this module and
are found through the search-path plugin in ``hydra_plugins/tritonmerge_fusion_bench``
(docs/fusion_bench.md).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

log = logging.getLogger("tritonmerge")

PRETRAINED = "_pretrained_"
MODES = ("auto", "memory", "path")
# the Hydra search path entry of the shipped configs (see hydra_plugins/tritonmerge_fusion_bench)
CONFIG_PACKAGE = "tritonmerge.integrations.fusion_bench_config"

_CLASS = None


class FusionBenchMissingError(ConfigError):
    pass


def _fusion_bench():
    try:
        from fusion_bench.method import BaseAlgorithm
    except ImportError as exc:
        raise FusionBenchMissingError(
            f"fusion_bench is not importable from {sys.executable} ({exc}); install it with "
            f"pip install 'tritonmerge[fusion-bench]' or run with the Python that has it"
        ) from None
    return BaseAlgorithm


def __getattr__(name: str) -> Any:
    if name == "TritonMergeAlgorithm":
        return algorithm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra hands an instantiated class) -> dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - fusion_bench always brings omegaconf
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def algorithm_class():
    """The ``TritonMergeAlgorithm`` class (built once, on fusion_bench's ``BaseAlgorithm``)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    BaseAlgorithm = _fusion_bench()

    class TritonMergeAlgorithm(BaseAlgorithm):
        """Merge a FusionBench model pool with a tritonmerge method (see the module docstring).

        ``merge_method``: a tritonmerge method name. ``parameters`` and ``**params``: its
        parameters (``params`` win on a clash). ``mode``: auto | memory | path. ``device``:
        where the merge computes (cpu, cuda; memory mode moves the tensors there). ``backend``:
        tritonmerge's backend choice (None = auto). ``save_dir``: path mode keeps the merged
        checkpoint there (else a temporary folder, removed after loading)."""

        def __init__(
            self,
            merge_method: str,
            parameters: Mapping[str, Any] | None = None,
            mode: str = "auto",
            device: str | None = None,
            backend: str | None = None,
            save_dir: str | None = None,
            **params: Any,
        ):
            meta = {k: params.pop(k) for k in list(params) if k in ("_usage_", "_version_", "_recursive_")}
            super().__init__(**meta)
            merge_method = plain(merge_method)
            if not isinstance(merge_method, str):
                raise ConfigError(f"tritonmerge: merge_method must be a method name, got {merge_method!r}")
            if mode not in MODES:
                raise ConfigError(f"tritonmerge: mode must be one of {', '.join(MODES)}, got {mode!r}")
            self.merge_method = merge_method
            self.params = {**(plain(parameters) or {}), **plain(params)}
            self.mode = mode
            self.device = device
            self.backend = backend
            self.save_dir = save_dir
            self.report = None  # the MergeReport of the last in-memory run
            self.result = None  # the engine's MergeResult of the last path run
            self.last_mode = None
            from .. import api

            # fail at instantiation, not after the models are loaded
            api.get_method(merge_method).validate(dict(self.params))

        @property
        def config(self):
            from omegaconf import OmegaConf

            return OmegaConf.create(
                {
                    "_target_": f"{__name__}.TritonMergeAlgorithm",
                    "merge_method": self.merge_method,
                    "parameters": self.params,
                    "mode": self.mode,
                    "device": self.device,
                    "backend": self.backend,
                    "save_dir": self.save_dir,
                }
            )

        def run(self, modelpool: Any):
            """The merged ``nn.Module``. ``modelpool``: a FusionBench ``BaseModelPool`` (or a
            dict of name -> module, with the base as ``_pretrained_``)."""
            from fusion_bench.modelpool import BaseModelPool

            if isinstance(modelpool, Mapping):
                modelpool = BaseModelPool(dict(modelpool))
            if not isinstance(modelpool, BaseModelPool):
                raise ConfigError(
                    f"tritonmerge {self.merge_method}: expected a fusion_bench BaseModelPool or a dict of models, "
                    f"got {type(modelpool).__name__}"
                )
            if not modelpool.has_pretrained:
                raise ConfigError(
                    f"tritonmerge {self.merge_method}: the model pool has no {PRETRAINED!r} model; "
                    f"tritonmerge merges task vectors against it"
                )
            paths = model_paths(modelpool) if self.mode != "memory" else None
            if self.mode == "path" and paths is None:
                raise ConfigError(
                    f"tritonmerge {self.merge_method}: mode='path' needs a local checkpoint path for every model "
                    f"of the pool (get_model_path); use mode='memory' or 'auto'"
                )
            if paths is not None:
                reason = path_mode_refusal(self.merge_method, self.params, paths)
                if reason and self.mode == "path":
                    raise ConfigError(f"tritonmerge {self.merge_method}: mode='path' is not possible: {reason}")
                if reason:
                    log.warning("tritonmerge %s: merging in memory (%s)", self.merge_method, reason)
                    paths = None
            if paths is not None:
                self.last_mode = "path"
                return self._run_paths(modelpool, paths)
            self.last_mode = "memory"
            return self._run_memory(modelpool)

        def _run_memory(self, modelpool: Any):
            import torch

            from .. import api
            from ..context import MergeReport

            with torch.no_grad():
                pretrained = modelpool.load_pretrained_model()
                base = state_dict_of(pretrained, self.device)
                experts = []
                for name in modelpool.model_names:
                    model = modelpool.load_model(name)
                    experts.append(state_dict_of(model, self.device))
                    del model
                self.report = MergeReport()
                merged = api.merge_state_dicts(
                    self.merge_method, base, experts, backend=self.backend, report=self.report, **self.params
                )
                del experts
                # a pool of module instances hands out its own objects: never write into those
                return load_into_copy(pretrained, merged, copy_module=modelpool.has_instance_models)

        def _run_paths(self, modelpool: Any, paths: list[str]):
            import torch

            from ..engine import MergeOptions, run_merge

            config = engine_config(self.merge_method, self.params, paths[0], paths[1:])
            tmp = None
            if self.save_dir is not None:
                out = Path(self.save_dir)
            else:
                tmp = tempfile.mkdtemp(prefix="tritonmerge-fusion-bench-")
                out = Path(tmp) / "merged"
            try:
                options = MergeOptions(device=self.device or "cpu", backend=self.backend, quiet=True, overwrite=True)
                self.result = run_merge(config, out, options)
                with torch.no_grad():
                    merged = load_checkpoint(out)
                    pretrained = modelpool.load_pretrained_model()
                    module = load_into_copy(pretrained, merged, copy_module=modelpool.has_instance_models)
                aliases = sorted(set(module.state_dict()) - set(merged))
                if aliases and self.result.plan.needs_analysis:
                    # the checkpoint stores a tied tensor once, the module's state dict (what the
                    # memory mode and FusionBench's own methods merge) under every name
                    log.warning(
                        "tritonmerge %s: the checkpoint stores tied tensors once (%s): the whole-model analysis "
                        "counted them once, a merge of the module's state dict counts them under each name",
                        self.merge_method, ", ".join(aliases[:3]),
                    )
                return module
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)

    TritonMergeAlgorithm.__module__ = __name__
    TritonMergeAlgorithm.__qualname__ = "TritonMergeAlgorithm"
    _CLASS = TritonMergeAlgorithm
    globals()["TritonMergeAlgorithm"] = TritonMergeAlgorithm
    return _CLASS


# -- models and state dicts -------------------------------------------------------------------


def state_dict_of(model: Any, device: str | None = None) -> dict[str, Any]:
    """An ``nn.Module``'s state dict, or the tensors of a mapping (FusionBench's LazyStateDict)."""
    import torch

    if isinstance(model, torch.nn.Module):
        sd = dict(model.state_dict())
    elif isinstance(model, Mapping):
        sd = {k: model[k] for k in model.keys()}
    else:
        raise ConfigError(f"tritonmerge: cannot read the tensors of a {type(model).__name__} from the model pool")
    if device is not None:
        sd = {k: v.to(device) for k, v in sd.items()}
    return sd


def load_into_copy(pretrained: Any, merged: Mapping[str, Any], *, copy_module: bool) -> Any:
    """The pretrained module (a copy of it with ``copy_module``) holding the merged tensors.

    Keys the merge did not produce must be aliases of ones it did (tied weights saved once);
    keys the module does not have are refused."""
    import torch

    if isinstance(pretrained, torch.nn.Module):
        module = copy.deepcopy(pretrained) if copy_module else pretrained
    elif hasattr(pretrained, "meta_module"):  # fusion_bench.utils.LazyStateDict
        module = copy.deepcopy(pretrained.meta_module).to_empty(device=getattr(pretrained, "_device", "cpu"))
    else:
        raise ConfigError(f"tritonmerge: the pretrained model is a {type(pretrained).__name__}, not an nn.Module")
    result = module.load_state_dict(dict(merged), strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"tritonmerge: the merged tensors have keys the model lacks: {result.unexpected_keys[:5]}")
    if result.missing_keys:
        state = module.state_dict(keep_vars=True)
        loaded = {state[k].data_ptr() for k in merged if k in state}
        lost = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
        if lost:
            raise ConfigError(f"tritonmerge: the merge produced no tensor for {lost[:5]}")
    return module


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Every tensor of the engine's output folder (safetensors shards)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def model_paths(modelpool: Any) -> list[str] | None:
    """[pretrained, *experts] as local checkpoint paths, or None where any model has none."""
    paths = []
    for name in (PRETRAINED, *modelpool.model_names):
        try:
            path = modelpool.get_model_path(name)
        except Exception:
            return None
        path = plain(path)
        if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
            return None
        paths.append(os.fspath(path))
    return paths


# -- the disk engine's config -----------------------------------------------------------------


def _as_dict(p: Any) -> dict[str, Any]:
    from ..registry import Composite

    return p.as_dict() if isinstance(p, Composite) else p.model_dump(by_alias=True)


def _per_model_names(spec: Any, p: Any) -> set[str]:
    from ..params import describe_params
    from ..registry import Composite

    if isinstance(p, Composite):
        return _per_model_names(spec, p.own) | _per_model_names(p.inner, p.inner_params)
    return {row["name"] for row in describe_params(type(p)) if row["per_model"]}


def engine_config(method: str, params: Mapping[str, Any], base: str, experts: list[str]) -> dict[str, Any]:
    """The engine's (mergekit-schema) config that merges like ``merge_state_dicts(method, ...,
    **params)``: every parameter is written out with its resolved value, so none of the config
    loader's mergekit defaults for mergekit's method names (``density`` 1.0, ``rescale``,
    ``normalize``) applies; per-expert lists go to each model's parameters."""
    from ..catalog import get_method

    spec = get_method(method)
    p = spec.validate(dict(params))
    full = {k: v for k, v in _as_dict(p).items() if v is not None}
    per_model = _per_model_names(spec, p)
    shared = {k: v for k, v in full.items() if not (k in per_model and isinstance(v, (list, tuple)))}
    lists = {k: list(v) for k, v in full.items() if k in per_model and isinstance(v, (list, tuple))}
    models = [{"model": path, "parameters": {k: v[i] for k, v in lists.items()}} for i, path in enumerate(experts)]
    return {"merge_method": method, "base_model": base, "models": models, "parameters": shared}


def path_mode_refusal(method: str, params: Mapping[str, Any], paths: list[str]) -> str | None:
    """Why the engine's config would not reproduce the in-memory parameters (None: it does)."""
    from ..catalog import get_method
    from ..config import load_config
    from ..errors import TritonMergeError

    spec = get_method(method)
    n = len(paths) - 1

    def normal(p: Any) -> dict[str, Any]:
        # a per-expert value given once means the same value for every expert
        per_model = _per_model_names(spec, p)
        out = _as_dict(p)
        for k in per_model & set(out):
            if not isinstance(out[k], (list, tuple)):
                out[k] = [out[k]] * n
            else:
                out[k] = list(out[k])
        return out

    try:
        want = normal(spec.validate(dict(params)))
        cfg = load_config(engine_config(method, params, paths[0], paths[1:]))
        got = normal(spec.validate(cfg.resolve("")))
    except TritonMergeError as exc:
        return f"the engine's config is refused: {exc}"
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return f"the engine would resolve the parameters {diff} differently"
    return None
