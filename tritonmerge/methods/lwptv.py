"""LwPTV: layer-wise pruning of task vectors before any merge method runs.

**This is a reconstruction, not a reproduction.** LwPTV (Zhang et al., "Merging Smarter,
Generalizing Better", arXiv 2506.09093) is public only as an abstract: a saliency score
"measuring the redundancy of parameters in task vectors" yields a mask vector per task, used to
prune that task's vector layer by layer, so that pruned layers "only keep the pre-trained model
parameters"; it plugs into most merging methods. The saliency formula, the threshold rule and the
mask's granularity are not public. This module implements the reading of docs/algorithms.md §3 with
every choice exposed as a parameter, so that a quality benchmark (benchmarks/quality) can choose
the defaults; see docs/modifiers.md.

For every task t and layer l (the tensors whose name carries ``layers.<l>``, ``h.<l>``,
``blocks.<l>``..., see ``context.layer_index``, and that pass ``layer_include``/``layer_exclude``):

    S_t^l = saliency of τ_t restricted to layer l (``score``; larger = more salient, kept first)
    M_t^l = rule(S_t^·)  ∈ {0, 1}  per task over its layers (``rule``: fraction | zscore | relative),
            then the best-scoring layers are restored until ``min_layers_kept`` are kept
    τ'_t^l = M_t^l · τ_t^l                                 (a whole layer zeroed for that task)
    merged = θ₀ + inner method({τ'_t})

A mask of 0 is written as ``TensorDecisions.keep[t] = False`` on every tensor of that layer;
``api.merge_one`` (and WUDI's batched path) then hands the inner method the base tensor in
place of expert t, i.e. a zero task vector, so a layer pruned for every task comes out as the
base. Tensors without a layer index are never pruned. The alternative reading (one mask per
layer applied to the *merged* vector) is not implemented.

The analysis is one streaming read of the scored tensors (``backends.run_op("task_vector_stats")``, plus
per-tensor Gram matrices of the task vectors only for ``score="cosine_to_mean"``); the decision
is the pure functions ``layer_scores`` and ``layer_mask`` on the small per-(task, layer) table.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator

from ..context import ModelDecisions, TensorContext, layer_index
from ..errors import ParameterError, UnknownMethodError
from .. import backends
from ..ops.stats import STAT_COLUMNS
from ..params import MethodParams, validate_params
from ..registry import Composite, MergeMethod, get_method, register
from ..source import TensorSource, gathered, local_names
from .tadrop import statistic_from_stats

Score = Literal["l2_ratio", "rms_ratio", "l1_ratio", "kurtosis", "l1_l2", "cosine_to_mean"]
Rule = Literal["fraction", "zscore", "relative"]

_COL = {name: i for i, name in enumerate(STAT_COLUMNS)}
# elements per chunk when accumulating Gram matrices (bounds the float64 scratch to N × 8 MiB)
_GRAM_CHUNK = 1 << 20


class LwptvParams(MethodParams):
    merge_method: str = Field(description="the method that merges the pruned task vectors (any registered method, e.g. ties or tadrop)")
    inner_merge_method: str | None = Field(
        None, description="when merge_method is itself a modifier (tadrop), the method that one wraps (its merge_method)"
    )
    score: Score = Field(
        "cosine_to_mean",  # best validation ID average on task_arithmetic and wudi (quality_ablation.md)
        description=(
            "saliency per (task, layer), larger = kept: l2_ratio (‖τ‖₂ over the task's mean), rms_ratio (per-element RMS), "
            "l1_ratio (mean |τ|), kurtosis (Pearson, of the layer's entries), l1_l2 (√n·‖τ‖₂/‖τ‖₁), "
            "cosine_to_mean (1 − cos to the other tasks' summed vector: low = redundant)"
        ),
    )
    rule: Rule = Field(
        "fraction",
        description="fraction: prune the lowest-scoring prune_fraction of layers per task; zscore: prune z < −z_threshold; relative: prune score < ratio·max",
    )
    prune_fraction: float = Field(0.17, ge=0, lt=1, description="rule=fraction: share of each task's layers pruned (rounded down)")
    z_threshold: float = Field(1.0, ge=0, description="rule=zscore: prune layers whose score is more than this many stds below the task's mean")
    ratio: float = Field(0.1, ge=0, le=1, description="rule=relative: prune layers scoring below ratio × the task's best layer")
    min_layers_kept: int = Field(1, ge=0, description="per task, at least this many layers are kept (the best-scoring ones)")
    layer_include: list[str] | None = Field(
        None, description="if set, only tensors whose name contains one of these substrings are scored and pruned"
    )
    layer_exclude: list[str] = Field(
        default_factory=list, description="tensors whose name contains one of these substrings are never pruned"
    )

    @field_validator("merge_method", "inner_merge_method")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                get_method(value)
            except UnknownMethodError as exc:  # keep the close-match suggestions, name the parameter
                raise ValueError(str(exc)) from None
        return value


# ---------------------------------------------------------------------------------------------
# which tensors, which layers


def scored_layer(name: str, dtype: torch.dtype, p: LwptvParams) -> int | None:
    """The layer a tensor is scored and pruned with, or None when it is never pruned."""
    if not dtype.is_floating_point:
        return None
    if p.layer_include is not None and not any(s in name for s in p.layer_include):
        return None
    if any(s in name for s in p.layer_exclude):
        return None
    return layer_index(name)


# ---------------------------------------------------------------------------------------------
# scores and masks (pure)


def aggregate_stats(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine ``task_vector_stats`` rows [N, 7] of several tensors into the stats of their
    concatenation: counts and sums add, max|x| takes the maximum."""
    stacked = torch.stack([r.to(torch.float64) for r in rows])
    out = stacked.sum(0)
    out[..., _COL["max_abs"]] = stacked[..., _COL["max_abs"]].amax(0)
    return out


def layer_scores(layer_stats: torch.Tensor, score: str, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency [N, L] from per-(task, layer) stats [N, L, 7] (and Gram matrices [L, N, N] of the
    layer's task vectors for cosine_to_mean). Every score is >= 0; a zero task vector scores 0."""
    s = layer_stats.to(torch.float64)
    count = s[..., _COL["count"]].clamp_min(1.0)
    if score in ("l2_ratio", "rms_ratio", "l1_ratio"):
        if score == "l2_ratio":
            raw = s[..., _COL["sum_sq"]].sqrt()
        elif score == "rms_ratio":
            raw = (s[..., _COL["sum_sq"]] / count).sqrt()
        else:
            raw = s[..., _COL["sum_abs"]] / count
        mean = raw.mean(1, keepdim=True)
        return torch.where(mean > 0, raw / mean.clamp_min(1e-300), torch.zeros_like(raw))
    if score in ("kurtosis", "l1_l2"):
        values = statistic_from_stats(s, score)
        if score == "kurtosis":
            values = values + 3.0  # Pearson kurtosis, >= 1, so that rule=relative is meaningful
        return torch.nan_to_num(values, nan=0.0)
    if score == "cosine_to_mean":
        if gram is None:
            raise ValueError("cosine_to_mean needs the per-layer Gram matrices")
        g = gram.to(torch.float64)  # [L, N, N]
        n = g.shape[-1]
        if n < 2:
            raise ParameterError("lwptv: score='cosine_to_mean' compares each task with the others; it needs at least 2 experts")
        total_row = g.sum(-1)  # [L, N]: τ_t · Σ_k τ_k
        diag = g.diagonal(dim1=-2, dim2=-1)  # [L, N]: ‖τ_t‖²
        dot_others = total_row - diag
        # ‖Σ_{k≠t} τ_k‖² = Σ_{k,l} G_kl − 2 Σ_k G_tk + G_tt
        norm_others_sq = (g.sum((-1, -2)).unsqueeze(-1) - 2 * total_row + diag).clamp_min(0.0)
        denom = (diag * norm_others_sq).sqrt()
        cos = torch.where(denom > 0, dot_others / denom.clamp_min(1e-300), torch.zeros_like(denom))
        saliency = torch.where(diag > 0, 1.0 - cos.clamp(-1.0, 1.0), torch.zeros_like(cos))
        return saliency.transpose(0, 1).contiguous()
    raise ValueError(f"unknown lwptv score {score!r}")


def layer_mask(
    scores: torch.Tensor,
    rule: str = "fraction",
    *,
    prune_fraction: float = 0.1,
    z_threshold: float = 1.0,
    ratio: float = 0.1,
    min_layers_kept: int = 1,
) -> torch.Tensor:
    """Keep mask [N, L] from saliency [N, L] (True = keep). Per task: the rule marks layers to
    prune; ties in ``fraction`` go to the lower layer index; then the best-scoring pruned layers
    are restored until at least ``min_layers_kept`` layers are kept."""
    scores = scores.to(torch.float64)
    n_tasks, n_layers = scores.shape
    keep = torch.ones(n_tasks, n_layers, dtype=torch.bool)
    for t in range(n_tasks):
        s = scores[t]
        if n_layers == 0:
            continue
        if rule == "fraction":
            k = int(math.floor(prune_fraction * n_layers + 1e-9))
            if k > 0:
                order = torch.argsort(s, stable=True)
                keep[t, order[:k]] = False
        elif rule == "zscore":
            std = s.std(unbiased=False)
            if float(std) > 0:
                keep[t] = (s - s.mean()) / std >= -z_threshold
        elif rule == "relative":
            top = float(s.max())
            if top > 0:
                keep[t] = s >= ratio * top
        else:
            raise ValueError(f"unknown lwptv rule {rule!r}")
        need = min(min_layers_kept, n_layers) - int(keep[t].sum())
        if need > 0:
            pruned = (~keep[t]).nonzero().flatten()
            best = pruned[torch.argsort(s[pruned], descending=True, stable=True)[:need]]
            keep[t, best] = True
    return keep


# ---------------------------------------------------------------------------------------------
# analysis (the streaming pass)


def gram_matrix(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[i, k] = τᵢ·τₖ in float64 on the CPU, accumulated over element chunks so the scratch
    stays small whatever the tensor's size."""
    n = len(experts)
    g = torch.zeros(n, n, dtype=torch.float64, device=base.device)
    b = base.reshape(-1)
    flat = [e.reshape(-1) for e in experts]
    for start in range(0, b.numel(), _GRAM_CHUNK):
        stop = min(start + _GRAM_CHUNK, b.numel())
        bb = b[start:stop].to(torch.float64)
        x = torch.stack([f[start:stop].to(torch.float64) - bb for f in flat])
        g += x @ x.T
    return g.cpu()


def _stats_and_gram_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stats and the Gram matrix in one read through the fused CPU loop (the stats bit for
    bit those of the cpu ``task_vector_stats``; the Gram equal to ``gram_matrix`` up to the
    order of float64 additions), or None where that loop does not apply. ``gram_matrix`` in
    torch makes float64 copies of every chunk and dominated the analysis pass."""
    from ..backends.cpu import kernels as ck

    tensors = (base, *experts)
    if (
        not experts
        or len(experts) > ck.MAX_EXPERTS
        or any(t.device.type != "cpu" or t.dtype not in ck.DTYPE_CODES or t.shape != base.shape for t in tensors)
        or backends.cpu_status() is not None
    ):
        return None
    return ck.tau_stats_gram(base, experts)


def collect_layer_stats(
    p: LwptvParams, source: TensorSource, decisions: ModelDecisions
) -> tuple[list[int], dict[int, list[str]], torch.Tensor, torch.Tensor | None]:
    """One streaming read of the scored tensors: (layers, tensors per layer, stats [N, L, 7],
    Gram [L, N, N] or None). Experts already pruned here by an outer LwPTV count as zero."""
    by_layer: dict[int, list[str]] = {}
    for name in source.names:
        layer = scored_layer(name, source.dtype(name), p)
        if layer is not None:
            by_layer.setdefault(layer, []).append(name)
    layers = sorted(by_layer)
    n = source.n_experts
    stats = torch.zeros(n, len(layers), len(STAT_COLUMNS), dtype=torch.float64)
    need_gram = p.score == "cosine_to_mean"
    gram = torch.zeros(len(layers), n, n, dtype=torch.float64) if need_gram else None
    position = {layer: li for li, layer in enumerate(layers)}
    scored = [name for name in source.names if scored_layer(name, source.dtype(name), p) is not None]
    # each tensor's numbers from that tensor alone (by the process holding it), then summed in
    # source order: the same float64 additions however the model is split
    per_tensor: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name in local_names(source, scored):  # source order: a streaming source reads ahead in it
        base, experts = source.load(name)
        if name in decisions.tensors:
            experts = decisions.tensors[name].kept_experts(base, experts)
        fused = _stats_and_gram_cpu(base, experts) if need_gram else None
        if fused is not None:
            per_tensor[name] = fused
        else:
            per_tensor[name] = (backends.run_op("task_vector_stats", base, experts).cpu(), gram_matrix(base, experts) if need_gram else None)
    per_tensor = gathered(source, per_tensor)
    rows: dict[int, list[torch.Tensor]] = {li: [] for li in range(len(layers))}
    for name in scored:
        li = position[scored_layer(name, source.dtype(name), p)]
        tensor_stats, tensor_gram = per_tensor[name]
        rows[li].append(tensor_stats)
        if gram is not None:
            gram[li] += tensor_gram
    for li, layer_rows in rows.items():
        stats[:, li] = aggregate_stats(layer_rows)
    return layers, by_layer, stats, gram


def analyze_lwptv(p: Composite, source: TensorSource, decisions: ModelDecisions) -> None:
    """Score every (task, layer), decide the masks and write keep flags to ``decisions``."""
    own: LwptvParams = p.own
    if own.score == "cosine_to_mean" and source.n_experts < 2:
        raise ParameterError("lwptv: score='cosine_to_mean' compares each task with the others; it needs at least 2 experts")
    layers, by_layer, stats, gram = collect_layer_stats(own, source, decisions)
    scores = layer_scores(stats, own.score, gram)
    keep = layer_mask(
        scores,
        own.rule,
        prune_fraction=own.prune_fraction,
        z_threshold=own.z_threshold,
        ratio=own.ratio,
        min_layers_kept=own.min_layers_kept,
    )
    n = source.n_experts
    for li, layer in enumerate(layers):
        flags = [bool(k) for k in keep[:, li]]
        if all(flags):
            continue
        for name in by_layer[layer]:
            d = decisions.for_tensor(name)
            # a nested LwPTV (or any earlier decision) may already have pruned some experts here
            d.keep = flags if d.keep is None else [a and b for a, b in zip(d.keep, flags)]
    key = "lwptv"
    while key in decisions.summary:
        key = f"{key}_inner"
    decisions.summary[key] = {
        "reading": "reconstruction, docs/algorithms.md §3 (not the paper's formula)",
        "merge_method": own.merge_method,
        "score": own.score,
        "rule": own.rule,
        "layers": layers,
        "tensors_per_layer": {str(layer): len(by_layer[layer]) for layer in layers},
        "scores": [[float(x) for x in scores[t]] for t in range(n)],
        "keep": [[bool(x) for x in keep[t]] for t in range(n)],
        "pruned_layers": {str(t): [layers[li] for li in range(len(layers)) if not keep[t, li]] for t in range(n)},
    }


def _merge_tensor(base: torch.Tensor, experts: Sequence[torch.Tensor], p: Composite, ctx: TensorContext) -> torch.Tensor:
    """Direct calls (api.merge_one applies the keep flags and goes to the innermost method):
    the wrapped method merges with the keep flags in ``ctx``."""
    if p.inner.family is None:
        experts = ctx.decisions.kept_experts(base, experts)
    return p.inner.merge_tensor(base, experts, p.inner_params, ctx)


class LwptvMethod(MergeMethod):
    """LwPTV's registry entry. Only ``validate`` differs: both LwPTV and a wrapped modifier
    (tadrop) name their inner method ``merge_method``, and the registry hands the outer one's
    keys to the outer model only, so the wrapped modifier's own ``merge_method`` travels as
    LwPTV's ``inner_merge_method``."""

    def validate(self, params: dict[str, Any]) -> Any:
        own_keys = set(self.params.model_fields)
        own = validate_params(self.name, self.params, {k: v for k, v in params.items() if k in own_keys})
        inner = get_method(own.merge_method)
        rest = {k: v for k, v in params.items() if k not in own_keys}
        if inner.modifier:
            if own.inner_merge_method is None:
                raise ParameterError(
                    f"lwptv: merge_method={own.merge_method!r} is a modifier that wraps another method; "
                    f"name that one with inner_merge_method (e.g. inner_merge_method='ties')"
                )
            rest["merge_method"] = own.inner_merge_method
        elif own.inner_merge_method is not None:
            raise ParameterError(
                f"lwptv: inner_merge_method={own.inner_merge_method!r} is only used when merge_method names a "
                f"modifier, but {own.merge_method!r} is not one; drop inner_merge_method"
            )
        return Composite(own=own, inner=inner, inner_params=inner.validate(rest))


register(
    LwptvMethod(
        name="lwptv",
        params=LwptvParams,
        doc="LwPTV (reconstruction): score each (task, layer), zero that task's vector on low-saliency layers, then run any method.",
        merge_tensor=_merge_tensor,
        reference="Zhang et al. 2025, arXiv 2506.09093 (abstract only); reading in docs/algorithms.md §3 and docs/modifiers.md",
        analyze=analyze_lwptv,
        modifier=True,
        chunkable=lambda p: isinstance(p, Composite) and bool(p.inner.chunkable(p.inner_params)),
    )
)
