"""Fused CPU loops vs the torch reference: 3-expert TIES (density 0.2, per-tensor exact top-k) on
bf16 tensors of Llama shapes (pytest-benchmark).

Cases: a 4096×4096 projection, a 32000×768 embedding and a 4096×8192 tensor (33.5M elements, the
size the design notes quote). Variants:

- ``cpu``:   backends/cpu/merge.merge_cpu of the family's merge spec (radix select + fused merge in C, OpenMP threads);
- ``torch``: the reference merge_family (what the torch backend runs), timed once;
- ``bound``: reading the inputs and writing the output once with torch copies (one pass at the
  machine's copy speed): the floor for any implementation that must read every input;
- ``select-bracket`` / ``select-histogram``: the top-k thresholds alone (cpu_kernels.topk_select),
  by the sample bracket (one pass, the default) and by the two-pass radix select it replaced;
- ``stats-cpu`` / ``stats-torch``: per-expert task-vector moments (cpu_merge.task_vector_stats_cpu
  vs ops/stats.task_vector_stats_reference, which TADrop/LwPTV's analyses call).

Every case first checks the fused output against the reference, bit for bit (untimed; the
reference run doubles as the torch timing). A summary JSON goes to
``benchmarks/results/cpu-<machine>.json`` (directory overridable with TRITONMERGE_BENCH_RESULTS)::

    pytest benchmarks/bench_cpu.py --benchmark-only -s
    TRITONMERGE_BENCH_FULL=1 pytest benchmarks/bench_cpu.py --benchmark-only   # + the 33.5M case
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from benchmarks import machine

from tritonmerge.context import TensorContext
from tritonmerge.methods.task_arithmetic import Family, lower, merge_family
from tritonmerge.backends.cpu import kernels as ck
from tritonmerge.backends.cpu import merge as cpu_merge
from tritonmerge.ops.select import keep_count
from tritonmerge.ops.stats import task_vector_stats_reference
from tritonmerge.catalog import get_method

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(ck.status() is not None, reason=f"{ck.status()}")

SHAPES = [(4096, 4096), (32000, 768)]
if os.environ.get("TRITONMERGE_BENCH_FULL") == "1":
    SHAPES.append((4096, 8192))
N_EXPERTS, DENSITY = 3, 0.2
TIES = Family("magnitude", True)
RESULTS: list[dict] = []
_REFERENCE: dict[tuple, tuple[torch.Tensor, float]] = {}


def _machine() -> str:
    return f"{machine.cpu_model()} ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    yield
    if not RESULTS:
        return
    out_dir = machine.results_dir()
    slug = machine.slug(f"{machine.cpu_model()}-{torch.get_num_threads()}t")
    summary = {
        "benchmark": "cpu_ties",
        "machine": _machine(),
        "torch": torch.__version__,
        "library": ck.build_info(),
        "git": machine.git_sha(),
        "load_average": os.getloadavg(),
        "experts": N_EXPERTS,
        "density": DENSITY,
        "results": RESULTS,
    }
    (out_dir / f"cpu-{slug}.json").write_text(json.dumps(summary, indent=1))


def _tensors(shape, seed=0):
    """bf16 base ~ N(0, 0.02²) and experts = base + N(0, 0.002²): fine-tuning-sized task vectors."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    experts = [(base + 0.002 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(N_EXPERTS)]
    return base.bfloat16(), experts


_INPUTS: dict[tuple, tuple] = {}


def _inputs(shape):
    if shape not in _INPUTS:
        _INPUTS.clear()  # one shape in memory at a time
        _INPUTS[shape] = _tensors(shape)
    return _INPUTS[shape]


def _params():
    return get_method("ties").validate({"density": DENSITY})


def _reference(shape) -> tuple[torch.Tensor, float]:
    if shape not in _REFERENCE:
        _REFERENCE.clear()
        base, experts = _inputs(shape)
        t0 = time.perf_counter()
        ref = merge_family(base, experts, _params(), TensorContext(name="w"), TIES, "ties").to(base.dtype)
        _REFERENCE[shape] = (ref, time.perf_counter() - t0)
    return _REFERENCE[shape]


def _record(benchmark, shape, variant, **extra):
    base, experts = _inputs(shape)
    seconds = benchmark.stats.stats.min if benchmark.stats else extra.pop("seconds")
    moved = base.numel() * base.element_size() * (len(experts) + 2)  # read N + 1, write 1
    row = {
        "case": f"{shape[0]}x{shape[1]}",
        "elements": base.numel(),
        "variant": variant,
        "seconds": seconds,
        "effective_gb_s": moved / seconds / 1e9,
        **extra,
    }
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    return row


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bound_copy(benchmark, shape):
    base, experts = _inputs(shape)
    scratch = torch.empty_like(base)

    def target():
        for t in (base, *experts):
            scratch.copy_(t)

    benchmark.group = f"ties-{shape[0]}x{shape[1]}"
    benchmark.pedantic(target, rounds=5, warmup_rounds=1, iterations=1)
    _record(benchmark, shape, "bound")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_cpu(benchmark, shape):
    base, experts = _inputs(shape)
    p, ctx = _params(), TensorContext(name="w")
    got = cpu_merge.merge_cpu(lower(TIES, p, ctx, base, len(experts), "ties"), base, experts)
    ref, torch_seconds = _reference(shape)
    assert torch.equal(got, ref), "fused CPU TIES differs from the torch reference"

    benchmark.group = f"ties-{shape[0]}x{shape[1]}"
    benchmark.pedantic(lambda: cpu_merge.merge_cpu(lower(TIES, p, ctx, base, len(experts), "ties"), base, experts), rounds=5, warmup_rounds=1, iterations=1)
    bound = next((r["seconds"] for r in RESULTS if r["variant"] == "bound" and r["elements"] == base.numel()), None)
    row = _record(benchmark, shape, "cpu", gate="torch.equal with the reference")
    row["speedup_vs_torch"] = torch_seconds / row["seconds"]
    if bound:
        row["ratio_to_bound"] = row["seconds"] / bound


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_reference(benchmark, shape):
    base, experts = _inputs(shape)
    p, ctx = _params(), TensorContext(name="w")
    _reference(shape)  # the gate run of test_fused_cpu, if it ran first; else a warm-up

    benchmark.group = f"ties-{shape[0]}x{shape[1]}"
    benchmark.pedantic(lambda: merge_family(base, experts, p, ctx, TIES, "ties").to(base.dtype), rounds=1, iterations=1)
    _record(benchmark, shape, "torch")


@pytest.mark.parametrize("variant", ["bracket", "histogram"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_topk_select(benchmark, shape, variant):
    base, experts = _inputs(shape)
    k = keep_count(DENSITY, base.numel())
    flags = 0 if variant == "bracket" else ck.SELECT_NO_SAMPLE

    def target():
        a, alive = ck.make_args(base, experts, numel=base.numel())
        result = ck.topk_select(a, list(range(N_EXPERTS)), [k] * N_EXPERTS, flags=flags)
        return result, a._select_paths

    (thr, greater, tied), paths = target()
    other, _ = ck.topk_select(ck.make_args(base, experts, numel=base.numel())[0], list(range(N_EXPERTS)), [k] * N_EXPERTS,
                              flags=ck.SELECT_NO_SAMPLE if flags == 0 else 0), None
    assert (thr, greater, tied) == other, "bracket and histogram selections disagree"
    benchmark.group = f"select-{shape[0]}x{shape[1]}"
    benchmark.pedantic(target, rounds=5, warmup_rounds=1, iterations=1)
    _record(benchmark, shape, f"select-{variant}", paths=paths)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_task_vector_stats(benchmark, shape):
    base, experts = _inputs(shape)
    t0 = time.perf_counter()
    ref = task_vector_stats_reference(base, experts)
    torch_seconds = time.perf_counter() - t0
    got = cpu_merge.task_vector_stats_cpu(base, experts)
    assert torch.equal(got[:, 0], ref[:, 0]) and torch.equal(got[:, 4], ref[:, 4])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    benchmark.group = f"stats-{shape[0]}x{shape[1]}"
    benchmark.pedantic(lambda: cpu_merge.task_vector_stats_cpu(base, experts), rounds=5, warmup_rounds=1, iterations=1)
    row = _record(benchmark, shape, "stats-cpu")
    row["speedup_vs_torch"] = torch_seconds / row["seconds"]
    RESULTS.append({"case": row["case"], "elements": row["elements"], "variant": "stats-torch", "seconds": torch_seconds})
