"""Shared test fixtures: deterministic seeding, small tensor/state-dict factories, the ``gpu``
marker's auto-skip (markers are registered in pytest.ini), and a session-private self-check cache."""

from __future__ import annotations

import os
import random
from typing import Callable, Mapping, Sequence

import pytest
import torch

_NO_CUDA_REASON = "needs a CUDA device, and torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=_NO_CUDA_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def private_self_check_cache(tmp_path_factory: pytest.TempPathFactory):
    """The backends' self-check results go to a file of this session (child processes inherit
    it): the suite never reads or writes the user's cache, and pays for each check once."""
    old = os.environ.get("TRITONMERGE_SELF_CHECK_CACHE")
    os.environ["TRITONMERGE_SELF_CHECK_CACHE"] = str(tmp_path_factory.mktemp("self_check") / "self_check.json")
    yield
    if old is None:
        os.environ.pop("TRITONMERGE_SELF_CHECK_CACHE", None)
    else:
        os.environ["TRITONMERGE_SELF_CHECK_CACHE"] = old


@pytest.fixture(autouse=True)
def seed_rngs() -> int:
    """Every test starts from the same global RNG state; returns the seed used. (Not named
    ``seed``, so that tests may parametrize a ``seed`` argument without disabling this.)"""
    random.seed(0)
    torch.manual_seed(0)
    return 0


TensorFactory = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]


@pytest.fixture
def make_tensors() -> TensorFactory:
    """``make_tensors(shape, n_experts=3, dtype=torch.float32, scale=0.1, seed=0, device="cpu")``
    -> (base, [experts]): base ~ N(0, 1), expertᵢ = base + scale·N(0, 1), from a private generator so
    the result depends only on the arguments."""

    def make(
        shape: Sequence[int] | int,
        n_experts: int = 3,
        dtype: torch.dtype = torch.float32,
        scale: float = 0.1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
        experts = [base + scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n_experts)]
        return base.to(device=device, dtype=dtype), [e.to(device=device, dtype=dtype) for e in experts]

    return make


StateDictFactory = Callable[..., tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]


@pytest.fixture
def make_state_dicts(make_tensors: TensorFactory) -> StateDictFactory:
    """``make_state_dicts(shapes: {name: shape}, n_experts=3, dtype=..., scale=0.1, seed=0)`` ->
    (base_sd, [expert_sds]); each tensor gets its own seed derived from ``seed`` and its position."""

    def make(
        shapes: Mapping[str, Sequence[int]],
        n_experts: int = 3,
        dtype: torch.dtype = torch.float32,
        scale: float = 0.1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        base_sd: dict[str, torch.Tensor] = {}
        expert_sds: list[dict[str, torch.Tensor]] = [{} for _ in range(n_experts)]
        for i, (name, shape) in enumerate(shapes.items()):
            b, es = make_tensors(shape, n_experts, dtype, scale, seed * 1000 + i, device)
            base_sd[name] = b
            for sd, e in zip(expert_sds, es):
                sd[name] = e
        return base_sd, expert_sds

    return make


@pytest.fixture(scope="module")
def device():
    """Where Triton kernel tests run: the GPU when there is one, else the CPU under the Triton
    interpreter (TRITON_INTERPRET=1 only inside the module that asks for this fixture)."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    from tritonmerge.testing import triton_interpreter

    with triton_interpreter():
        yield "cpu"
