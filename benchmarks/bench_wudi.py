"""WUDI solver benchmarks: the official-style autograd loop vs the torch reformulation vs the
fused CUDA extension vs the exact solver (pytest-benchmark).

GPU mode (default, needs CUDA): per-layer wall time for 4096×4096, 4096×14336 and 14336×4096 with
T = 8 and 300 steps, and the whole linear-layer set of a Llama-7B shape. The official-style loop
is timed over a few steps and extrapolated to 300 (one 14336-wide layer takes minutes).
CPU mode (``TRITONMERGE_BENCH_CPU=1``): the same comparisons on small shapes.

Shapes, steps and rounds can be changed through the environment (benchmarks/sizes.py lists the
variables; ``benchmarks/gpu/run.sh`` sets them for its GPU and smoke runs).

Every benchmark first checks its output against the official-style loop (untimed; that loop's
result is computed once per layer and shared by the variants), then times. A summary JSON goes
to ``benchmarks/results/wudi-<device>.json`` (directory overridable with
``TRITONMERGE_BENCH_RESULTS``), rewritten after every case so that a run cut short keeps what it
measured::

    pytest benchmarks/bench_wudi.py --benchmark-only                          # GPU
    TRITONMERGE_BENCH_CPU=1 pytest benchmarks/bench_wudi.py --benchmark-only  # CPU, small shapes
"""

from __future__ import annotations

import json
import os
import platform
import time

import pytest
import torch

from benchmarks import machine
from benchmarks.sizes import env_int, env_shapes

from tritonmerge import backends
from tritonmerge.backends import extension_status
from tritonmerge.ops import wudi_solve as W

pytest.importorskip("pytest_benchmark")

CPU_MODE = os.environ.get("TRITONMERGE_BENCH_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA and not CPU_MODE else "cpu")
T, LR = 8, 1e-5
STEPS = env_int("TRITONMERGE_BENCH_WUDI_STEPS", 300)
if CPU_MODE:
    SHAPES = [(128, 128), (128, 512), (512, 128)]
    OFFICIAL_STEPS = 300
    # a tiny Llama: hidden 256, intermediate 688, 4 layers
    MODEL = {"name": "llama-tiny", "layers": 4, "shapes": {(256, 256): 4, (688, 256): 2, (256, 688): 1}}
else:
    SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
    OFFICIAL_STEPS = 5  # timed, then ×300/5: a full official run of one 14336-wide layer takes minutes
    MODEL = {"name": "llama-7b", "layers": 32, "shapes": {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}}
SHAPES = env_shapes("TRITONMERGE_BENCH_WUDI_SHAPES", SHAPES)
OFFICIAL_STEPS = min(STEPS, env_int("TRITONMERGE_BENCH_WUDI_OFFICIAL_STEPS", OFFICIAL_STEPS))
MAX_ROUNDS = env_int("TRITONMERGE_BENCH_ROUNDS", 3)
# the untimed gate runs the same kernels at the same shapes first, so a warm-up round can go
WARMUP = env_int("TRITONMERGE_BENCH_WARMUP", 1)

pytestmark = [
    pytest.mark.skipif(
        not CPU_MODE and not HAS_CUDA,
        reason="WUDI GPU benchmarks need a CUDA device; set TRITONMERGE_BENCH_CPU=1 for the small CPU mode",
    )
]
VARIANTS = ["official_autograd", "torch", "cuda_ext", "exact"]
RESULTS: list[dict] = []


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    yield
    _write_summary()


def _write_summary() -> None:
    if not RESULTS:
        return
    out_dir = machine.results_dir()
    slug = machine.slug(_device_name())
    ext, why = extension_status()
    summary = {
        "benchmark": "wudi",
        "device": _device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "extension": "loaded" if ext is not None else why,
        "git": machine.git_sha(),
        "T": T,
        "steps": STEPS,
        "settings": {"shapes": [list(s) for s in SHAPES], "official_steps_run": OFFICIAL_STEPS,
                     "max_rounds": MAX_ROUNDS, "warmup_rounds": WARMUP, "lr": LR},
        "results": RESULTS,
    }
    (out_dir / f"wudi-{slug}.json").write_text(json.dumps(summary, indent=1))


def _task_vectors(m: int, n: int, *, layers: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (T, m, n) if layers is None else (layers, T, m, n)
    shared = torch.randn(shape[:-3] + (1, m, n), generator=g, device=DEVICE) * 5e-4
    return torch.randn(shape, generator=g, device=DEVICE) * 1e-3 + shared


def _run(variant: str, tv: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    if variant == "official_autograd":
        return W.official_wudi_autograd(tv, steps=steps, lr=LR)[0]
    if variant == "exact":
        return W.wudi_solve_batched(tv.unsqueeze(0), solver="exact", compute_losses=False)[0][0]
    backend = "cuda" if variant == "cuda_ext" else "torch"
    return backends.run_op("wudi_solve", tv.unsqueeze(0), steps=steps, lr=LR, backend=backend, compute_losses=False)[0][0]


def _skip_unavailable(variant: str) -> None:
    if variant == "cuda_ext":
        ext, why = extension_status()
        if ext is None or DEVICE.type != "cuda":
            pytest.skip(f"CUDA extension not usable here: {why or 'not a CUDA device'}")


_OFFICIAL: dict[tuple, torch.Tensor] = {}


def _official_reference(tv: torch.Tensor, steps: int) -> torch.Tensor:
    """The official loop's result on these task vectors (seeded, so equal per shape across the
    variants' tests): computed once per layer and shape, one layer kept at a time."""
    key = (tuple(tv.shape), steps)
    if key not in _OFFICIAL:
        _OFFICIAL.clear()
        _OFFICIAL[key] = W.official_wudi_autograd(tv, steps=steps, lr=LR)[0]
    return _OFFICIAL[key]


def _gate(variant: str, tv: torch.Tensor) -> dict:
    """Untimed correctness check against the official-style loop (few steps for the big shapes)."""
    steps = min(STEPS, OFFICIAL_STEPS)
    ref = _official_reference(tv, steps)
    if variant == "exact":
        got = _run(variant, tv)
        problem = W.precompute(tv.unsqueeze(0), need_gram=False)
        l_exact = float(problem.loss(got.unsqueeze(0))[0])
        l_init = float(problem.loss(problem.init)[0])
        assert l_exact <= l_init, "exact solver did not reduce the loss"
        return {"gate": "loss(exact) <= loss(init)", "loss_init": l_init, "loss_exact": l_exact}
    got = _run(variant, tv, steps=steps)
    diff = float((got - ref).abs().max())
    moved = float((ref - tv.sum(0)).abs().max())
    assert diff <= 1e-2 * moved + 1e-7, f"{variant} differs from the official loop by {diff} (moved {moved})"
    return {"gate_steps": steps, "gate_max_abs_diff": diff, "gate_displacement": moved}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_wudi_layer(benchmark, shape, variant):
    _skip_unavailable(variant)
    m, n = shape
    tv = _task_vectors(m, n)
    if variant == "official_autograd":
        _official_reference(tv, OFFICIAL_STEPS)  # untimed: the others' gate reference, and a warm-up
        info = {}
    else:
        info = _gate(variant, tv)
    steps = OFFICIAL_STEPS if variant == "official_autograd" else STEPS

    def target():
        _run(variant, tv, steps=steps)
        _sync()

    benchmark.group = f"wudi-{m}x{n}-T{T}"
    rounds = 1 if variant == "official_autograd" or (DEVICE.type == "cpu" and m * n > 1 << 16) else MAX_ROUNDS
    benchmark.pedantic(target, rounds=min(rounds, MAX_ROUNDS), warmup_rounds=WARMUP, iterations=1)
    seconds = benchmark.stats.stats.median
    per_layer = seconds * (STEPS / steps) if variant != "exact" else seconds
    gemm_flops = 2 * m * n * n * STEPS if variant in ("torch", "cuda_ext") else None
    row = {
        "case": f"{m}x{n}",
        "variant": variant,
        "seconds_per_layer": per_layer,
        "measured_steps": steps if variant != "exact" else None,
        "extrapolated": variant == "official_autograd" and steps != STEPS,
        "step_gemm_tflops": gemm_flops / per_layer / 1e12 if gemm_flops else None,
        "rounds": len(benchmark.stats.stats.data),
        **info,
    }
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    _write_summary()


@pytest.mark.parametrize("variant", ["torch", "cuda_ext", "exact"])
def test_wudi_whole_model(benchmark, variant):
    """Every linear layer of the model shape, batched by shape within the default memory budget;
    synthetic task vectors are generated per batch on the device (outside the timed solve)."""
    _skip_unavailable(variant)
    solver = "exact" if variant == "exact" else "adam"
    backend = "cuda" if variant == "cuda_ext" else "torch"
    budget = W.default_budget(DEVICE)

    def target() -> float:
        total = 0.0
        for (m, n), per_block in MODEL["shapes"].items():
            count = per_block * MODEL["layers"]
            # task vectors + working set of one batch must fit together
            batch = max(1, min(count, budget // (W.layer_bytes(m, n, T, solver=solver) + 4 * T * m * n)))
            done = 0
            while done < count:
                b = min(batch, count - done)
                tv = _task_vectors(m, n, layers=b, seed=done)
                _sync()
                t0 = time.perf_counter()
                backends.run_op("wudi_solve", tv, solver=solver, backend=backend, compute_losses=False, batch_memory_gb=budget / (1 << 30))
                _sync()
                total += time.perf_counter() - t0
                done += b
                del tv
        return total

    benchmark.group = f"wudi-{MODEL['name']}-T{T}"
    solve_seconds = benchmark.pedantic(target, rounds=1, warmup_rounds=0, iterations=1)
    n_layers = sum(MODEL["shapes"].values()) * MODEL["layers"]
    row = {"case": MODEL["name"], "variant": variant, "layers": n_layers, "seconds_solve": solve_seconds,
           "seconds_wall": benchmark.stats.stats.median}
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    _write_summary()


@pytest.mark.skipif(CPU_MODE, reason="TF32 only exists on CUDA")
def test_wudi_tf32_effect(benchmark):
    """TF32 on vs off for one 4096×4096 layer: time and the change in the result and loss."""
    m, n = SHAPES[0]
    tv = _task_vectors(m, n)
    ref, ref_l = W.wudi_solve_batched(tv.unsqueeze(0))
    got, got_l = W.wudi_solve_batched(tv.unsqueeze(0), tf32=True)
    moved = float((ref[0] - tv.sum(0)).abs().max())

    def target():
        W.wudi_solve_batched(tv.unsqueeze(0), tf32=True, compute_losses=False)
        _sync()

    benchmark.group = f"wudi-{m}x{n}-T{T}"
    benchmark.pedantic(target, rounds=MAX_ROUNDS, warmup_rounds=WARMUP, iterations=1)
    row = {"case": f"{m}x{n}", "variant": "torch_tf32", "seconds_per_layer": benchmark.stats.stats.median,
           "tf32_max_abs_diff": float((got - ref).abs().max()), "displacement": moved,
           "loss_fp32": ref_l.final[0], "loss_tf32": got_l.final[0]}
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    _write_summary()
