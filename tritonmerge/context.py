"""What a per-tensor merge function may know beyond its tensors and parameters.

The analysis pass (only for methods that need whole-model facts) produces one
``TensorDecisions`` per tensor; the merge pass hands it to the method inside a
``TensorContext``. Decisions are small, JSON-serialisable and saved with the output.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Layer number from a tensor name (``...layers.<i>...``, ``...h.<i>...``, ``...blocks.<i>...``)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_split(name: str) -> tuple[int, str] | None:
    """(layer number, the part of the name after ``<layers>.<i>.``) or None, by the same match as
    ``layer_index``: ``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj.weight")``."""
    m = _LAYER_RE.search(name)
    return (int(m.group(1)), name[m.end():]) if m else None


@dataclass
class TensorDecisions:
    """Whole-model decisions for one tensor, one entry per expert where a list.

    density:   per-expert density overriding the method's ``density`` (TADrop).
    threshold: per-expert |τ| threshold, entries with |τ| >= threshold are kept (TIES ``topk_scope=model``).
    keep:      per-expert flag; False means that expert's task vector is zero here (LwPTV).
    """

    density: list[float] | None = None
    threshold: list[float] | None = None
    keep: list[bool] | None = None

    def kept_experts(self, base: Any, experts: Sequence[Any]) -> list[Any]:
        """The experts with LwPTV's pruned ones replaced by the base (a zero task vector): how a
        method that does not read ``keep`` itself sees them. The task-arithmetic family reads
        ``keep`` in its lowering instead, so that a pruned expert is never read."""
        if self.keep is None:
            return list(experts)
        return [e if k else base for e, k in zip(experts, self.keep)]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


@dataclass
class ModelDecisions:
    """Analysis output for a whole model: per-tensor decisions plus a summary for the output folder."""

    tensors: dict[str, TensorDecisions] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def for_tensor(self, name: str) -> TensorDecisions:
        if name not in self.tensors:
            self.tensors[name] = TensorDecisions()
        return self.tensors[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "tensors": {k: v.to_json() for k, v in self.tensors.items() if v.to_json()},
        }


@dataclass
class TensorContext:
    """Per-call facts: the tensor's name (for seeding and name-based selection), its layer and
    the analysis decisions for it."""

    name: str = ""
    decisions: TensorDecisions = field(default_factory=TensorDecisions)
    report: "MergeReport | None" = None
    # flat index of this tensor's first element within the full tensor: non-zero when the engine
    # merges a row chunk, so counter-based random masks come out the same as for the whole tensor
    element_offset: int = 0

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    def record(self, **values: Any) -> None:
        """Attach numbers to this tensor in the caller's report (WUDI's final loss, for example)."""
        if self.report is not None:
            self.report.tensors.setdefault(self.name, {}).update(values)

    def record_backend(self, backend: str) -> None:
        """Name the backend that merged this tensor in the caller's report (and so in the output
        folder's tritonmerge_report.json)."""
        if self.report is not None:
            self.report.backends[self.name] = backend
            self.record(backend=backend)


@dataclass
class MergeReport:
    """Filled by a merge when the caller passes one: per-tensor numbers and the analysis decisions."""

    method: str = ""
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    decisions: ModelDecisions | None = None
    backends: dict[str, str] = field(default_factory=dict)
