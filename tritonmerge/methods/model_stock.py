"""Model Stock (Jang et al. 2024, arXiv 2403.19522), with mergekit's per-tensor semantics
(arcee-ai/mergekit merge_methods/model_stock.py; docs/algorithms.md §4.3).

Per tensor (flattened; per row with ``filter_wise``, a 1-D tensor being one row), with offsets
dᵢ = expertᵢ − base and T experts:

    cos θ = mean over pairs i<j of clamp(⟨dᵢ, dⱼ⟩ / max(‖dᵢ‖‖dⱼ‖, 1e-6), −1, 1)
    t     = T·cos θ / (1 + (T − 1)·cos θ)
    out   = t·mean(expertᵢ) + (1 − t)·base

Identical experts give cos θ = 1, t = 1, i.e. that expert. Where 1 + (T − 1)·cos θ is exactly 0
(two offsets pointing in exactly opposite directions) mergekit divides by zero; we keep the base
there (t = 0) instead of writing Inf/NaN. Computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from ..context import TensorContext
from ..params import MethodParams
from ..registry import MergeMethod, register


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(
        False, description="one interpolation ratio per row (output filter) instead of one per tensor"
    )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def merge_model_stock(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: ModelStockParams, ctx: TensorContext
) -> torch.Tensor:
    """t·mean(experts) + (1 − t)·base with t from the mean pairwise cosine of the offsets."""
    dtype = _compute_dtype(base)
    if p.filter_wise:
        # flatten(1), not reshape(rows, -1): the latter fails on empty tensors
        shape = (1, base.numel()) if base.dim() <= 1 else base.flatten(1).shape
    else:
        shape = (base.numel(),)
    w0 = base.to(dtype).reshape(shape)
    ws = [e.to(dtype).reshape(shape) for e in experts]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]

    cos_sum = torch.zeros(shape[:-1], dtype=dtype, device=base.device)
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)

    n = len(ws)
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator == 0, torch.zeros_like(cos), n * cos / torch.where(denominator == 0, 1.0, denominator))

    mean = torch.zeros_like(w0)
    for w in ws:
        mean += w
    mean /= n
    return (t * mean + (1 - t) * w0).reshape(base.shape)


register(
    MergeMethod(
        name="model_stock",
        params=ModelStockParams,
        doc="Model Stock: interpolate between the base and the experts' mean by their offsets' angle.",
        merge_tensor=merge_model_stock,
        reference="arcee-ai/mergekit merge_methods/model_stock.py; Jang et al. 2024 (arXiv 2403.19522)",
        min_experts=2,
    )
)
