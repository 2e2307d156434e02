"""tritonmerge inside PEFT (peft 0.21): LoRA adapters merged by tritonmerge's methods.

Two routes (docs/peft.md):

* **Drop-in functions.** ``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear`` and
  ``dare_ties`` take the arguments of ``peft.utils.merge_utils``' functions of the same names and
  return what they return, computed by tritonmerge's task-arithmetic family (``merge_tensors``
  with base 0: PEFT's task tensors are LoRA deltas, so each one is its own task vector).
  ``enable()`` / ``disable()`` / ``with patched():`` rebind the names that
  ``peft.tuners.lora.model`` (and ``peft.utils.merge_utils``) hold, so an unchanged
  ``model.add_weighted_adapter(..., combination_type="ties")`` runs on them.
* **Any tritonmerge method on whole adapters.** ``add_weighted_adapter(model, adapters, weights,
  name, method="wudi", ...)`` merges each LoRA layer's full ΔW = B·A·scaling (WUDI, TADrop, LwPTV
  and TIES' model scope see every LoRA layer at once, as in a checkpoint merge with base ΔW = 0)
  and writes the result into a new adapter by truncated SVD, reporting each layer's relative
  Frobenius error.

peft is imported only inside the functions, so ``import tritonmerge`` never needs it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError, ParameterError, TritonMergeError

log = logging.getLogger(__name__)

# PEFT's majority_sign_method -> the TIES family's election (elected on the unweighted τᵢ)
SIGN_METHODS = {"total": "unweighted_sum", "frequency": "unweighted_count"}
# the names peft.tuners.lora.model imports from peft.utils.merge_utils, rebound by enable()
PATCHED_NAMES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
PATCHED_MODULES = ("peft.tuners.lora.model", "peft.utils.merge_utils")
# the key the drop-in functions' tensor is merged under (DARE's masks are keyed by it and a seed)
_TENSOR_NAME = "peft"


class PeftMissingError(TritonMergeError, ImportError):
    pass


# -- the drop-in functions -------------------------------------------------------------------


def _inputs(fn: str, task_tensors: Sequence[torch.Tensor], weights: Any) -> tuple[list[torch.Tensor], list[float], torch.dtype]:
    """The task tensors, one float weight per tensor, and the dtype PEFT's result has: its
    ``task_tensors * weights`` promotes the stacked tensors' dtype with the weights'."""
    tensors = list(task_tensors)
    if not tensors:
        raise InputError(f"{fn}: task_tensors is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{fn}: task tensor {i} must be a floating-point torch.Tensor, got {what}")
        if t.shape != tensors[0].shape:
            raise InputError(f"{fn}: task tensor {i} has shape {tuple(t.shape)} but task tensor 0 has {tuple(tensors[0].shape)}")
        if t.device != tensors[0].device:
            raise InputError(f"{fn}: task tensor {i} is on {t.device} but task tensor 0 is on {tensors[0].device}")
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(weights)
    if w.dim() == 0 or w.shape[0] != len(tensors) or any(s != 1 for s in w.shape[1:]):
        raise InputError(
            f"{fn}: weights must hold one number per task tensor (shape [{len(tensors)}]), got shape {tuple(w.shape)}; "
            f"per-element weights are not supported"
        )
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    dtype = torch.promote_types(dtype, w.dtype)
    return tensors, [float(x) for x in w.reshape(-1).tolist()], dtype


def _merge(method: str, tensors: list[torch.Tensor], dtype: torch.dtype, **params: Any) -> torch.Tensor:
    """tritonmerge's ``method`` on task vectors ``tensors`` against a zero base, in ``dtype``
    (float32 arithmetic, one rounding at the end)."""
    from ..api import merge_tensors

    base = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    experts = [t.to(dtype) for t in tensors]  # an exact widening where the dtypes differ
    return merge_tensors(method, base, experts, name=_TENSOR_NAME, **params)


def _density(fn: str, density: Any) -> float:
    """PEFT's density rules: >= 1 prunes nothing (with PEFT's warning), < 0 is an error."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{fn}: density must be a number in [0, 1], got {density!r}")
    density = float(density)
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return 1.0
    if density < 0:
        raise ValueError(f"{fn}: density should be >= 0, got {density}")
    return density


def _mean_dtype(dtype: torch.dtype) -> torch.dtype:
    # PEFT's disjoint mean divides by torch.clamp(count, min=1.0), a tensor of the default float
    # dtype: its ties/dare_ties return at least that (float32 for bfloat16 inputs and weights)
    return torch.promote_types(dtype, torch.get_default_dtype())


def _election(fn: str, majority_sign_method: str) -> str:
    try:
        return SIGN_METHODS[majority_sign_method]
    except KeyError:  # PEFT raises RuntimeError here too
        raise RuntimeError(
            f"{fn}: unknown majority_sign_method {majority_sign_method!r}; use 'total' or 'frequency'"
        ) from None


def _nothing_kept(tensors: list[torch.Tensor], density: float) -> bool:
    # PEFT keeps int(density·n) entries, none when that is 0; tritonmerge keeps at least one
    return int(density * tensors[0].numel()) == 0


def _seed() -> int:
    """A DARE seed drawn from torch's default generator: like PEFT's torch.bernoulli masks, a
    call draws fresh masks and ``torch.manual_seed`` makes a run repeat."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢτᵢ (PEFT's ``task_arithmetic``)."""
    tensors, ws, dtype = _inputs("task_arithmetic", task_tensors, weights)
    return _merge("task_arithmetic", tensors, dtype, weight=ws)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σᵢ wᵢ·topk(τᵢ): each τᵢ keeps its ⌊density·n⌋ largest |entries| (PEFT's ``magnitude_prune``)."""
    tensors, ws, dtype = _inputs("magnitude_prune", task_tensors, weights)
    density = _density("magnitude_prune", density)
    if _nothing_kept(tensors, density):
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    return _merge("magnitude", tensors, dtype, weight=ws, density=density, rescale="none")


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """PEFT's ``ties``: top-k per τᵢ, the sign elected on the unweighted trimmed τᵢ ("total": the
    sign of their sum; "frequency": the majority of their signs), then Σ of the agreeing wᵢτᵢ
    over the number of agreeing entries."""
    tensors, ws, dtype = _inputs("ties", task_tensors, weights)
    dtype = _mean_dtype(dtype)
    density = _density("ties", density)
    election = _election("ties", majority_sign_method)
    if _nothing_kept(tensors, density):
        return torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    return _merge(
        "ties", tensors, dtype, weight=ws, density=density, rescale="none", topk_scope="tensor",
        consensus=election, disjoint="mean", normalize=False,
    )


def _dare_density(fn: str, density: Any) -> float:
    density = _density(fn, density)
    if density == 0:
        # PEFT would divide the all-zero masked tensors by 0 and return NaN
        raise ValueError(f"{fn}: density 0 drops every entry and the 1/density rescale is undefined; use a density in (0, 1]")
    return density


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's ``dare_linear``: each entry of each τᵢ kept with probability ``density`` and divided
    by it, then Σᵢ wᵢτ̃ᵢ. The masks come from tritonmerge's counter-based streams, seeded from
    torch's default generator: the same distribution as PEFT's, not the same draws."""
    tensors, ws, dtype = _inputs("dare_linear", task_tensors, weights)
    density = _dare_density("dare_linear", density)
    return _merge("dare_linear", tensors, dtype, weight=ws, density=density, rescale="keep_prob", seed=_seed())


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """PEFT's ``dare_ties``: DARE's random drops and 1/density rescale, then ``ties``' election
    on the unweighted τ̃ᵢ and the mean over agreeing entries."""
    tensors, ws, dtype = _inputs("dare_ties", task_tensors, weights)
    dtype = _mean_dtype(dtype)
    density = _dare_density("dare_ties", density)
    election = _election("dare_ties", majority_sign_method)
    return _merge(
        "dare_ties", tensors, dtype, weight=ws, density=density, rescale="keep_prob", seed=_seed(),
        consensus=election, disjoint="mean", normalize=False,
    )


# -- rebinding PEFT's names ------------------------------------------------------------------

_patch_lock = threading.Lock()
# (module, name, the object it held) for every name enable() rebound; empty when disabled
_saved: list[tuple[Any, str, Any]] = []


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeftMissingError(f"peft is not importable ({exc}); install it with pip install 'tritonmerge[peft]'") from None


def is_enabled() -> bool:
    return bool(_saved)


def enable() -> None:
    """Point PEFT's LoRA merges at tritonmerge: ``peft.tuners.lora.model`` imported the five
    functions by name, so its own references are rebound (and ``peft.utils.merge_utils``' for
    callers that use that module). Calling it again does nothing."""
    modules = [_import(m) for m in PATCHED_MODULES]
    ours = {name: globals()[name] for name in PATCHED_NAMES}
    with _patch_lock:
        if _saved:
            return
        for module in modules:
            for name in PATCHED_NAMES:
                if name not in vars(module):
                    raise PeftMissingError(f"{module.__name__} has no {name!r}: this peft is not one tritonmerge knows (tested: 0.21)")
        for module in modules:
            for name in PATCHED_NAMES:
                _saved.append((module, name, vars(module)[name]))
                setattr(module, name, ours[name])


def disable() -> None:
    """Put back exactly what ``enable()`` replaced. Calling it when not enabled does nothing."""
    with _patch_lock:
        while _saved:
            module, name, original = _saved.pop()
            setattr(module, name, original)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``enable()`` for the block, then restored; inside an enabled region it changes nothing."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


# -- any tritonmerge method on whole adapters, written back by SVD -----------------------------


@dataclass
class AdapterMerge:
    """What ``add_weighted_adapter`` did: the new adapter, its rank and, per LoRA layer, the
    relative Frobenius error ‖ΔW − B·A·s‖/‖ΔW‖ of the stored adapter against the merged ΔW
    (0 where the merged ΔW is 0)."""

    adapter_name: str
    method: str
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    report: Any = None  # tritonmerge's MergeReport of the merge

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _lora_model(model: Any) -> Any:
    lora = _import("peft.tuners.lora")
    if isinstance(model, lora.LoraModel):
        return model
    inner = getattr(model, "base_model", None)
    if isinstance(inner, lora.LoraModel):
        return inner
    raise InputError(f"add_weighted_adapter: expected a PeftModel or LoraModel with LoRA adapters, got {type(model).__name__}")


@dataclass
class _Layer:
    name: str  # the module's name in the model
    module: Any
    embedding: bool
    transpose: bool  # merged as (B·A)ᵀ: embeddings, whose weight is [num_embeddings, dim]
    shape: tuple[int, int]  # B·A's shape: [out, in]
    device: torch.device  # where the adapters' factors live; the merge runs there


def _factors(layer: _Layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    m = layer.module
    if layer.embedding:
        if adapter not in m.lora_embedding_A:
            return None
        return m.lora_embedding_A[adapter], m.lora_embedding_B[adapter]
    if adapter not in m.lora_A:
        return None
    return m.lora_A[adapter].weight, m.lora_B[adapter].weight


def _layers(lora_model: Any, adapters: Sequence[str]) -> list[_Layer]:
    """Every LoRA layer holding one of ``adapters``; layers this function cannot write back are
    refused with their name."""
    layer_mod = _import("peft.tuners.lora.layer")
    found = []
    for name, module in lora_model.model.named_modules():
        if not isinstance(module, layer_mod.LoraLayer):
            continue
        held = [a for a in adapters if a in module.lora_A or a in module.lora_embedding_A]
        if not held:
            continue
        if isinstance(module, layer_mod.Embedding):
            embedding, transpose = True, True
        elif isinstance(module, layer_mod.Linear):
            # B·A's [out, in], an nn.Linear weight's orientation, also for fan_in_fan_out layers
            # (GPT-2's Conv1D stores [in, out]): what WUDI and row-wise rules expect of a linear map
            embedding, transpose = False, False
        else:
            raise InputError(
                f"add_weighted_adapter: layer {name!r} is a {type(module).__name__}; tritonmerge writes back "
                f"LoRA Linear and Embedding layers only"
            )
        for a in held:
            if a in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(a, False):
                raise InputError(f"add_weighted_adapter: adapter {a!r} is a LoRA variant (e.g. DoRA) at layer {name!r}; only plain LoRA is supported")
            if getattr(module, "lora_bias", {}).get(a, False):
                raise InputError(f"add_weighted_adapter: adapter {a!r} has a LoRA bias at layer {name!r}; it cannot be merged as B·A")
        layer = _Layer(name, module, embedding, transpose, (0, 0), torch.device("cpu"))
        a_w, b_w = _factors(layer, held[0])
        layer.shape, layer.device = (int(b_w.shape[0]), int(a_w.shape[1])), a_w.device
        found.append(layer)
    if not found:
        raise InputError(f"add_weighted_adapter: no LoRA layer of the model holds any of {list(adapters)}")
    return found


def _delta(layer: _Layer, adapter: str) -> torch.Tensor:
    """ΔW = B·A·scaling in float32 ([out, in]; transposed for embeddings to their weight's
    [num_embeddings, dim]); zeros where the adapter does not touch this layer."""
    factors = _factors(layer, adapter)
    if factors is None:
        return torch.zeros(_shape_of(layer), dtype=torch.float32, device=layer.device)
    a, b = factors
    if b.shape[0] != layer.shape[0] or a.shape[1] != layer.shape[1] or a.shape[0] != b.shape[1]:
        raise InputError(
            f"add_weighted_adapter: adapter {adapter!r} at layer {layer.name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
            f"which do not make a {layer.shape[0]}×{layer.shape[1]} update"
        )
    f32 = {"device": layer.device, "dtype": torch.float32}
    delta = b.detach().to(**f32) @ a.detach().to(**f32)
    delta = delta * float(layer.module.scaling[adapter])
    return delta.T.contiguous() if layer.transpose else delta


def _takes_weight(method: str, params: dict[str, Any]) -> bool:
    """Whether the method that finally merges each tensor has a per-model ``weight``."""
    from ..catalog import get_method
    from ..params import param_names

    spec = get_method(method)
    inner, inner_params = spec.innermost(spec.validate(params))
    return "weight" in param_names(type(inner_params))


def _write_back(layer: _Layer, adapter_name: str, merged: torch.Tensor, rank: int) -> float:
    """Store the best rank-``rank`` B·A of ``merged`` in the new adapter; returns the relative
    Frobenius error of what was stored (in the adapter's dtype)."""
    m = merged.T if layer.transpose else merged  # back to B·A's [out, in]
    a_param, b_param = _factors(layer, adapter_name)
    scaling = float(layer.module.scaling[adapter_name])
    if scaling == 0:
        raise InputError(f"add_weighted_adapter: the new adapter's scaling at layer {layer.name!r} is 0; cannot write into it")
    u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    a_new = torch.zeros(a_param.shape, dtype=torch.float64, device=m.device)
    b_new = torch.zeros(b_param.shape, dtype=torch.float64, device=m.device)
    a_new[:r] = root[:, None] * vh[:r]  # the singular values split evenly between A and B
    b_new[:, :r] = u[:, :r] * root[None, :] / scaling
    with torch.no_grad():
        a_param.data = a_new.to(dtype=a_param.dtype, device=a_param.device)
        b_param.data = b_new.to(dtype=b_param.dtype, device=b_param.device)
    f64 = {"device": m.device, "dtype": torch.float64}
    stored = (b_param.detach().to(**f64) @ a_param.detach().to(**f64)) * scaling
    norm = torch.linalg.matrix_norm(m.to(torch.float64))
    if norm == 0:
        return float(torch.linalg.matrix_norm(stored))
    return float(torch.linalg.matrix_norm(m.to(torch.float64) - stored) / norm)


def add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    method: str = "wudi",
    svd_rank: int | None = None,
    **params: Any,
) -> AdapterMerge:
    """Merge LoRA ``adapters`` of a PEFT ``model`` into a new adapter ``adapter_name`` with any
    tritonmerge ``method`` and its ``params``.

    Per LoRA layer, each adapter's ΔWᵢ = Bᵢ·Aᵢ·scalingᵢ (float32, [out, in] as an nn.Linear
    weight, [num_embeddings, dim] for embeddings; 0 where an adapter does not touch the layer) is
    a task vector against a zero base; all layers are merged as one model by
    ``merge_state_dicts`` (so WUDI, TADrop, LwPTV and TIES with ``topk_scope="model"`` see every
    layer). ``weights`` become the method's per-model ``weight``
    where it has one; otherwise they scale the ΔWᵢ (WUDI). Each merged ΔW is written into the new
    adapter by truncated SVD at ``svd_rank`` (default: the largest rank among ``adapters``),
    the singular values split evenly between A and B. Returns the ranks and per-layer errors;
    logs them at INFO.
    """
    from ..api import merge_state_dicts
    from ..context import MergeReport

    adapters = list(adapters)
    weights = [float(w) for w in weights]
    lora_model = _lora_model(model)
    if not adapters:
        raise InputError("add_weighted_adapter: the list of adapters is empty")
    if len(weights) != len(adapters):
        raise InputError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    for a in adapters:
        if a not in lora_model.peft_config:
            raise InputError(f"add_weighted_adapter: adapter {a!r} does not exist; the model has {sorted(lora_model.peft_config)}")
    if adapter_name in lora_model.peft_config:
        raise InputError(f"add_weighted_adapter: the model already has an adapter named {adapter_name!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ParameterError(f"add_weighted_adapter: svd_rank must be a positive integer, got {svd_rank!r}")

    # the new adapter's rank and targets, as peft's own add_weighted_adapter decides them (it
    # also checks that the adapters can be combined), before any work
    _, rank, targets = lora_model._check_add_weighted_adapter(adapters=adapters, combination_type="svd", svd_rank=svd_rank)
    if len(adapters) == 1 and svd_rank:  # peft's check treats one adapter as a linear merge
        rank = svd_rank
    layers = _layers(lora_model, adapters)
    by_key = {f"{layer.name}.weight": layer for layer in layers}
    base = {key: torch.zeros(_shape_of(layer), dtype=torch.float32, device=layer.device) for key, layer in by_key.items()}
    experts = [{key: _delta(layer, a) for key, layer in by_key.items()} for a in adapters]

    call = dict(params)
    if "weight" in call:
        raise ParameterError("add_weighted_adapter: give the adapters' weights as `weights`, not as a `weight` parameter")
    if _takes_weight(method, call):
        call["weight"] = weights
    else:
        for sd, w in zip(experts, weights):
            if w != 1.0:
                for key in sd:
                    sd[key] = sd[key] * w
    report = MergeReport()
    merged = merge_state_dicts(method, base, experts, report=report, **call)

    # the new adapter: the first adapter's config at the new rank over every adapter's targets
    lora_model.peft_config[adapter_name] = replace(
        lora_model.peft_config[adapters[0]],
        r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={}, rank_pattern={},
    )
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
        other = _import("peft.utils.other")
        other._freeze_adapter(lora_model.model, adapter_name)
        result = AdapterMerge(adapter_name, method, rank, report=report)
        for key, layer in by_key.items():
            if _factors(layer, adapter_name) is None:
                raise InputError(f"add_weighted_adapter: the new adapter {adapter_name!r} was not placed at layer {layer.name!r}")
            result.errors[layer.name] = _write_back(layer, adapter_name, merged[key], rank)
    except BaseException:
        with contextlib.suppress(Exception):
            lora_model.delete_adapter(adapter_name)
        lora_model.peft_config.pop(adapter_name, None)
        raise
    for name, err in result.errors.items():
        log.info("add_weighted_adapter %s: layer %s: relative write-back error %.3g", adapter_name, name, err)
    log.info(
        "add_weighted_adapter %s: %s over %d layers at rank %d, largest relative write-back error %.3g",
        adapter_name, method, len(result.errors), rank, result.max_error,
    )
    return result


def _shape_of(layer: _Layer) -> tuple[int, int]:
    out, inp = layer.shape
    return (inp, out) if layer.transpose else (out, inp)
