"""The one interface through which methods read whole models: names, shapes and tensors.

The in-memory source wraps state dicts; the engine provides a streaming source backed by
files. Analysis passes iterate a source and never know which one they were given.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch


class TensorSource(Protocol):
    names: list[str]
    n_experts: int

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Base tensor and one tensor per expert, in the stored dtype, on the compute device."""
        ...


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
