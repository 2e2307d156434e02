"""Triton kernel benchmarks (pytest-benchmark): exact top-k threshold selection and the fused TIES merge.

GPU mode (default, needs CUDA):
- threshold selection of the top 20% of |x| over 10⁸ and 10⁹ fp32 elements: ours (radix select,
  backends/triton/select.topk_spec_triton: threshold + exact tie cutoff) vs ``torch.kthvalue``,
  ``torch.topk`` and a full ``argsort`` (mergekit's way);
- fused TIES over N = 8 bf16 tensors of 4096×14336 (density 0.2), and TADrop-TIES (a different
  density per expert, as TADrop's analysis hands them over): ours vs the torch reference
  (methods/task_arithmetic.merge_family) vs a transcription of mergekit's TIES steps (argsort
  top-k per expert, stack, sign mask, sum / divisor) on the same device.
Each result records effective GB/s (bytes the kernel docstrings count ÷ median time) and the
fraction of a device-to-device copy's bandwidth measured in the same run.
CPU mode (``TRITONMERGE_BENCH_CPU=1``): the same comparisons on small shapes under
``TRITON_INTERPRET=1`` — a correctness check of the benchmark itself; its times mean nothing.

Sizes and rounds can be changed through the environment (benchmarks/sizes.py lists the
variables; ``benchmarks/gpu/run.sh`` sets them for its GPU and smoke runs).

Every benchmark first checks its output against the reference (untimed), then times. A summary
JSON goes to ``benchmarks/results/kernels-<device>.json``, rewritten after every case so that a
run cut short keeps what it measured (GPU mode, or CPU mode with ``TRITONMERGE_BENCH_RESULTS``
naming the directory: the interpreter's times must not land beside real results by accident)::

    pytest benchmarks/bench_kernels.py --benchmark-only                          # GPU
    TRITONMERGE_BENCH_CPU=1 pytest benchmarks/bench_kernels.py --benchmark-only  # CPU, small shapes
"""

from __future__ import annotations

import contextlib
import json
import os
import platform

import pytest
import torch

from benchmarks import machine
from benchmarks.sizes import env_float, env_int, env_shape, env_sizes, timed_rounds

pytest.importorskip("pytest_benchmark")
pytest.importorskip("triton")

from tritonmerge.context import TensorContext, TensorDecisions
from tritonmerge.methods.task_arithmetic import Family, merge_family
from tritonmerge.ops.select import keep_count
from tritonmerge.catalog import get_method
from tritonmerge.testing import assert_close_budget, make_inputs, triton_interpreter

CPU_MODE = os.environ.get("TRITONMERGE_BENCH_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA and not CPU_MODE else "cpu")
SELECT_SIZES = env_sizes("TRITONMERGE_BENCH_SELECT_SIZES",
                         {"1e4": 10_000, "1e5": 100_000} if CPU_MODE else {"1e8": 10**8, "1e9": 10**9})
MERGE_SHAPE = env_shape("TRITONMERGE_BENCH_MERGE_SHAPE", (64, 96) if CPU_MODE else (4096, 14336))
N_EXPERTS = env_int("TRITONMERGE_BENCH_EXPERTS", 8)
DENSITY = 0.2
# one density per expert for TADrop-TIES, spread 0.05..0.4 whatever the expert count
TADROP_DENSITIES = [round(0.05 + 0.35 * i / max(1, N_EXPERTS - 1), 4) for i in range(N_EXPERTS)]
ROUNDS = env_int("TRITONMERGE_BENCH_ROUNDS", 3 if CPU_MODE else 10)
CASE_SECONDS = env_float("TRITONMERGE_BENCH_CASE_SECONDS", None)

pytestmark = [
    pytest.mark.skipif(
        not CPU_MODE and not HAS_CUDA,
        reason="kernel benchmarks need a CUDA device; set TRITONMERGE_BENCH_CPU=1 for the small CPU interpreter mode",
    )
]
RESULTS: list[dict] = []
_COPY_GBPS: dict[str, float] = {}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu-interpreter-{platform.processor() or platform.machine()}"


@pytest.fixture(scope="module", autouse=True)
def kernels_ready():
    """The interpreter in CPU mode (kernels run on CPU tensors); nothing on a GPU."""
    with triton_interpreter() if DEVICE.type == "cpu" else contextlib.nullcontext():
        yield


@pytest.fixture(scope="module", autouse=True)
def write_summary(kernels_ready):
    yield
    _write_summary()


def _write_summary() -> None:
    if not RESULTS or (DEVICE.type != "cuda" and "TRITONMERGE_BENCH_RESULTS" not in os.environ):
        return
    import triton

    out_dir = machine.results_dir()
    name = _device_name()
    slug = machine.slug(name)
    summary = {
        "benchmark": "kernels",
        "device": name,
        "mode": "gpu" if DEVICE.type == "cuda" else "cpu-interpreter (times mean nothing)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git": machine.git_sha(),
        "copy_gbps": _COPY_GBPS.get("value"),
        "settings": {"select_sizes": SELECT_SIZES, "merge_shape": list(MERGE_SHAPE), "n_experts": N_EXPERTS,
                     "density": DENSITY, "tadrop_densities": TADROP_DENSITIES, "max_rounds": ROUNDS,
                     "case_seconds": CASE_SECONDS},
        "results": RESULTS,
    }
    (out_dir / f"kernels-{slug}.json").write_text(json.dumps(summary, indent=1))


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write), measured once per run."""
    if "value" not in _COPY_GBPS:
        numel = (1 << 28) if DEVICE.type == "cuda" else (1 << 20)
        src = torch.empty(numel, dtype=torch.float32, device=DEVICE).fill_(1.0)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        _sync()
        times = []
        for _ in range(10):
            if DEVICE.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                import time

                t = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - t)
        _COPY_GBPS["value"] = 2 * src.numel() * 4 / sorted(times)[len(times) // 2] / 1e9
    return _COPY_GBPS["value"]


def _record(benchmark, group: str, variant: str, bytes_moved: int, **extra) -> None:
    median = benchmark.stats.stats.median
    gbps = bytes_moved / median / 1e9
    copy = copy_bandwidth()
    row = {"group": group, "variant": variant, "median_s": median, "gbps": gbps, "copy_fraction": gbps / copy,
           "rounds": len(benchmark.stats.stats.data), **extra}
    benchmark.extra_info.update(row, device=_device_name())
    RESULTS.append(row)
    _write_summary()


# ---------------------------------------------------------------------------------------------
# threshold selection


SELECT_VARIANTS = ["ours", "kthvalue", "topk", "argsort"]
_MAGNITUDES: dict[int, torch.Tensor] = {}
_EXPECTED: dict[int, float] = {}  # the reference threshold per size: one kthvalue, not one per variant


def _magnitude(numel: int) -> torch.Tensor:
    if numel not in _MAGNITUDES:
        _MAGNITUDES.clear()  # keep one 4 GB tensor alive at a time
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        _MAGNITUDES[numel] = torch.randn(numel, generator=gen, device=DEVICE).abs_()
    return _MAGNITUDES[numel]


def _select(variant: str, magnitude: torch.Tensor, k: int) -> float:
    n = magnitude.numel()
    if variant == "ours":
        from tritonmerge.backends.triton.select import topk_spec_triton

        return topk_spec_triton(None, [magnitude], [k]).threshold[0]
    if variant == "kthvalue":
        return float(torch.kthvalue(magnitude, n - k + 1).values)
    if variant == "topk":
        return float(torch.topk(magnitude, k, sorted=False).values.min())
    if variant == "argsort":  # mergekit sparsify.magnitude: sort everything, take the top k
        return float(magnitude[torch.argsort(magnitude, descending=True)[k - 1]])
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", SELECT_VARIANTS)
@pytest.mark.parametrize("size", list(SELECT_SIZES))
def test_threshold_selection(benchmark, size, variant):
    numel = SELECT_SIZES[size]
    magnitude = _magnitude(numel)
    k = keep_count(DENSITY, numel)
    if numel not in _EXPECTED:
        _EXPECTED[numel] = float(torch.kthvalue(magnitude.cpu() if CPU_MODE else magnitude, numel - k + 1).values)
    expected = _EXPECTED[numel]
    try:
        got = _select(variant, magnitude, k)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"{variant} on {size} elements runs out of device memory: {exc}")
    assert got == expected, f"{variant}: threshold {got} != {expected}"
    benchmark.group = f"select-top20%-{size}"

    def target():
        _select(variant, magnitude, k)
        _sync()

    timed_rounds(benchmark, target, rounds=ROUNDS, case_seconds=CASE_SECONDS)
    passes = 2 if variant == "ours" else 1  # our radix select reads the input twice
    _record(benchmark, benchmark.group, variant, passes * numel * 4, elements=numel, reads=passes)


# ---------------------------------------------------------------------------------------------
# fused TIES


def mergekit_ties(base: torch.Tensor, experts: list[torch.Tensor], densities: list[float]) -> torch.Tensor:
    """mergekit's TIES steps (generalized_task_arithmetic + sparsify.magnitude), transcribed:
    per expert an argsort top-k of |δ| in the input dtype, then torch.stack, sign mask (sum
    election), weighted sum / weight divisor, base + the result."""
    deltas = []
    for e, d in zip(experts, densities):
        delta = e - base
        k = int(d * delta.numel())
        mask = torch.zeros_like(delta)
        order = torch.argsort(delta.abs().flatten(), descending=True)[:k]
        mask.view(-1)[order] = 1
        deltas.append(delta * mask)
    deltas = torch.stack(deltas, dim=0)
    weights = torch.ones(len(experts), dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    weighted = deltas * weights
    sign = (weighted.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = weighted.sign() == sign
    mixed = (weighted * agree).sum(dim=0)
    divisor = (weights * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


MERGE_VARIANTS = ["ours", "torch_reference", "mergekit"]
_INPUTS: dict[str, tuple] = {}


def _merge_inputs():
    if "ties" not in _INPUTS:
        _INPUTS["ties"] = make_inputs(MERGE_SHAPE, N_EXPERTS, torch.bfloat16, scale=0.01, device=DEVICE) if CPU_MODE else (
            _gpu_inputs()
        )
    return _INPUTS["ties"]


def _gpu_inputs():
    # generated on the device: 9 × 117 MB in bf16
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    base = torch.randn(MERGE_SHAPE, generator=gen, device=DEVICE)
    experts = [(base + 0.01 * torch.randn(MERGE_SHAPE, generator=gen, device=DEVICE)).bfloat16() for _ in range(N_EXPERTS)]
    return base.bfloat16(), experts


def _merge(variant: str, base, experts, densities, tadrop: bool) -> torch.Tensor:
    p = get_method("ties").validate({} if tadrop else {"density": densities[0]})
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", decisions=TensorDecisions(density=densities if tadrop else None))
    family = Family("magnitude", True)
    if variant == "ours":
        from tritonmerge.backends.triton.merge import merge_triton
        from tritonmerge.methods.task_arithmetic import lower

        return merge_triton(lower(family, p, ctx, base, len(experts), "ties"), base, experts)
    if variant == "torch_reference":
        return merge_family(base, experts, p, ctx, family, "ties").to(base.dtype)
    if variant == "mergekit":
        return mergekit_ties(base, experts, densities)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
@pytest.mark.parametrize("workload", ["ties", "tadrop_ties"])
def test_fused_ties(benchmark, workload, variant):
    base, experts = _merge_inputs()
    tadrop = workload == "tadrop_ties"
    densities = TADROP_DENSITIES[:N_EXPERTS] if tadrop else [DENSITY] * N_EXPERTS
    try:
        out = _merge(variant, base, experts, densities, tadrop)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"{variant} runs out of device memory: {exc}")
    if variant != "mergekit":  # mergekit's unstable argsort breaks ties its own way: no exact gate
        ref = _merge("torch_reference", base, experts, densities, tadrop) if variant == "ours" else out
        golden_in = (base.double(), [e.double() for e in experts])
        golden = merge_family(
            *golden_in,
            get_method("ties").validate({} if tadrop else {"density": DENSITY}),
            TensorContext(name="model.layers.0.mlp.up_proj.weight", decisions=TensorDecisions(density=densities if tadrop else None)),
            Family("magnitude", True),
            "ties",
        )
        assert_close_budget(out, golden, ref, torch.bfloat16, what=f"{workload} {variant}")
        del golden, golden_in
    benchmark.group = f"{workload}-n{N_EXPERTS}-bf16-{MERGE_SHAPE[0]}x{MERGE_SHAPE[1]}"

    def target():
        _merge(variant, base, experts, densities, tadrop)
        _sync()

    timed_rounds(benchmark, target, rounds=ROUNDS, case_seconds=CASE_SECONDS)
    numel = base.numel()
    # the fused merge's own read+write; ours also makes 2 histogram reads of base + experts
    merge_bytes = (N_EXPERTS + 1) * numel * 2 + numel * 2
    select_bytes = 2 * (N_EXPERTS + 1) * numel * 2
    _record(
        benchmark, benchmark.group, variant, merge_bytes,
        elements=numel, n_experts=N_EXPERTS, bytes_with_selection=merge_bytes + select_bytes,
        gbps_with_selection=(merge_bytes + select_bytes) / benchmark.stats.stats.median / 1e9,
    )
