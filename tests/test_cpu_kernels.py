"""The fused CPU loops (backends/cpu/kernels.py + backends/cpu/merge_cpu.c) against the torch reference.

The reference (ops/merge_spec.merge_by_spec of the family's lowering: methods/task_arithmetic.
merge_family / merge_linear) is the specification, and the C loops perform the same float32 operations in the same order, so outputs must be bit-identical
(``torch.equal``), except ``rescale="l1"`` whose float64 norms are summed in another order.
Inputs come from a coarse grid of values so that many |τ| tie exactly at the top-k threshold:
the kept count and which ties win (lowest flat index) are where implementations disagree.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

import tritonmerge as tm
from tritonmerge import backends
from tritonmerge.api import analyze, merge_one
from tritonmerge.context import MergeReport, TensorContext, TensorDecisions
from tritonmerge.errors import BackendUnavailableError
from tritonmerge.methods.task_arithmetic import lower, lower_linear, merge_family, merge_linear
from tritonmerge.backends.cpu import kernels as ck
from tritonmerge.backends.cpu import merge as cpu_merge
from tritonmerge.ops.select import keep_count, kth_largest, model_thresholds, topk_mask
from tritonmerge.catalog import get_method, method_table
from tritonmerge.source import InMemorySource

pytestmark = pytest.mark.skipif(ck.status() is not None, reason=f"{ck.status()}")


def gta_cpu(base, experts, p, ctx, family, method):
    return cpu_merge.merge_cpu(lower(family, p, ctx, base, len(experts), method), base, experts)


def linear_cpu(base, experts, p, ctx):
    return cpu_merge.merge_cpu(lower_linear(p, base, len(experts)), base, experts)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (127, 129), (1000, 37)]
N_EXPERTS = [1, 2, 3, 8]
FAMILY = {name: m.family for name, m in method_table().items() if m.family is not None}

# Parameter sets per method; each parity case takes one, rotating with the case index, so that
# every set meets several dtypes, shapes and expert counts without a full cross product.
PARAMS = {
    "linear": [{}, {"normalize": False}, {"weight": "mixed"}],
    "task_arithmetic": [{}, {"normalize": True, "weight": "mixed"}, {"lambda": 0.7}],
    "ties": [
        {},
        {"density": "mixed", "consensus": "count", "lambda": 1.3},
        {"disjoint": "sum", "weight": "mixed"},
        {"normalize": False, "rescale": "keep_prob"},
        {"density": 0.5, "weight": "signed"},
        {"topk_scope": "model", "density": 0.3},
    ],
    "magnitude": [{}, {"density": "mixed", "rescale": "keep_prob"}, {"normalize": True, "weight": "mixed"}],
    "dare_linear": [{}, {"density": "mixed", "seed": 7}, {"rescale": "none", "lambda": 0.5}],
    "dare_ties": [{}, {"consensus": "count", "disjoint": "mean"}, {"normalize": False, "density": "mixed"}],
}


def grid_tensors(shape, n, dtype, seed):
    """base and experts whose values and task vectors lie on a coarse grid (exact in every
    dtype): |τ| takes only 8 values, so top-k thresholds almost always split a set of ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, shape, generator=gen).double() * 0.125
    experts = []
    for _ in range(n):
        magnitude = torch.randint(0, 8, shape, generator=gen).double() * 0.25
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        experts.append(base + magnitude * sign)
    return base.to(dtype), [e.to(dtype) for e in experts]


def resolve(params: dict, n: int) -> dict:
    out = {}
    for key, value in params.items():
        if value == "mixed":
            value = [0.15 + 0.7 * i / max(1, n - 1) for i in range(n)] if key == "density" else [0.3 + 0.4 * i for i in range(n)]
        elif value == "signed":
            value = [(-0.5 if i % 3 == 2 else 1.0 + 0.25 * i) for i in range(n)]
        out[key] = value
    return out


def reference_and_cpu(method, base, experts, params, ctx):
    spec = get_method(method)
    p = spec.validate(params)
    if method == "linear":
        ref = merge_linear(base, experts, p, ctx).to(base.dtype)
        got = linear_cpu(base, experts, p, ctx)
    else:
        ref = merge_family(base, experts, p, ctx, FAMILY[method], method).to(base.dtype)
        got = gta_cpu(base, experts, p, ctx, FAMILY[method], method)
    return ref, got


def model_scope_context(base, experts, params, name="w"):
    """Decisions as analyze_model_topk makes them, for a one-tensor model."""
    spec = get_method("ties")
    p = spec.validate(params)
    decisions = analyze(spec, p, InMemorySource({name: base}, [{name: e} for e in experts]))
    return TensorContext(name=name, decisions=decisions.tensors[name])


CASES = [
    (method, dtype, shape, n)
    for method in PARAMS
    for dtype, shape, n in itertools.product(DTYPES, SHAPES, N_EXPERTS)
]


@pytest.mark.parametrize(
    "method,dtype,shape,n", CASES, ids=[f"{m}-{str(d)[6:]}-{'x'.join(map(str, s))}-n{n}" for m, d, s, n in CASES]
)
def test_parity_with_reference(method, dtype, shape, n):
    index = CASES.index((method, dtype, shape, n))
    options = PARAMS[method]
    params = resolve(options[index % len(options)], n)
    base, experts = grid_tensors(shape, n, dtype, seed=index)
    if params.get("topk_scope") == "model":
        ctx = model_scope_context(base, experts, params)
    else:
        ctx = TensorContext(name=f"layers.{index}.w")
    ref, got = reference_and_cpu(method, base, experts, params, ctx)
    assert got.dtype == base.dtype and got.shape == base.shape
    assert torch.equal(got, ref), f"max |diff| {(got.double() - ref.double()).abs().max().item()} with {params}"


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "magnitude"])
def test_parity_histogram_select_path(method, dtype, n):
    """Tensors above 2^17 elements find thresholds by histograms (smaller ones by quickselect)."""
    base, experts = grid_tensors((400, 347), n, dtype, seed=n)
    params = resolve({"density": "mixed", "weight": "signed"}, n)
    ref, got = reference_and_cpu(method, base, experts, params, TensorContext(name="w"))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude", "dare_linear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_l1_rescale_within_rounding(method, dtype):
    base, experts = grid_tensors((127, 129), 3, dtype, seed=1)
    base = base + (torch.rand(base.shape, generator=torch.Generator().manual_seed(2)) * 1e-2).to(dtype)
    params = {"rescale": "l1", "density": [0.2, 0.5, 0.9]}
    ref, got = reference_and_cpu(method, base, experts, params, TensorContext(name="w"))
    # the norms' float64 sums run in another order: the scale may differ in its last float32 bit
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-7 if dtype == torch.float32 else 1e-2, atol=0)


def test_normal_data_is_bit_exact():
    """Continuous data (the common case, few ties), several chunks, both thread counts."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 1000, generator=gen) * 0.02
    experts = [base + 0.002 * torch.randn(300, 1000, generator=gen) for _ in range(3)]
    for dtype in DTYPES:
        b, es = base.to(dtype), [e.to(dtype) for e in experts]
        for method, params in [("ties", {}), ("dare_ties", {"density": 0.3}), ("task_arithmetic", {"weight": [0.2, 0.5, 0.3]})]:
            ref, got = reference_and_cpu(method, b, es, params, TensorContext(name="model.w"))
            assert torch.equal(got, ref), (dtype, method)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ties_across_chunks_keep_lowest_indices(threads, monkeypatch):
    """Ties split across many chunks: the kept ties are the lowest flat indices, whatever the
    number of threads, and the kept count is exactly ⌊density·n⌋."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    base, experts = grid_tensors((300, 1111), 2, torch.float32, seed=3)  # ~5 chunks of 64Ki
    for density in (0.05, 0.37, 0.81):
        ref, got = reference_and_cpu("magnitude", base, experts[:1], {"density": density}, TensorContext(name="w"))
        assert torch.equal(got, ref)
        assert int((got != base).sum()) <= keep_count(density, base.numel())
        tau = experts[0] - base
        expected_mask = topk_mask(tau.abs(), keep_count(density, base.numel()))
        assert torch.equal((got - base) != 0, expected_mask & (tau != 0))


@pytest.mark.parametrize("shape", [(1000, 37), (400, 347)], ids=["quickselect", "histograms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_select_matches_kth_largest(dtype, shape):
    base, experts = grid_tensors(shape, 3, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    experts[2] = (base.double() + torch.randn(base.shape, generator=gen)).to(dtype)  # continuous
    a, alive = ck.make_args(base, experts, numel=base.numel())
    ks = [1, 12345, base.numel()]
    thr, greater, tied = ck.topk_select(a, [0, 1, 2], ks)
    for i, k in enumerate(ks):
        mag = (experts[i].float() - base.float()).abs()
        assert thr[i] == kth_largest(mag, k)
        assert greater[i] == int((mag > thr[i]).sum())
        assert tied[i] == int((mag == thr[i]).sum())
        assert greater[i] < k <= greater[i] + tied[i]
    del alive


def test_histograms_match_bincount():
    base, experts = grid_tensors((127, 129), 2, torch.bfloat16, seed=6)
    experts.append(None)  # a zero task vector (the expert is the base) counts in bin 0
    high = ck.hist_high(base, experts)
    low = ck.hist_low(base, experts, [0x3E80, 0x3F00, 0])
    for i, e in enumerate(experts):
        mag = torch.zeros(base.shape) if e is None else (e.float() - base.float()).abs()
        bits = mag.view(torch.int32).flatten()
        assert torch.equal(high[i], torch.bincount(bits >> 16, minlength=ck.HIGH_BINS))
        b = [0x3E80, 0x3F00, 0][i]
        assert torch.equal(low[i], torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=ck.LOW_BINS))


def test_model_thresholds_cpu_matches_select():
    """model_thresholds_cpu (fused histograms) == ops.select.model_thresholds (torch bincount),
    with a pruned expert (None: zeros) and a float64 tensor that takes the torch fallback."""
    tensors = [grid_tensors(s, 3, torch.bfloat16, seed=i) for i, s in enumerate([(50, 41), (7,), (300, 20)])]
    tensors[1][1][2] = None
    b64, e64 = grid_tensors((9, 4), 3, torch.float64, seed=7)
    tensors.append((b64, e64))
    counts = [1000, 3000, 17]

    def magnitudes():
        for base, experts in tensors:
            yield [torch.zeros(base.shape) if e is None else (e.float() - base.float()).abs() for e in experts]

    expected = model_thresholds(magnitudes, counts)
    assert cpu_merge.model_thresholds_cpu(lambda: iter(tensors), counts) == expected
    with pytest.raises(ValueError, match="out of range"):
        cpu_merge.model_thresholds_cpu(lambda: iter(tensors), [10**9, 1, 1])


@pytest.mark.parametrize("offset", [0, 12345, (1 << 32) - 500])
def test_dare_masks_match_reference_with_chunk_offsets(offset):
    """The counter-based hash gives the reference's mask for a row chunk at any element offset,
    including chunks whose indices cross 2³² (the hash's high word changes)."""
    base = torch.zeros(1000)
    experts = [torch.full((1000,), 1.0), torch.full((1000,), -2.0)]
    ctx = TensorContext(name="layers.3.mlp.w", element_offset=offset)
    params = {"density": 0.3, "rescale": "none", "seed": 11}
    ref, got = reference_and_cpu("dare_linear", base, experts, params, ctx)
    assert torch.equal(got, ref)
    mask0 = gta_cpu(base, experts[:1], get_method("dare_linear").validate(params), ctx, FAMILY["dare_linear"], "")
    assert 200 < int((mask0 != 0).sum()) < 400
    # a chunk of a bigger tensor equals the same rows of the whole tensor's merge
    whole = gta_cpu(
        torch.zeros(3000), [torch.ones(3000)], get_method("dare_linear").validate(params),
        TensorContext(name="layers.3.mlp.w", element_offset=offset - 1000 if offset >= 1000 else 0),
        FAMILY["dare_linear"], "",
    )
    if offset >= 1000:
        assert torch.equal(whole[1000:2000], mask0)


def test_pruned_expert_is_not_read_and_matches_reference():
    """LwPTV keep=False: the lowering makes the pruned expert Keep.NONE, a zero task vector that
    no executor reads (its NaN values never reach the output)."""
    base, experts = grid_tensors((127, 129), 3, torch.bfloat16, seed=8)
    experts[1] = torch.full_like(experts[1], float("nan"))
    for method in ("ties", "task_arithmetic", "dare_ties"):
        spec = get_method(method)
        p = spec.validate({"normalize": True} if method == "task_arithmetic" else {})
        outs = {}
        for backend in ("torch", "cpu"):
            ctx = TensorContext(name="layers.1.w", decisions=TensorDecisions(keep=[True, False, True]))
            outs[backend] = merge_one(spec, p, base, experts, ctx, backend=backend)
        assert torch.equal(outs["cpu"], outs["torch"]), method
        assert bool(torch.isfinite(outs["cpu"]).all()), method


def test_mixed_dtypes_and_rounding():
    """fp32 experts on an fp16/bf16 base: the output rounding (RNE, subnormals, overflow) is torch's."""
    gen = torch.Generator().manual_seed(9)
    values = torch.cat([
        torch.randn(4000, generator=gen) * 1e-6,  # fp16 subnormals
        torch.randn(4000, generator=gen) * 3e4,  # near and beyond fp16's 65504
        torch.randn(4000, generator=gen),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1.0 + 2.0**-11]),
    ])
    for dtype in (torch.float16, torch.bfloat16):
        base = torch.zeros(values.shape, dtype=dtype)
        p = get_method("linear").validate({"normalize": False})
        out = linear_cpu(base, [values], p, TensorContext())
        assert torch.equal(out, values.to(dtype))
        out = gta_cpu(base, [values], get_method("task_arithmetic").validate({}), TensorContext(), FAMILY["task_arithmetic"], "")
        assert torch.equal(out, merge_family(base, [values], get_method("task_arithmetic").validate({}), TensorContext(), FAMILY["task_arithmetic"], "").to(dtype))


def test_dispatch_picks_cpu_and_falls_back_for_unsupported():
    base, experts = grid_tensors((7, 5), 2, torch.float32, seed=10)
    report = MergeReport()
    tm.merge_tensors("ties", base, experts, name="a", report=report)
    assert report.backends["a"] == "cpu"
    # γ·n < 1 removes no outliers: a plain top-k, which the C loops run
    tm.merge_tensors("breadcrumbs", base, experts, name="b", report=report)
    assert report.backends["b"] == "cpu"
    tm.merge_tensors("breadcrumbs", base, experts, name="c", report=report, gamma=0.1)
    assert report.backends["c"] == "torch"
    with pytest.raises(BackendUnavailableError, match="removing the largest entries .breadcrumbs. is not implemented"):
        tm.merge_tensors("breadcrumbs", base, experts, backend="cpu", gamma=0.1)
    assert torch.equal(
        tm.merge_tensors("breadcrumbs", base, experts, backend="cpu"),
        tm.merge_tensors("breadcrumbs", base, experts, backend="torch"),
    )
    many = [experts[0]] * 17
    with pytest.raises(BackendUnavailableError, match="at most 16 experts"):
        tm.merge_tensors("task_arithmetic", base, many, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="float32/bfloat16/float16"):
        tm.merge_tensors("ties", base.double(), [e.double() for e in experts], backend="cpu")


def test_inputs_not_mutated_and_non_contiguous():
    base, experts = grid_tensors((40, 30), 3, torch.bfloat16, seed=12)
    experts_t = [e.t() for e in experts]
    base_t = base.t()
    copies = [t.clone() for t in (base_t, *experts_t)]
    p = get_method("ties").validate({})
    got = gta_cpu(base_t, experts_t, p, TensorContext(name="w"), FAMILY["ties"], "ties")
    ref = merge_family(base_t, experts_t, p, TensorContext(name="w"), FAMILY["ties"], "ties").to(base.dtype)
    assert torch.equal(got, ref)
    for before, after in zip(copies, (base_t, *experts_t)):
        assert torch.equal(before, after)


@pytest.fixture
def fresh_library():
    ck.reset()
    yield
    ck.reset()


def test_compile_failure_is_a_reason_not_an_exception(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("TRITONMERGE_CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TRITONMERGE_CACHE_DIR", str(tmp_path / "cache"))
    why = ck.status()
    assert why is not None and "no-such-compiler" in why
    assert backends.cpu_status() == why
    base, experts = grid_tensors((7, 5), 2, torch.float32, seed=13)
    report = MergeReport()
    out = tm.merge_tensors("ties", base, experts, name="w", report=report)  # auto: falls back
    assert report.backends["w"] == "torch"
    assert torch.equal(out, tm.merge_tensors("ties", base, experts, name="w", backend="torch"))
    with pytest.raises(BackendUnavailableError, match="no-such-compiler"):
        tm.merge_tensors("ties", base, experts, backend="cpu")


def test_broken_source_is_a_reason(monkeypatch, tmp_path, fresh_library):
    bad = tmp_path / "merge_cpu.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(ck, "source_path", lambda: bad)
    monkeypatch.setenv("TRITONMERGE_CACHE_DIR", str(tmp_path / "cache"))
    why = ck.status()
    assert why is not None and "compiling" in why
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind


def test_build_is_cached(monkeypatch, tmp_path, fresh_library):
    monkeypatch.setenv("TRITONMERGE_CACHE_DIR", str(tmp_path))
    assert ck.status() is None
    built = list(tmp_path.glob("merge_cpu-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    ck.reset()
    assert ck.status() is None
    assert built[0].stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


def test_merge_without_segment_tie_counts_reads_them_itself(monkeypatch):
    """tm_merge given thresholds but no per-segment tie counts (seg_ties = NULL) counts the ties
    in an extra read and keeps the same lowest-index ties."""
    base, experts = grid_tensors((300, 1111), 3, torch.bfloat16, seed=14)
    p = get_method("ties").validate({"density": [0.1, 0.45, 0.8]})
    ref = merge_family(base, experts, p, TensorContext(name="w"), FAMILY["ties"], "ties").to(base.dtype)
    real_select = ck.topk_select
    partial = []

    def select_then_forget(args, which, k):
        thr, greater, tied = result = real_select(args, which, k)
        partial.extend(i for i in which if 0 < k[i] - greater[i] < tied[i])
        args.seg_ties = None
        return result

    monkeypatch.setattr(ck, "topk_select", select_then_forget)
    got = gta_cpu(base, experts, p, TensorContext(name="w"), FAMILY["ties"], "ties")
    assert torch.equal(got, ref)
    assert partial == [0, 1, 2]  # every expert kept only some of its ties: the counting path ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_nonfinite(dtype):
    x = torch.randn(70_000, generator=torch.Generator().manual_seed(15)).to(dtype)
    assert ck.count_nonfinite(x) == 0
    x[[3, 65_537, 69_999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert ck.count_nonfinite(x) == 3
    assert ck.count_nonfinite(x[::2]) == int((~torch.isfinite(x[::2])).sum())  # non-contiguous


def test_portable_build_is_bit_exact_too(monkeypatch, tmp_path, fresh_library):
    """The baseline-ISA build (what a machine without AVX2 runs) gives the same bits."""
    monkeypatch.setenv("TRITONMERGE_CPU_ISA", "baseline")
    monkeypatch.setenv("TRITONMERGE_CACHE_DIR", str(tmp_path))
    assert ck.status() is None and "baseline ISA" in ck.build_info()
    for method, params in [("ties", {"density": [0.1, 0.5]}), ("dare_ties", {}), ("task_arithmetic", {"normalize": True})]:
        for dtype in DTYPES:
            base, experts = grid_tensors((300, 301), 2, dtype, seed=16)
            ref, got = reference_and_cpu(method, base, experts, params, TensorContext(name="w"))
            assert torch.equal(got, ref), (method, dtype)


# --- the sample-bracket top-k select (one pass in the common case) ---------------------------


def _select_datasets():
    """(name, base, experts): continuous data, a coarse grid (8 magnitudes: huge ties at every
    threshold), a finer grid (4096 magnitudes: ties that straddle bracket edges) and bf16
    fine-tuning-like data (few distinct |τ| per exponent), plus a zero task vector."""
    gen = torch.Generator().manual_seed(21)
    shape = (300, 1111)  # ~5 chunks of 64Ki: several segments with 1-3 threads
    base = torch.randn(shape, generator=gen) * 0.02
    continuous = [base + 0.002 * torch.randn(shape, generator=gen) for _ in range(2)]
    fine = [base + torch.randint(-2048, 2048, shape, generator=gen).float() * 2.0**-12 for _ in range(2)]
    b16 = base.bfloat16()
    tuned = [(base + 0.002 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(2)]
    grid_base, grid = grid_tensors(shape, 2, torch.float32, seed=22)
    return [
        ("continuous", base, continuous),
        ("grid8", grid_base, grid),
        ("grid4096", base, fine),
        ("bf16", b16, tuned),
        ("zero-tau", base, [base.clone(), continuous[0]]),
    ]


SELECT_FLAGS = {
    "auto": 0,
    "narrow": ck.SELECT_NARROW,
    "tiny": ck.SELECT_TINY,
    "narrow+tiny": ck.SELECT_NARROW | ck.SELECT_TINY,
}


@pytest.fixture(params=["native", "baseline"])
def isa(request, monkeypatch, tmp_path_factory):
    """The library as this machine loads it (the AVX-512 bracket scan where the CPU has it),
    and the baseline-ISA build (the portable scan through byte flags)."""
    if request.param == "baseline":
        ck.reset()
        monkeypatch.setenv("TRITONMERGE_CPU_ISA", "baseline")
        monkeypatch.setenv("TRITONMERGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "baseline-kernels"))
        assert ck.status() is None and "baseline ISA" in ck.build_info()
    yield request.param
    if request.param == "baseline":
        ck.reset()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("flags", list(SELECT_FLAGS), ids=list(SELECT_FLAGS))
def test_bracket_select_equals_histograms(flags, threads, isa):
    """Every way the bracket select can go (one pass, misses, overflows and narrowing passes,
    one-value bins) gives the histograms' threshold, counts and per-segment ties exactly, with
    either scan of the bracket."""
    ks = lambda numel: [1, keep_count(0.2, numel), keep_count(0.63, numel), numel]  # noqa: E731
    for name, base, experts in _select_datasets():
        numel = base.numel()
        for k in ks(numel):
            a, alive = ck.make_args(base, experts, numel=numel, threads=threads)
            got = ck.topk_select(a, [0, 1], [k, k], flags=SELECT_FLAGS[flags])
            got_ties, paths = list(a._seg_ties), a._select_paths
            h, alive_h = ck.make_args(base, experts, numel=numel, threads=threads)
            want = ck.topk_select(h, [0, 1], [k, k], flags=ck.SELECT_NO_SAMPLE)
            assert h._select_paths == ["histogram", "histogram"]
            assert got == want, (name, k, paths)
            assert got_ties == list(h._seg_ties), (name, k, paths)
            assert all(p.startswith("bracket/") for p in paths), (name, k, paths)  # no fallback needed
            for i, e in enumerate(experts):
                mag = (e.float() - base.float()).abs()
                assert got[0][i] == kth_largest(mag, k)
            del alive, alive_h


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sign_agreement_in_one_read_equals_two_reads(threads, isa):
    """TADrop's agreement count in the select's read (the flags of the bracket's candidates)
    gives the counts of the two reads for every way the bracket can go: one read where it
    resolves at once, the two reads after a miss (a one-value bracket) or an overflow (64-entry
    buffers), and with the portable build (no AVX-512); top-1, ties split by the threshold, an
    expert keeping everything, and k = 0."""
    reads = {}
    for name, base, experts in _select_datasets():
        numel = base.numel()
        for k in ([1, keep_count(0.2, numel)], [keep_count(0.63, numel), numel], [0, keep_count(0.05, numel)]):
            want = ck.sign_agreement(base, experts, k, threads=threads, flags=ck.SELECT_NO_SAMPLE)
            assert ck.sign_agreement.reads == 2
            for flags in SELECT_FLAGS:
                got = ck.sign_agreement(base, experts, k, threads=threads, flags=SELECT_FLAGS[flags])
                assert got == want, (name, k, flags)
                reads.setdefault(flags, set()).add(ck.sign_agreement.reads)
                if flags == "auto" and name in ("continuous", "bf16"):
                    assert ck.sign_agreement.reads == (1 if isa == "native" else 2), (name, k)
    if isa == "native":  # both ways taken: one read, and the two after a miss or an overflow
        assert reads["auto"] >= {1} and 2 in reads["narrow"] | reads["tiny"] | reads["narrow+tiny"], reads
    else:
        assert set().union(*reads.values()) == {2}, reads


def test_bracket_select_paths():
    """The common case takes one pass; forced misses and overflows take more, never the
    histogram fallback."""
    _, base, experts = _select_datasets()[0]
    k = keep_count(0.2, base.numel())
    passes = {}
    for flags in SELECT_FLAGS:
        a, alive = ck.make_args(base, experts, numel=base.numel(), threads=2)
        ck.topk_select(a, [0, 1], [k, k], flags=SELECT_FLAGS[flags])
        passes[flags] = [int(p.split("/")[1]) for p in a._select_paths]
    assert passes["auto"] == [1, 1]
    assert all(p >= 2 for p in passes["narrow"] + passes["tiny"] + passes["narrow+tiny"])


@pytest.mark.parametrize("flags", list(SELECT_FLAGS), ids=list(SELECT_FLAGS))
def test_merge_parity_through_every_select_path(flags, monkeypatch):
    """The merged tensor equals the reference (ties resolved lowest index first) whichever way
    the thresholds were found."""
    real = ck.topk_select
    monkeypatch.setattr(ck, "topk_select", lambda args, which, k: real(args, which, k, flags=SELECT_FLAGS[flags]))
    for name, base, experts in _select_datasets():
        for method, params in [("ties", {"density": [0.1, 0.45]}), ("magnitude", {"density": 0.3, "weight": [1.0, -0.5]})]:
            ref, got = reference_and_cpu(method, base, experts, params, TensorContext(name="w"))
            assert torch.equal(got, ref), (name, method)


# --- task-vector statistics ------------------------------------------------------------------

from tritonmerge.ops.stats import STAT_COLUMNS, task_vector_stats_reference  # noqa: E402


def _assert_stats_close(got, ref, base, experts):
    """count and max|x| exactly; each sum within 1e-10 of Σ|x|ᵖ (float64 summation order only)."""
    assert got.shape == ref.shape and got.dtype == torch.float64
    assert torch.equal(got[:, 0], ref[:, 0])
    assert torch.equal(got[:, 4], ref[:, 4]) or (got[:, 4].isnan() == ref[:, 4].isnan()).all()
    for i, e in enumerate(experts):
        x = e.double().flatten() - base.double().flatten()
        scale = {1: x.abs().sum(), 2: (x * x).sum(), 3: x.abs().sum(), 5: (x.abs() ** 3).sum(), 6: (x**4).sum()}
        for col, s in scale.items():
            assert abs(float(got[i, col]) - float(ref[i, col])) <= 1e-10 * float(s) + 1e-300, (STAT_COLUMNS[col], i)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_vector_stats_cpu_matches_reference(dtype, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(31)
    base = (torch.randn(300, 700, generator=gen) * 0.02).to(dtype)  # ~3 chunks, a partial block
    experts = [(base.double() + 0.002 * torch.randn(300, 700, generator=gen) * (i + 1)).to(dtype) for i in range(3)]
    experts.append(base.clone())  # a zero task vector
    got = cpu_merge.task_vector_stats_cpu(base, experts)
    ref = task_vector_stats_reference(base, experts)
    _assert_stats_close(got, ref, base, experts)
    assert torch.equal(got, cpu_merge.task_vector_stats_cpu(base, experts))  # deterministic
    assert float(got[3, 2]) == 0.0 and float(got[0, 2]) > 0


def _sign_count_cases(dtype, n_max, seed, nan=True):
    """(name, base, experts): grid inputs (|τ| on 8 values: thresholds split ties, many exact
    zeros of the others' sum) in shapes that leave partial 16-entry groups and span several
    segments, a zero task vector, continuous task vectors of mixed sizes with an Inf (and a NaN
    unless ``nan`` is false), and experts of mixed dtypes."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for case, (shape, n) in enumerate([((7,), 2), ((127, 129), 3), ((1000, 37), min(4, n_max)), ((600, 700), 3)]):
        base, experts = grid_tensors(shape, n, dtype, seed=seed + case)
        if case == 2:
            experts[-1] = base.clone()
        cases.append((f"grid{shape}", base, experts))
    base = (torch.randn(300, 701, generator=gen) * 0.02).to(dtype)
    noisy = [(base.double() + 1e-3 * (i + 1) * torch.randn(300, 701, generator=gen, dtype=torch.float64)).to(dtype) for i in range(3)]
    if nan:
        noisy[0].view(-1)[17] = float("nan")
    noisy[1].view(-1)[40_000] = float("inf")
    cases.append(("continuous+inf", base, noisy))
    mixed = [noisy[1].float(), noisy[2].bfloat16(), (base.double() - 2e-3).half()]
    cases.append(("mixed dtypes", base, mixed))
    return cases


def _nonfinite_sums(base, experts):
    """Entries where the float64 sum of the task vectors is NaN/Inf (what the counting loops'
    input audit counts)."""
    total = sum(e.double() - base.double() for e in experts)
    return int((~torch.isfinite(total)).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_sign_agreement_cpu_equals_reference(dtype, threads, isa, monkeypatch):
    """TADrop's sign_agreement: the same counts as the reference, so the same values bit for bit,
    with the AVX-512 loop and the portable one: top-k thresholds splitting a set of ties spread
    over the segments of several threads, tails of partial 16-entry groups, NaN/Inf and mixed
    dtypes; the input audit counts the non-finite sums. (No NaN: the reference's top-k gives a
    NaN's place to one more tie, the fused select does not.)"""
    from tritonmerge.ops.stats import sign_agreement_reference

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for name, base, experts in _sign_count_cases(dtype, 4, seed=40, nan=False):
        densities = [0.1, 0.5, 1.0, 0.03][: len(experts)]
        audit = ck.start_audit()
        try:
            got = cpu_merge.sign_agreement_cpu(base, experts, densities)
        finally:
            ck.stop_audit(audit)
        want = sign_agreement_reference(base, experts, densities)
        assert torch.equal(got.isnan(), want.isnan()), (name, got, want)
        assert torch.equal(got.nan_to_num(-1), want.nan_to_num(-1)), (name, got, want)
        assert audit.nonfinite == _nonfinite_sums(base, experts), name
    assert backends.dispatch("sign_agreement", base, experts, densities)[0] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_sign_counts_cpu_equals_reference(dtype, threads, isa, monkeypatch):
    """LwPTV's sign_conflict counts: the same float64 sums in the same order, so equal counts,
    with the AVX-512 loop and the portable one, on the inputs of the sign_agreement test, one
    expert and five; the input audit counts the non-finite sums."""
    from tritonmerge.ops.stats import sign_counts_reference

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cases = _sign_count_cases(dtype, 5, seed=50)
    base, experts = grid_tensors((1000, 37), 5, dtype, seed=59)
    cases += [("one expert", base, experts[:1]), ("five experts", base, experts)]
    for name, base, experts in cases:
        audit = ck.start_audit()
        try:
            got = cpu_merge.sign_counts_cpu(base, experts)
        finally:
            ck.stop_audit(audit)
        assert torch.equal(got, sign_counts_reference(base, experts)), name
        assert audit.nonfinite == _nonfinite_sums(base, experts), name
    assert backends.dispatch("sign_counts", base, experts)[0] == "cpu"


def test_task_vector_stats_cpu_edge_cases():
    """Mixed dtypes, tiny and empty tensors, NaN/Inf, more than 16 experts, and inputs the C
    loop does not take (float64: the reference runs)."""
    gen = torch.Generator().manual_seed(32)
    base = torch.randn(37, generator=gen)
    mixed = [base.bfloat16(), (base + 1).half(), base * 3]
    _assert_stats_close(cpu_merge.task_vector_stats_cpu(base, mixed), task_vector_stats_reference(base, mixed), base, mixed)
    empty = torch.zeros(0)
    got = cpu_merge.task_vector_stats_cpu(empty, [empty, empty])
    assert torch.equal(got, task_vector_stats_reference(empty, [empty, empty]))
    bad = base.clone()
    bad[5], bad[9] = float("nan"), float("inf")
    got = cpu_merge.task_vector_stats_cpu(base, [bad])
    assert got[0, 4].isnan() and got[0, 1].isnan() and float(got[0, 0]) == 37
    inf_only = base.clone()
    inf_only[3] = float("inf")
    assert float(cpu_merge.task_vector_stats_cpu(base, [inf_only])[0, 4]) == float("inf")
    many = [base + 0.01 * i for i in range(19)]
    _assert_stats_close(cpu_merge.task_vector_stats_cpu(base, many), task_vector_stats_reference(base, many), base, many)
    b64 = base.double()
    assert torch.equal(cpu_merge.task_vector_stats_cpu(b64, [b64 + 1]), task_vector_stats_reference(b64, [b64 + 1]))


def test_merge_counts_nonfinite_outputs():
    """The fused merge counts the NaN/Inf it writes (fp16 overflow here), so that the engine's
    output check needs no extra read; a tensor changed since, or not from the merge, is unknown."""
    base = torch.zeros(70_000, dtype=torch.float16)
    big = torch.zeros(70_000)
    big[[5, 66_000]] = 1e6  # beyond fp16's range: rounds to inf
    p = get_method("task_arithmetic").validate({})
    out = gta_cpu(base, [big], p, TensorContext(name="w"), FAMILY["task_arithmetic"], "")
    assert cpu_merge.known_nonfinite(out) == 2 == int((~torch.isfinite(out)).sum())
    fine = linear_cpu(base, [big * 0], get_method("linear").validate({}), TensorContext())
    assert cpu_merge.known_nonfinite(fine) == 0
    fine[0] = float("nan")
    assert cpu_merge.known_nonfinite(fine) is None  # modified in place since
    assert cpu_merge.known_nonfinite(torch.zeros(3)) is None


def test_thread_limit_applies_to_its_thread_only():
    """``limit_threads`` (set by the engine on its reader thread) bounds the fused calls made
    from that thread and leaves the others at torch's count."""
    seen = {}

    def helper():
        ck.limit_threads(1)
        seen["helper"] = ck.make_args(torch.zeros(8), [torch.ones(8)], numel=8)[0].n_threads

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen["helper"] == 1
    assert ck.make_args(torch.zeros(8), [torch.ones(8)], numel=8)[0].n_threads == torch.get_num_threads()
