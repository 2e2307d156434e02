"""The one interface through which methods read whole models: names, shapes and tensors.

The in-memory source wraps state dicts; the engine provides a streaming source backed by
files. Analysis passes iterate a source and never know which one they were given.

A source may be one process's share of a model split over several (a distributed merge). An
analysis then loads only ``local_names(source, names)``, computes its per-tensor results,
and combines them with ``gathered`` (per-tensor results of every process, to be reduced in the
caller's tensor order, so that floating-point sums come out as in one process) or
``count_combiner`` (integer histograms). For a source that is a whole model the first two are
the identity and there is no combiner.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import torch


class TensorSource(Protocol):
    names: list[str]
    n_experts: int

    @property
    def device(self) -> torch.device:
        """Where ``load`` returns tensors: the analyses choose their backend by it, so that no
        tensor is loaded only to learn where it lives."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Base tensor and one tensor per expert, in the stored dtype, on the compute device."""
        ...


def local_names(source: TensorSource, names: Sequence[str]) -> list[str]:
    """The subset of ``names`` this process loads, in the given order (the order in which the
    caller then loads them: a streaming source reads ahead in it)."""
    share = getattr(source, "local_names", None)
    return list(names) if share is None else share(names)


def gathered(source: TensorSource, per_name: Mapping[str, Any]) -> dict[str, Any]:
    """Per-tensor results of every process sharing the model, as one dict (keys are unique:
    each tensor is local to one process)."""
    gather = getattr(source, "gather", None)
    return dict(per_name) if gather is None else gather(per_name)


def count_combiner(source: TensorSource) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How to sum an integer tensor (a histogram) over the processes sharing the model; None for
    a source that is the whole model."""
    return getattr(source, "sum_counts", None)


class InMemorySource:
    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        experts: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device | str | None = None,
    ) -> None:
        self._base = base
        self._experts = list(experts)
        self.names = list(base.keys())
        self.n_experts = len(self._experts)
        self._device = device

    @property
    def device(self) -> torch.device:
        """Where ``load`` returns tensors (the analyses decide their backend by it)."""
        if self._device is not None:
            return torch.device(self._device)
        first = next(iter(self._base.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._base[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._base[name].dtype

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = self._base[name]
        experts = [e[name] for e in self._experts]
        if self._device is not None:
            base = base.to(self._device)
            experts = [e.to(self._device) for e in experts]
        return base, experts
