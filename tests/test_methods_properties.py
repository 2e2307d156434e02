"""Invariants every registered merge method must keep, driven by the registry so that a new
method is covered the moment it is registered.

Per method: dtype/shape/device kept, inputs never mutated, deterministic for a fixed seed
(and seed-dependent when stochastic), identical experts give back that expert (averaging-type
methods, with the parameters that make them an average), density 1 drops nothing, and the
result does not depend on the experts' order where the method is symmetric.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tritonmerge as tm
from tritonmerge.params import per_expert
from tritonmerge.catalog import get_method, list_methods

# A name that every name-based rule treats as an ordinary linear weight of layer 0.
NAME = "model.layers.0.mlp.up_proj.weight"
SHAPES = [(7, 13), (33,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Parameters some methods need to run at all, or to run quickly here.
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "wudi": {"steps": 20},
    "tadrop": {"merge_method": "dare_ties"},
    "lwptv": {"merge_method": "task_arithmetic"},
    # mergekit gives these no default
    "nuslerp": {"weight": 1.0},
    "multislerp": {"weight": 1.0},
    "nearswap": {"t": 0.01},
}

# Methods that are a (weighted) average of the experts with these parameters, so identical
# experts must give back that expert. Weights are deliberately unequal.
WEIGHTS = [0.5, 1.0, 2.0]
AVERAGING: dict[str, dict[str, Any]] = {
    "linear": {"weight": WEIGHTS},
    "task_arithmetic": {"weight": WEIGHTS, "normalize": True},
    "ties": {"weight": WEIGHTS, "density": 1.0},
    "magnitude": {"weight": WEIGHTS, "density": 1.0, "normalize": True},
    "breadcrumbs": {"weight": WEIGHTS, "density": 1.0, "normalize": True},
    "breadcrumbs_ties": {"weight": WEIGHTS, "density": 1.0, "disjoint": "mean"},
    "dare_linear": {"weight": WEIGHTS, "density": 1.0, "normalize": True},
    "dare_ties": {"weight": WEIGHTS, "density": 1.0, "disjoint": "mean"},
    "della": {"weight": WEIGHTS, "density": 1.0},
    "della_linear": {"weight": WEIGHTS, "density": 1.0, "normalize": True},
    "model_stock": {},
    "slerp": {"t": 1.0},
    "passthrough": {},
    "nuslerp": {"weight": [0.3, 0.7]},
    "multislerp": {"weight": WEIGHTS},
    "karcher": {},
    "sce": {},
    "ram": {},
    "ramplus_tl": {},
}


def kwargs_for(method: str) -> dict[str, Any]:
    return dict(METHOD_KWARGS.get(method, {}))


def innermost(method: str, kwargs: dict[str, Any]):
    """(spec, validated params) of the method that finally merges each tensor."""
    spec = get_method(method)
    return spec.innermost(spec.validate(kwargs))


def n_experts_for(method: str) -> int:
    spec, _ = innermost(method, kwargs_for(method))
    n = max(3, spec.min_experts)
    return n if spec.max_experts is None else min(n, spec.max_experts)


def is_stochastic(method: str) -> bool:
    spec, _ = innermost(method, kwargs_for(method))
    return spec.stochastic


def has_field(method: str, field: str) -> bool:
    spec = get_method(method)
    return not spec.modifier and field in spec.params.model_fields


ALL = list_methods()
STOCHASTIC = [m for m in ALL if is_stochastic(m)]
# Symmetric in the experts: no per-expert random stream and more than one expert allowed.
SYMMETRIC = [m for m in ALL if not is_stochastic(m) and innermost(m, kwargs_for(m))[0].max_experts != 1]
WITH_DENSITY = [m for m in ALL if has_field(m, "density")]


def merge(method: str, base: torch.Tensor, experts: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return tm.merge_tensors(method, base, experts, name=NAME, **{**kwargs_for(method), **kwargs})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("method", ALL)
def test_dtype_shape_and_device_kept(method, dtype, shape, make_tensors):
    base, experts = make_tensors(shape, n_experts_for(method), dtype=dtype)
    out = merge(method, base, experts)
    assert out.dtype == base.dtype
    assert out.shape == base.shape
    assert out.device == base.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (0,), (0, 4)], ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("method", ALL)
def test_scalar_single_and_empty_tensors(method, shape, make_tensors):
    base, experts = make_tensors(shape, n_experts_for(method))
    out = merge(method, base, experts)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ALL)
def test_inputs_are_not_mutated(method, make_state_dicts):
    base, experts = make_state_dicts({NAME: (9, 11), "model.layers.0.mlp.up_proj.bias": (9,)}, n_experts_for(method))
    base_copy = {k: v.clone() for k, v in base.items()}
    experts_copy = [{k: v.clone() for k, v in sd.items()} for sd in experts]
    tm.merge_state_dicts(method, base, experts, **kwargs_for(method))
    for k in base:
        assert torch.equal(base[k], base_copy[k]), f"{method} changed the base's {k}"
        for i, (sd, sd_copy) in enumerate(zip(experts, experts_copy)):
            assert torch.equal(sd[k], sd_copy[k]), f"{method} changed expert {i}'s {k}"


@pytest.mark.parametrize("method", ALL)
def test_same_call_gives_the_same_output(method, make_tensors):
    base, experts = make_tensors((16, 8), n_experts_for(method))
    extra = {"seed": 7} if method in STOCHASTIC else {}
    assert torch.equal(merge(method, base, experts, **extra), merge(method, base, experts, **extra))


@pytest.mark.parametrize("method", STOCHASTIC)
def test_different_seeds_give_different_outputs(method, make_tensors):
    base, experts = make_tensors((16, 8), n_experts_for(method))
    assert not torch.equal(merge(method, base, experts, seed=1), merge(method, base, experts, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(AVERAGING))
def test_identical_experts_give_that_expert(method, dtype, make_tensors):
    if method not in ALL:
        pytest.fail(f"{method} is listed as averaging-type but is not registered")
    base, (expert,) = make_tensors((12, 10), 1, dtype=dtype)
    spec, _ = innermost(method, AVERAGING[method])
    n = min(3, spec.max_experts or 3)
    out = merge(method, base, [expert.clone() for _ in range(n)], **AVERAGING[method])
    torch.testing.assert_close(out, expert)


@pytest.mark.parametrize("method", ["task_arithmetic", *WITH_DENSITY])
def test_one_expert_at_full_density_adds_its_scaled_task_vector(method, make_tensors):
    base, (expert,) = make_tensors((12, 10), 1)
    extra = {"density": 1.0} if method in WITH_DENSITY else {}
    out = merge(method, base, [expert], weight=1.0, **{"lambda": 1.3}, **extra)
    torch.testing.assert_close(out, base + 1.3 * (expert - base))


def dense_reference(base: torch.Tensor, experts: list[torch.Tensor], p: Any) -> torch.Tensor:
    """What a task-arithmetic-family method computes when nothing is dropped, in float64:
    weighted task vectors, then (consensus members) sign election and disjoint combination."""
    b = base.double()
    weights = per_expert(p.weight, len(experts), "weight")
    weighted = [(e.double() - b) * w for e, w in zip(experts, weights)]
    if hasattr(p, "consensus"):
        votes = sum(weighted) if p.consensus == "sum" else sum(torch.sign(x) for x in weighted)
        majority = torch.where(votes >= 0, 1.0, -1.0).double()
        agree = [torch.sign(x) == majority for x in weighted]
        mixed = sum(torch.where(a, x, 0.0) for a, x in zip(agree, weighted))
        if p.disjoint == "sum":
            divisor = torch.ones_like(mixed)
        elif p.normalize:
            divisor = sum(a.double() * w for a, w in zip(agree, weights))
        else:
            divisor = sum(a.double() for a in agree)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        divisor = torch.full_like(mixed, sum(weights) if p.normalize else 1.0)
    return b + p.lambda_ * mixed / divisor


@pytest.mark.parametrize("method", WITH_DENSITY)
def test_density_one_drops_nothing(method, make_tensors):
    base, experts = make_tensors((15, 9), 3)
    kwargs = {"density": 1.0, "weight": [0.7, 1.2, 0.4], "lambda": 0.9, "seed": 3}
    kwargs = {k: v for k, v in kwargs.items() if has_field(method, k if k != "lambda" else "lambda_")}
    out = merge(method, base, experts, **kwargs)
    _, p = innermost(method, {**kwargs_for(method), **kwargs})
    torch.testing.assert_close(out.double(), dense_reference(base, experts, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", SYMMETRIC)
def test_expert_order_does_not_matter(method, make_tensors):
    base, experts = make_tensors((10, 12), n_experts_for(method))
    forward = merge(method, base, experts)
    backward = merge(method, base, experts[::-1])
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL)
def test_cuda_input_gives_cuda_output_matching_cpu(method, make_tensors):
    base, experts = make_tensors((64, 48), n_experts_for(method))
    extra = {"seed": 5} if method in STOCHASTIC else {}
    on_cpu = merge(method, base, experts, **extra)
    on_gpu = merge(method, base.cuda(), [e.cuda() for e in experts], **extra)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.dtype == base.dtype
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
