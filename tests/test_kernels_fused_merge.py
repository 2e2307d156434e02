"""The fused Triton merge (backends/triton/merge.merge_triton, executing the family's merge specs)
against the torch reference (methods.task_arithmetic.merge_family: the same spec through ops/merge_spec):
the error-budget rule against the float64 reference, exact equality where the arithmetic is exact
(tied inputs on a 1/8 grid), DARE masks equal to the reference's, analysis decisions (TADrop
densities, model-scope thresholds, LwPTV keep flags), row chunks, and backend dispatch.
Run on the CPU through TRITON_INTERPRET=1 on small shapes."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import tritonmerge as tm
from tritonmerge import backends
from tritonmerge.context import TensorContext, TensorDecisions
from tritonmerge.errors import BackendUnavailableError
from tritonmerge.methods.task_arithmetic import Family, lower, lower_linear, merge_family, merge_linear
from tritonmerge.backends.triton import merge as F
from tritonmerge.ops import rng
from tritonmerge.catalog import get_method
from tritonmerge.testing import assert_close_budget, make_inputs, make_tied_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAMILIES = {
    "task_arithmetic": Family(None, False),
    "ties": Family("magnitude", True),
    "magnitude": Family("magnitude", False),
    "dare_linear": Family("random", False),
    "dare_ties": Family("random", True),
    "breadcrumbs": Family("breadcrumbs", False),
    "breadcrumbs_ties": Family("breadcrumbs", True),
}
NAME = "model.layers.3.mlp.down_proj.weight"


def gta_triton(base, experts, p, ctx, family, method):
    return F.merge_triton(lower(family, p, ctx, base, len(experts), method), base, experts)


def linear_triton(base, experts, p, ctx):
    return F.merge_triton(lower_linear(p, base, len(experts)), base, experts)


def gta_triton_supports(p, base, experts, ctx, family):
    return F.merge_triton_reasons(lower(family, p, ctx, base, len(experts), "test"), base, experts)




def _run(method, params, base, experts, decisions=None, offset=0):
    spec, family = get_method(method), FAMILIES[method]
    p = spec.validate(params)

    def ctx():
        return TensorContext(name=NAME, decisions=decisions or TensorDecisions(), element_offset=offset)

    out = gta_triton(base, experts, p, ctx(), family, method)
    ref_lowp = merge_family(base.cpu(), [e.cpu() for e in experts], p, ctx(), family, method).to(base.dtype)
    golden = merge_family(base.cpu().double(), [e.cpu().double() for e in experts], p, ctx(), family, method)
    return out, ref_lowp, golden


CASES = [
    ("task_arithmetic", {"lambda": 0.7, "weight": [0.5, 1.0, -0.3, 2.0, 1, 1, 1, 1][:3]}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {}),
    ("ties", {"consensus": "count", "normalize": False, "rescale": "keep_prob"}),
    ("ties", {"disjoint": "sum", "rescale": "l1", "density": 0.5}),
    ("magnitude", {"density": 0.3}),
    ("dare_linear", {"seed": 7}),
    ("dare_linear", {"rescale": "l1", "density": 0.7}),
    ("dare_ties", {"consensus": "count"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "disjoint": "mean"}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_matches_reference(device, method, params, dtype):
    base, experts = make_inputs((37, 53), 3, dtype, seed=1, device=device)
    out, ref_lowp, golden = _run(method, params, base, experts)
    assert out.dtype == dtype and out.shape == base.shape
    assert_close_budget(out, golden, ref_lowp, dtype, what=f"{method} {params}")


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic"])
def test_expert_counts_and_odd_shapes(device, method, n):
    shape = {1: (4099,), 2: (7, 5, 3), 8: (13, 11)}[n]
    base, experts = make_inputs(shape, n, torch.bfloat16, seed=n, device=device)
    out, ref_lowp, golden = _run(method, {"density": 0.4} if method != "task_arithmetic" else {}, base, experts)
    assert_close_budget(out, golden, ref_lowp, torch.bfloat16, what=f"{method} n={n}")


@pytest.mark.parametrize("method", ["ties", "magnitude", "breadcrumbs_ties", "dare_ties"])
def test_tied_inputs_exact(device, method):
    """Values on a 1/8 grid make every operation exact: any difference is a different mask."""
    base, experts = make_tied_inputs((37, 53), 3, torch.float32, device=device)
    params = {"density": [0.3, 0.5, 0.25], "rescale": "none"}
    if method == "breadcrumbs_ties":
        params["gamma"] = 0.05
    out, ref_lowp, _ = _run(method, params, base, experts)
    assert torch.equal(out.cpu(), ref_lowp)


def test_dare_masks_equal_reference_and_are_seeded(device):
    base, experts = make_inputs((37, 53), 1, torch.float32, device=device)
    ctx = TensorContext(name=NAME)
    p = get_method("dare_linear").validate({"density": 0.3, "rescale": "none", "seed": 11})
    out = gta_triton(base, experts, p, ctx, FAMILIES["dare_linear"], "dare_linear")
    kept = (out != base).cpu()
    tau = (experts[0] - base).cpu()
    expected = (rng.uniform(tau.numel(), 11, NAME, 0).view(tau.shape) < 0.3) & (tau != 0)
    assert torch.equal(kept, expected)
    assert abs(float(kept.float().mean()) - 0.3) < 4 * (0.3 * 0.7 / kept.numel()) ** 0.5
    again = gta_triton(base, experts, p, ctx, FAMILIES["dare_linear"], "dare_linear")
    assert torch.equal(out, again)
    other = get_method("dare_linear").validate({"density": 0.3, "rescale": "none", "seed": 12})
    assert not torch.equal(out, gta_triton(base, experts, other, ctx, FAMILIES["dare_linear"], "dare_linear"))


def test_row_chunks_equal_the_whole_tensor(device):
    """DARE's counter-based stream: merging rows 20.. with element_offset gives the same rows."""
    base, experts = make_inputs((37, 53), 3, torch.float32, device=device)
    whole, _, _ = _run("dare_ties", {"seed": 3}, base, experts)
    start = 20 * 53
    part, _, _ = _run("dare_ties", {"seed": 3}, base[20:], [e[20:] for e in experts], offset=start)
    assert torch.equal(part, whole[20:])


def test_decisions(device):
    base, experts = make_inputs((37, 53), 3, torch.float16, device=device)
    cases = [
        ("ties", {}, TensorDecisions(density=[0.1, 0.6, 1.0])),  # TADrop: per-(expert, tensor) densities
        ("ties", {"rescale": "keep_prob"}, TensorDecisions(threshold=[0.05, 0.1, 0.2])),  # model scope
        ("dare_ties", {}, TensorDecisions(keep=[True, False, True])),  # LwPTV
    ]
    for method, params, decisions in cases:  # LwPTV's pruned expert: Keep.NONE in the spec, never read
        out, ref_lowp, golden = _run(method, params, base, experts, decisions)
        assert_close_budget(out, golden, ref_lowp, torch.float16, what=f"{method} {decisions}")


def test_linear(device):
    base, experts = make_inputs((37, 53), 3, torch.bfloat16, device=device)
    ctx = TensorContext(name=NAME)
    for params in ({"weight": [0.2, 0.3, 0.5]}, {"normalize": False, "weight": [1.0, -1.0, 0.5]}):
        p = get_method("linear").validate(params)
        out = linear_triton(base, experts, p, ctx)
        ref_lowp = merge_linear(base.cpu(), [e.cpu() for e in experts], p, ctx).to(torch.bfloat16)
        golden = merge_linear(base.cpu().double(), [e.cpu().double() for e in experts], p, ctx)
        assert_close_budget(out, golden, ref_lowp, torch.bfloat16, what=f"linear {params}")
    # float32 in and out: one fused multiply-add per expert and one division, as the reference
    base32, experts32 = make_inputs((37, 53), 3, torch.float32, device=device)
    p = get_method("linear").validate({"weight": [0.2, 0.3, 0.7]})
    got = linear_triton(base32, experts32, p, ctx).cpu()
    assert torch.equal(got, merge_linear(base32.cpu(), [e.cpu() for e in experts32], p, ctx))


def test_non_contiguous_and_empty(device):
    base, experts = make_inputs((53, 37), 2, torch.float32, device=device)
    views = [t.t() for t in [base, *experts]]
    out, ref_lowp, golden = _run("ties", {}, views[0], views[1:])
    assert_close_budget(out, golden, ref_lowp, torch.float32)
    empty = torch.zeros((0, 3), device=device)
    out, _, _ = _run("task_arithmetic", {}, empty, [empty, empty])
    assert out.shape == (0, 3)


def test_supports_reasons(device):
    base, experts = make_inputs((4, 4), 2, torch.float32, device=device)
    ctx = TensorContext(name=NAME)
    ties = get_method("ties").validate({})
    assert gta_triton_supports(ties, base, experts, ctx, FAMILIES["ties"]) == []
    della = get_method("della").validate({})
    assert "DELLA" in " ".join(gta_triton_supports(della, base, experts, ctx, Family("della", True)))
    many = [experts[0]] * 17
    assert "17 experts" in " ".join(gta_triton_supports(ties, base, many, ctx, FAMILIES["ties"]))
    mixed = [experts[0], experts[1].half()]
    assert "different dtypes" in " ".join(gta_triton_supports(ties, base, mixed, ctx, FAMILIES["ties"]))
    doubles = [e.double() for e in experts]
    assert "fp32/bf16/fp16" in " ".join(gta_triton_supports(ties, base.double(), doubles, ctx, FAMILIES["ties"]))
    if device == "cpu":
        os.environ.pop("TRITON_INTERPRET")
        try:
            assert "CUDA tensors" in " ".join(gta_triton_supports(ties, base, experts, ctx, FAMILIES["ties"]))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


def test_dispatch_through_the_registry(device):
    """The registered triton implementation: an explicit backend="triton" runs the kernel and
    agrees with the reference; della raises with the reason."""
    base, experts = make_inputs((37, 53), 3, torch.bfloat16, device=device)
    out = tm.merge_tensors("ties", base, experts, backend="triton", density=0.3)
    expected = tm.merge_tensors("ties", base.cpu(), [e.cpu() for e in experts], backend="torch", density=0.3)
    golden = tm.merge_tensors("ties", base.cpu().double(), [e.cpu().double() for e in experts], backend="torch", density=0.3)
    assert_close_budget(out, golden, expected, torch.bfloat16)
    if device == "cpu":  # the interpreter does no FMA contraction: bit-identical to the reference
        assert torch.equal(out, expected)
    with pytest.raises(BackendUnavailableError, match="DELLA"):
        tm.merge_tensors("della", base, experts, backend="triton")


def test_building_block_dispatch(device, monkeypatch):
    base, experts = make_inputs((37, 53), 2, torch.float32, device=device)
    stats = backends.run_op("task_vector_stats", base, experts, backend="triton")
    assert torch.allclose(stats, backends.run_op("task_vector_stats", base, experts, backend="torch"), rtol=1e-5, atol=1e-6)
    m = (experts[0] - base).abs()
    mask = backends.run_op("topk_mask", m, 100, backend="triton")
    assert torch.equal(mask.cpu(), backends.run_op("topk_mask", m.cpu(), 100, backend="torch"))
    assert backends.run_op("kth_largest", m, 100, backend="triton") == backends.run_op("kth_largest", m.cpu(), 100)
    used, _ = backends.dispatch("task_vector_stats", base, experts, backend="triton")
    assert used == "triton" and backends.usage()["task_vector_stats"]["triton"] >= 2
    if device == "cpu":
        used, _ = backends.dispatch("kth_largest", m, 100)
        assert used == "torch", "auto never picks the interpreter"
        monkeypatch.delenv("TRITON_INTERPRET")
        backends.triton_status.cache_clear()
        try:
            with pytest.raises(BackendUnavailableError, match="CUDA"):
                backends.run_op("kth_largest", m, 100, backend="triton")
        finally:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            backends.triton_status.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic"])
def test_full_size_gpu(method):
    base, experts = make_inputs((4096, 4099), 8, torch.bfloat16, device="cuda")
    spec, family = get_method(method), FAMILIES[method]
    p = spec.validate({"density": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]} if method != "task_arithmetic" else {})
    ctx = TensorContext(name=NAME)
    out = gta_triton(base, experts, p, ctx, family, method)
    ref_lowp = merge_family(base, experts, p, ctx, family, method).to(base.dtype)
    golden = merge_family(base.double(), [e.double() for e in experts], p, ctx, family, method)
    assert_close_budget(out, golden, ref_lowp, torch.bfloat16, what=method)
