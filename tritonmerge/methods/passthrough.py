"""Passthrough: one input model copied as it is, optionally scaled, with mergekit 0.1.5's
semantics (arcee-ai/mergekit merge_methods/passthrough.py).

mergekit allows exactly one input in all, the base model counting as an input when the config
names one; without slices, a config passes one model through (with ``scale`` per tensor through
filters, e.g. to zero some tensors).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..context import TensorContext
from ..params import MethodParams, PerModel, per_expert
from ..registry import MergeMethod, register


class PassthroughParams(MethodParams):
    scale: PerModel(None, "factor the tensor is multiplied by; none copies it unchanged")


def merge_passthrough(
    base: torch.Tensor, experts: Sequence[torch.Tensor], p: PassthroughParams, ctx: TensorContext
) -> torch.Tensor:
    """The single input, times ``scale`` when one is given."""
    x = experts[0]
    if p.scale is None:
        return x
    (scale,) = per_expert(p.scale, 1, "scale")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype) * scale


register(
    MergeMethod(
        name="passthrough",
        params=PassthroughParams,
        doc="Passthrough: copy the one input model, each tensor optionally multiplied by scale.",
        merge_tensor=merge_passthrough,
        reference="arcee-ai/mergekit 0.1.5 merge_methods/passthrough.py",
        min_experts=1,
        max_experts=1,
        base_role="input",
        chunkable=lambda p: True,
    )
)
