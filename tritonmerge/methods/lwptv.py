"""LwPTV: layer-wise pruning of task vectors before any merge method runs.

**This is a reconstruction, not a reproduction.** LwPTV (Zhang et al., "Merging Smarter,
Generalizing Better", arXiv 2506.09093) is public only as an abstract: a saliency score
"measuring the redundancy of parameters in task vectors" yields a mask vector per task, used to
prune that task's vector layer by layer, so that pruned layers "only keep the pre-trained model
parameters"; it plugs into most merging methods. The saliency formula, the threshold rule and the
mask's granularity are not public. This module implements the reading of docs/algorithms.md §3 with
every choice exposed as a parameter, so that a quality benchmark (benchmarks/quality) can choose
the defaults; see docs/modifiers.md.

For every task t and unit u (``unit``: a block = the tensors whose name carries ``layers.<l>``,
``h.<l>``, ``blocks.<l>``..., see ``context.layer_index``; or a block's attention / MLP half by
name patterns; or one tensor), over the tensors that pass ``layer_include``/``layer_exclude``:

    S_t^u = saliency of τ_t restricted to unit u (``score``; larger = more salient, kept first)
    M_t^u = rule(S)  ∈ {0, 1}  (``rule``: fraction | zscore | relative), over each task's units
            (``threshold_scope="task"``) or over all (task, unit) pairs together ("model", the default),
            then each task's best-scoring units are restored until ``min_layers_kept`` are kept
    τ'_t^u = M_t^u · τ_t^u                                 (a whole unit zeroed for that task)
    merged = θ₀ + inner method({τ'_t})

A mask of 0 is written as ``TensorDecisions.keep[t] = False`` on every tensor of that unit;
``api.merge_one`` (and WUDI's batched path) then hands the inner method the base tensor in
place of expert t, i.e. a zero task vector, so a unit pruned for every task comes out as the
base. Tensors without a layer index are never pruned. The alternative reading (one mask per
layer applied to the *merged* vector) is not implemented.

The analysis is one streaming read of the scored tensors (``backends.run_op("task_vector_stats")``,
plus, per tensor and from all tasks' vectors of it at once: the Gram matrix of the task vectors for
the cosine scores, sign-conflict counts for ``sign_conflict``, top-k overlap counts for
``top_overlap``; those two read no statistic but the element count, so they skip the statistics);
the decision is the pure functions ``layer_scores`` and ``layer_mask`` on the small per-(task,
unit) table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator

from ..context import ModelDecisions, TensorContext, layer_split
from ..errors import ParameterError, UnknownMethodError
from .. import backends
from ..ops.select import keep_count
from ..ops.stats import STAT_COLUMNS, task_vector_chunks
from ..params import MethodParams, validate_params
from ..registry import Composite, MergeMethod, get_method, register
from ..source import TensorSource, gathered, local_names
from .tadrop import statistic_from_stats

Score = Literal[
    "l2_ratio", "rms_ratio", "l1_ratio", "kurtosis", "l1_l2", "cosine_to_mean", "cosine_to_others", "top_overlap", "sign_conflict"
]
Rule = Literal["fraction", "zscore", "relative"]
Unit = Literal["block", "half", "tensor"]
# scores that compare each task with the others: they need every task's vector of a tensor at once
CROSS_TASK = ("cosine_to_mean", "cosine_to_others", "top_overlap", "sign_conflict")
GRAM_SCORES = ("cosine_to_mean", "cosine_to_others")
HALVES = ("attn", "mlp", "other")

# unit="half": a tensor goes to the half of the pattern found first (leftmost) in the part of its
# name after the layer index, a longer pattern winning at the same position; case-insensitive.
# Norms go with the sublayer they belong to: pre-LN models (Llama/Mistral, GPT-2, CLIP, ViT, OPT)
# name the norm that feeds a sublayer (input_layernorm / ln_1 -> attention, post_attention_layernorm
# / ln_2 -> MLP); post-LN BERT keeps the norm inside the sublayer's module (attention.output.LayerNorm
# -> attention, output.LayerNorm -> MLP).
DEFAULT_ATTN_PATTERNS = ("attn", "attention", "input_layernorm", "ln_1", "layernorm_before", "layer_norm1")
DEFAULT_MLP_PATTERNS = (
    "mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "moe", "fc1", "fc2",
    "post_attention_layernorm", "ln_2", "layernorm_after", "layer_norm2", "final_layer_norm",
)

_COL = {name: i for i, name in enumerate(STAT_COLUMNS)}
# elements per chunk when accumulating Gram matrices (bounds the float64 scratch to N × 8 MiB)


class LwptvParams(MethodParams):
    merge_method: str = Field(description="the method that merges the pruned task vectors (any registered method, e.g. ties or tadrop)")
    inner_merge_method: str | None = Field(
        None, description="when merge_method is itself a modifier (tadrop), the method that one wraps (its merge_method)"
    )
    score: Score = Field(
        # with unit=half, prune_fraction=0.34 and threshold_scope=model: the best validation OOD average
        # with ID within 1 point on task arithmetic and ties, hard setting, 3 seeds
        # (benchmarks/results/quality_sweep_hard_threshold_ranking.md)
        "sign_conflict",
        description=(
            "saliency per (task, unit), larger = kept: l2_ratio (‖τ‖₂ over the task's mean), rms_ratio (per-element RMS), "
            "l1_ratio (mean |τ|), kurtosis (Pearson, of the layer's entries), l1_l2 (√n·‖τ‖₂/‖τ‖₁), "
            "cosine_to_mean (1 − cos to the other tasks' summed vector: low = redundant), "
            "cosine_to_others (1 − mean cos to each other task's vector), "
            "top_overlap (1 − share of the task's top-k |τ| entries also in another task's top-k), "
            "sign_conflict (share of entries whose sign opposes the other tasks' sum; see sign_orientation)"
        ),
    )
    unit: Unit = Field(
        "half",  # the validation sweep's choice, see score
        description=(
            "what one mask entry covers: block (every tensor of a layer index), half (a block's attention "
            "or MLP part, by attn_patterns / mlp_patterns), tensor (each scored tensor alone)"
        ),
    )
    attn_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ATTN_PATTERNS),
        description="unit=half: substrings (case-insensitive, after the layer index) of attention-half tensors, incl. the norms that go with it",
    )
    mlp_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MLP_PATTERNS),
        description="unit=half: substrings of MLP/FFN-half tensors; the leftmost match in the name decides (longer at a tie)",
    )
    half_unmatched: Literal["unit", "keep", "error"] = Field(
        "unit",
        description="unit=half: a layer tensor matching neither list forms the unit '<layer>.other' (unit), is never pruned (keep), or is an error",
    )
    top_density: float = Field(
        0.1, gt=0, le=1, description="score=top_overlap: each task's top-k per tensor, k = ⌊top_density·n⌋ (at least 1) by |τ|"
    )
    sign_orientation: Literal["conflict_salient", "agreement_salient"] = Field(
        "conflict_salient",
        description=(
            "score=sign_conflict: conflict_salient scores the share of entries opposing the others' sum (agreeing = "
            "redundant, pruned first); agreement_salient scores the share agreeing (conflicting = interference, pruned first)"
        ),
    )
    threshold_scope: Literal["task", "model"] = Field(
        "model",  # the validation sweep's choice, see score
        description="task: the rule runs over each task's units; model: over all (task, unit) scores together (min_layers_kept still per task)",
    )
    rule: Rule = Field(
        "fraction",
        description="fraction: prune the lowest-scoring prune_fraction of units per task (or of all pairs); zscore: prune z < −z_threshold; relative: prune score < ratio·max",
    )
    prune_fraction: float = Field(
        0.34,  # the validation sweep's choice, see score
        ge=0,
        lt=1,
        description="rule=fraction: share of each task's units (of all pairs with threshold_scope=model) pruned, rounded down"
    )
    z_threshold: float = Field(1.0, ge=0, description="rule=zscore: prune units whose score is more than this many stds below the mean (of the task, or of all pairs)")
    ratio: float = Field(0.1, ge=0, le=1, description="rule=relative: prune units scoring below ratio × the best score (of the task, or of all pairs)")
    min_layers_kept: int = Field(1, ge=0, description="per task, at least this many units are kept (the best-scoring ones)")
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
# which tensors, which units


def half_of(rest: str, attn_patterns: Sequence[str], mlp_patterns: Sequence[str]) -> str | None:
    """"attn" or "mlp" for the part of a tensor name after its layer index, or None when no
    pattern occurs in it. The pattern found leftmost decides (the outer module), a longer one at
    the same position (``post_attention_layernorm`` over ``attention``); case-insensitive."""
    text = rest.lower()
    best: tuple[int, int, str] | None = None  # (position, -length, half)
    for half, patterns in (("attn", attn_patterns), ("mlp", mlp_patterns)):
        for pattern in patterns:
            pos = text.find(pattern.lower())
            if pos >= 0:
                key = (pos, -len(pattern), half)
                best = key if best is None or key < best else best
    return None if best is None else best[2]


def scored_unit(name: str, dtype: torch.dtype, p: LwptvParams) -> tuple[int, str] | None:
    """(layer, unit name) a tensor is scored and pruned with, or None when it is never pruned.
    Unit names: ``"<layer>"`` (block), ``"<layer>.attn"`` / ``"<layer>.mlp"`` / ``"<layer>.other"``
    (half), the tensor's name (tensor)."""
    if not dtype.is_floating_point:
        return None
    if p.layer_include is not None and not any(s in name for s in p.layer_include):
        return None
    if any(s in name for s in p.layer_exclude):
        return None
    split = layer_split(name)
    if split is None:
        return None
    layer, rest = split
    if p.unit == "block":
        return layer, str(layer)
    if p.unit == "tensor":
        return layer, name
    half = half_of(rest, p.attn_patterns, p.mlp_patterns)
    if half is None:
        if p.half_unmatched == "keep":
            return None
        if p.half_unmatched == "error":
            raise ParameterError(
                f"lwptv: unit='half': tensor {name!r} matches neither attn_patterns nor mlp_patterns "
                "(add a pattern, or set half_unmatched='unit' or 'keep')"
            )
        half = "other"
    return layer, f"{layer}.{half}"


def scored_layer(name: str, dtype: torch.dtype, p: LwptvParams) -> int | None:
    """The layer a tensor is scored and pruned with, or None when it is never pruned."""
    unit = scored_unit(name, dtype, p)
    return None if unit is None else unit[0]


@dataclass
class Units:
    """The units of a model in mask order (by layer, then attn < mlp < other; tensor units by
    name within a layer: the same order whatever order the source lists tensors in), each with
    its layer and its tensors in source order."""

    names: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    tensors: list[list[str]] = field(default_factory=list)


def group_units(names: Sequence[str], dtype_of: Any, p: LwptvParams) -> tuple[Units, dict[str, int]]:
    """The units of the tensors ``names`` (``dtype_of(name)`` gives a dtype) and each scored
    tensor's unit position."""
    found: dict[str, tuple[int, int, str, list[str]]] = {}
    for name in names:
        unit = scored_unit(name, dtype_of(name), p)
        if unit is None:
            continue
        layer, uname = unit
        if uname not in found:
            rank = HALVES.index(uname.rsplit(".", 1)[1]) if p.unit == "half" else 0
            found[uname] = (layer, rank, uname, [])
        found[uname][3].append(name)
    order = sorted(found, key=lambda u: found[u][:3])
    units = Units(order, [found[u][0] for u in order], [found[u][3] for u in order])
    position = {name: ui for ui, u in enumerate(order) for name in found[u][3]}
    return units, position


def check_combinations(p: LwptvParams) -> None:
    """Parameters that only apply to another score or unit, given a value other than their
    default (a config that writes every default out stays valid), and pattern lists that cannot
    work: a one-line ParameterError naming the parameter."""
    fields = type(p).model_fields
    given = {k for k in fields if getattr(p, k) != fields[k].get_default(call_default_factory=True)}
    if "top_density" in given and p.score != "top_overlap":
        raise ParameterError(f"lwptv: parameter 'top_density' is only used with score='top_overlap', not score={p.score!r}; drop it")
    if "sign_orientation" in given and p.score != "sign_conflict":
        raise ParameterError(
            f"lwptv: parameter 'sign_orientation' is only used with score='sign_conflict', not score={p.score!r}; drop it"
        )
    for key in ("attn_patterns", "mlp_patterns", "half_unmatched"):
        if key in given and p.unit != "half":
            raise ParameterError(f"lwptv: parameter {key!r} is only used with unit='half', not unit={p.unit!r}; drop it")
    if p.unit == "half":
        for key in ("attn_patterns", "mlp_patterns"):
            patterns = getattr(p, key)
            if not patterns or any(not x for x in patterns):
                raise ParameterError(f"lwptv: parameter {key!r} must be a non-empty list of non-empty substrings for unit='half'")
        both = sorted({x.lower() for x in p.attn_patterns} & {x.lower() for x in p.mlp_patterns})
        if both:
            raise ParameterError(f"lwptv: parameters 'attn_patterns' and 'mlp_patterns' share {both}; a pattern names one half")


# ---------------------------------------------------------------------------------------------
# scores and masks (pure)


def aggregate_stats(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine ``task_vector_stats`` rows [N, 7] of several tensors into the stats of their
    concatenation: counts and sums add, max|x| takes the maximum."""
    stacked = torch.stack([r.to(torch.float64) for r in rows])
    out = stacked.sum(0)
    out[..., _COL["max_abs"]] = stacked[..., _COL["max_abs"]].amax(0)
    return out


# The cross-task count scores: layer_scores reads only the "count" column of their statistics.
COUNT_SCORES = ("top_overlap", "sign_conflict")


def layer_scores(
    layer_stats: torch.Tensor,
    score: str,
    gram: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
    *,
    sign_orientation: str = "conflict_salient",
) -> torch.Tensor:
    """Saliency [N, U] from per-(task, unit) stats [N, U, 7], and for the cross-task scores the
    unit's Gram matrices [U, N, N] of the task vectors (cosine_to_mean, cosine_to_others) or the
    pooled counts [N, U, 2] (top_overlap: top-k entries also in another task's top-k, top-k
    entries; sign_conflict: entries whose sign opposes the others' sum, entries agreeing with it).
    Every score is >= 0; a zero task vector scores 0."""
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
    if score in GRAM_SCORES:
        if gram is None:
            raise ValueError(f"{score} needs the per-unit Gram matrices")
        g = gram.to(torch.float64)  # [U, N, N]
        n = g.shape[-1]
        if n < 2:
            raise ParameterError(f"lwptv: score={score!r} compares each task with the others; it needs at least 2 experts")
        diag = g.diagonal(dim1=-2, dim2=-1)  # [U, N]: ‖τ_t‖²
        if score == "cosine_to_mean":
            total_row = g.sum(-1)  # [U, N]: τ_t · Σ_k τ_k
            dot_others = total_row - diag
            # ‖Σ_{k≠t} τ_k‖² = Σ_{k,l} G_kl − 2 Σ_k G_tk + G_tt
            norm_others_sq = (g.sum((-1, -2)).unsqueeze(-1) - 2 * total_row + diag).clamp_min(0.0)
            denom = (diag * norm_others_sq).sqrt()
            cos = torch.where(denom > 0, dot_others / denom.clamp_min(1e-300), torch.zeros_like(denom)).clamp(-1.0, 1.0)
        else:
            # mean over k ≠ t of cos(τ_t, τ_k); a zero τ_k counts as orthogonal (cos 0)
            denom = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt()  # [U, N, N]
            pair_cos = torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g)).clamp(-1.0, 1.0)
            off = ~torch.eye(n, dtype=torch.bool)
            cos = (pair_cos * off).sum(-1) / (n - 1)
        saliency = torch.where(diag > 0, 1.0 - cos, torch.zeros_like(cos))
        return saliency.transpose(0, 1).contiguous()
    if score in COUNT_SCORES:
        if pairs is None:
            raise ValueError(f"{score} needs the per-unit counts")
        c = pairs.to(torch.float64)  # [N, U, 2]
        if c.shape[0] < 2:
            raise ParameterError(f"lwptv: score={score!r} compares each task with the others; it needs at least 2 experts")
        if score == "top_overlap":
            top = c[..., 1]
            return torch.where(top > 0, 1.0 - c[..., 0] / top.clamp_min(1.0), torch.zeros_like(top))
        if sign_orientation not in ("conflict_salient", "agreement_salient"):
            raise ValueError(f"unknown sign_orientation {sign_orientation!r}")
        counted = c[..., 0] if sign_orientation == "conflict_salient" else c[..., 1]
        return torch.where(s[..., _COL["count"]] > 0, counted / count, torch.zeros_like(counted))
    raise ValueError(f"unknown lwptv score {score!r}")


def _rule_keep(s: torch.Tensor, rule: str, prune_fraction: float, z_threshold: float, ratio: float) -> torch.Tensor:
    """Keep flags of one pool of scores (1-D, in tie order: earlier entries are pruned first)."""
    keep = torch.ones(s.numel(), dtype=torch.bool)
    if s.numel() == 0:
        return keep
    if rule == "fraction":
        k = int(math.floor(prune_fraction * s.numel() + 1e-9))
        if k > 0:
            keep[torch.argsort(s, stable=True)[:k]] = False
    elif rule == "zscore":
        std = s.std(unbiased=False)
        if float(std) > 0:
            keep = (s - s.mean()) / std >= -z_threshold
    elif rule == "relative":
        top = float(s.max())
        if top > 0:
            keep = s >= ratio * top
    else:
        raise ValueError(f"unknown lwptv rule {rule!r}")
    return keep


def layer_mask(
    scores: torch.Tensor,
    rule: str = "fraction",
    *,
    prune_fraction: float = 0.1,
    z_threshold: float = 1.0,
    ratio: float = 0.1,
    min_layers_kept: int = 1,
    scope: str = "task",
) -> torch.Tensor:
    """Keep mask [N, U] from saliency [N, U] (True = keep). ``scope="task"``: per task, the rule
    marks units to prune (ties in ``fraction`` go to the lower unit index). ``scope="model"``: the
    rule runs once over all N·U scores (``fraction`` prunes ⌊prune_fraction·N·U⌋ pairs, ties to
    the lower unit index, then the lower task index; ``zscore`` uses the mean and std of all pairs;
    ``relative`` the best pair). Then, per task, the best-scoring pruned units are restored until
    at least ``min_layers_kept`` units are kept (under model scope, restored pairs are not
    replaced by others)."""
    scores = scores.to(torch.float64)
    n_tasks, n_units = scores.shape
    if scope == "task":
        keep = torch.ones(n_tasks, n_units, dtype=torch.bool)
        for t in range(n_tasks):
            keep[t] = _rule_keep(scores[t], rule, prune_fraction, z_threshold, ratio)
    elif scope == "model":
        flat = scores.transpose(0, 1).reshape(-1)  # unit-major: ties go to the lower unit, then task
        keep = _rule_keep(flat, rule, prune_fraction, z_threshold, ratio).view(n_units, n_tasks).transpose(0, 1).contiguous()
    else:
        raise ValueError(f"unknown lwptv threshold scope {scope!r}")
    for t in range(n_tasks):
        s = scores[t]
        need = min(min_layers_kept, n_units) - int(keep[t].sum())
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
    for x in task_vector_chunks(base, experts):
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


def top_overlap_counts(base: torch.Tensor, experts: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """[N, 2] float64 on the CPU: per task, how many of its top-k entries by |τ| (k = ⌊density·n⌋,
    at least 1; |τ| in float32 and exactly k entries, ties to the lower flat index, as TIES's
    top-k; entries with τ = 0 left out) are also in the top-k of at least one other task, and how
    many entries its top-k has."""
    b = base.reshape(-1).to(torch.float32)
    k = keep_count(density, b.numel())
    in_top = torch.zeros(b.numel(), dtype=torch.int32, device=base.device)
    masks = []
    for e in experts:
        tau = e.reshape(-1).to(torch.float32) - b
        mask = backends.run_op("topk_mask", tau.abs(), k) & (tau != 0)
        in_top += mask
        masks.append(mask)
    shared = in_top > 1
    out = torch.tensor([[float((m & shared).sum()), float(m.sum())] for m in masks], dtype=torch.float64)
    return out.reshape(len(experts), 2)


def collect_unit_stats(
    p: LwptvParams, source: TensorSource, decisions: ModelDecisions
) -> tuple[Units, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One streaming read of the scored tensors: (units, stats [N, U, 7], Gram [U, N, N] or None,
    cross-task counts [N, U, 2] or None). Experts already pruned here by an outer LwPTV count as
    zero."""
    units, position = group_units(source.names, source.dtype, p)
    n = source.n_experts
    stats = torch.zeros(n, len(units.names), len(STAT_COLUMNS), dtype=torch.float64)
    need_gram = p.score in GRAM_SCORES
    need_pairs = p.score in COUNT_SCORES
    gram = torch.zeros(len(units.names), n, n, dtype=torch.float64) if need_gram else None
    pairs = torch.zeros(n, len(units.names), 2, dtype=torch.float64) if need_pairs else None
    scored = [name for name in source.names if name in position]
    # each tensor's numbers from that tensor alone (by the process holding it), then summed in
    # source order: the same float64 additions however the model is split
    per_tensor: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
    for name in local_names(source, scored):  # source order: a streaming source reads ahead in it
        base, experts = source.load(name)
        if name in decisions.tensors:
            experts = decisions.tensors[name].kept_experts(base, experts)
        fused = _stats_and_gram_cpu(base, experts) if need_gram else None
        if fused is not None:
            tensor_stats, tensor_gram = fused
        elif need_pairs:  # layer_scores reads only the element count of these
            tensor_stats = torch.zeros(n, len(STAT_COLUMNS), dtype=torch.float64)
            tensor_stats[:, _COL["count"]] = float(base.numel())
            tensor_gram = None
        else:
            tensor_stats = backends.run_op("task_vector_stats", base, experts).cpu()
            tensor_gram = gram_matrix(base, experts) if need_gram else None
        tensor_pairs = None
        if p.score == "sign_conflict":
            tensor_pairs = backends.run_op("sign_counts", base, experts)
        elif p.score == "top_overlap":
            tensor_pairs = top_overlap_counts(base, experts, p.top_density)
        per_tensor[name] = (tensor_stats, tensor_gram, tensor_pairs)
    per_tensor = gathered(source, per_tensor)
    rows: dict[int, list[torch.Tensor]] = {ui: [] for ui in range(len(units.names))}
    for name in scored:
        ui = position[name]
        tensor_stats, tensor_gram, tensor_pairs = per_tensor[name]
        rows[ui].append(tensor_stats)
        if gram is not None:
            gram[ui] += tensor_gram
        if pairs is not None:
            pairs[:, ui] += tensor_pairs
    for ui, unit_rows in rows.items():
        stats[:, ui] = aggregate_stats(unit_rows)
    return units, stats, gram, pairs


def analyze_lwptv(p: Composite, source: TensorSource, decisions: ModelDecisions) -> None:
    """Score every (task, unit), decide the masks and write keep flags to ``decisions``."""
    own: LwptvParams = p.own
    if own.score in CROSS_TASK and source.n_experts < 2:
        raise ParameterError(f"lwptv: score={own.score!r} compares each task with the others; it needs at least 2 experts")
    units, stats, gram, pairs = collect_unit_stats(own, source, decisions)
    scores = layer_scores(stats, own.score, gram, pairs, sign_orientation=own.sign_orientation)
    keep = layer_mask(
        scores,
        own.rule,
        prune_fraction=own.prune_fraction,
        z_threshold=own.z_threshold,
        ratio=own.ratio,
        min_layers_kept=own.min_layers_kept,
        scope=own.threshold_scope,
    )
    n = source.n_experts
    for ui, tensors in enumerate(units.tensors):
        flags = [bool(k) for k in keep[:, ui]]
        if all(flags):
            continue
        for name in tensors:
            d = decisions.for_tensor(name)
            # a nested LwPTV (or any earlier decision) may already have pruned some experts here
            d.keep = flags if d.keep is None else [a and b for a, b in zip(d.keep, flags)]
    key = "lwptv"
    while key in decisions.summary:
        key = f"{key}_inner"
    summary: dict[str, Any] = {
        "reading": "reconstruction, docs/algorithms.md §3 (not the paper's formula)",
        "merge_method": own.merge_method,
        "score": own.score,
        "rule": own.rule,
        "unit": own.unit,
        "threshold_scope": own.threshold_scope,
    }
    if own.score == "top_overlap":
        summary["top_density"] = own.top_density
    if own.score == "sign_conflict":
        summary["sign_orientation"] = own.sign_orientation
    summary["units"] = list(units.names)
    summary["unit_layers"] = list(units.layers)
    summary["tensors_per_unit"] = {u: len(t) for u, t in zip(units.names, units.tensors)}
    if own.unit == "block":  # the block summary as before: one unit per layer, named by it
        summary["layers"] = list(units.layers)
        summary["tensors_per_layer"] = {str(layer): len(t) for layer, t in zip(units.layers, units.tensors)}
    summary["scores"] = [[float(x) for x in scores[t]] for t in range(n)]
    summary["keep"] = [[bool(x) for x in keep[t]] for t in range(n)]
    summary["pruned_units"] = {str(t): [u for ui, u in enumerate(units.names) if not keep[t, ui]] for t in range(n)}
    if own.unit == "block":
        summary["pruned_layers"] = {str(t): [units.layers[ui] for ui in range(len(units.names)) if not keep[t, ui]] for t in range(n)}
    decisions.summary[key] = summary


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
        check_combinations(own)
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
