"""pytest-benchmark front end of the end-to-end benchmark (same runner functions as ``run.py``).

    pytest benchmarks/e2e/test_e2e_bench.py --benchmark-only                    # tiny shape, seconds
    TRITONMERGE_E2E_SHAPE=150m pytest benchmarks/e2e/test_e2e_bench.py --benchmark-only

Each test first checks (untimed) that tritonmerge's disk-to-disk output equals the in-memory
``merge_state_dicts`` reference within one ulp of the output dtype, then times full runs in fresh
processes (warm page cache) and records the I/O floor, input GB/s, seconds per billion
parameters and peak RSS in ``extra_info``. The side-by-side with mergekit (alternating runs,
parity) is ``python -m benchmarks.e2e.run``; here mergekit is timed only when
``TRITONMERGE_E2E_MERGEKIT=1`` and its virtualenv exists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks.e2e import configs, measure, parity  # noqa: E402
from benchmarks.e2e.checkpoints import ensure_checkpoints, model_files  # noqa: E402
from benchmarks.e2e.run import DEFAULT_MERGEKIT_PYTHON  # noqa: E402
from benchmarks.e2e.shapes import SHAPES  # noqa: E402

SHAPE = SHAPES[os.environ.get("TRITONMERGE_E2E_SHAPE", "tiny")]
DEVICE = os.environ.get("TRITONMERGE_E2E_DEVICE", "cpu")
ROUNDS = int(os.environ.get("TRITONMERGE_E2E_ROUNDS", "1" if SHAPE.name == "tiny" else "3"))
WITH_MERGEKIT = os.environ.get("TRITONMERGE_E2E_MERGEKIT") == "1" and Path(DEFAULT_MERGEKIT_PYTHON).exists()
# the in-memory reference of 300-step WUDI at 150M+ takes as long as the merge itself, many minutes on CPU
REFERENCE_SKIP = {"wudi"} if SHAPE.name != "tiny" else set()


@pytest.fixture(scope="module")
def checkpoints():
    return ensure_checkpoints(SHAPE)


def _reference(case: configs.Case, cfg_path: Path, base: Path, experts: list[Path]) -> dict:
    import tritonmerge
    from tritonmerge.config import load_config

    mapped = load_config(cfg_path).resolve("", 0.0)
    b = parity.load_all(base)
    es = [parity.load_all(e) for e in experts]
    if not case.uses_base:  # linear: the listed models only
        return tritonmerge.merge_state_dicts(case.merge_method, es[0], es, **mapped)
    return tritonmerge.merge_state_dicts(case.merge_method, b, es, **mapped)


def _timed(tool: str, args: list[str], python: str, input_files: list[Path], samples: list):
    def once():
        out = Path(args[1] if tool != "floor" else args[0])
        measure.remove(out)
        s = measure.run_child(tool, args, python=python, cache="warm", input_files=input_files, quiet_wait=30)
        assert s.rc == 0, s.stderr_tail
        samples.append(s)

    return once


@pytest.mark.parametrize("case_name", list(configs.CASES))
def test_e2e(benchmark, checkpoints, tmp_path, case_name):
    case = configs.CASES[case_name]
    base, experts = checkpoints
    inputs = [base, *experts]
    input_files = [f for d in inputs for f in model_files(d)]
    input_bytes = sum(f.stat().st_size for f in input_files)
    cfg = configs.write_config(tmp_path / "merge.yml", case, base, experts)
    out = tmp_path / "out"

    # untimed correctness check first
    s = measure.run_child("tritonmerge", [str(cfg), str(out), "--device", DEVICE], python=sys.executable,
                          cache="warm", input_files=input_files, quiet_wait=0)
    assert s.rc == 0, s.stderr_tail
    if case.name not in REFERENCE_SKIP:
        expected = {k: v.to(parity.load_all(base)[k].dtype) for k, v in _reference(case, cfg, base, experts).items()}
        check = parity.compare_exact(parity.load_all(out), expected)
        assert check["ok"], check

    floor: list = []
    _timed("floor", [str(tmp_path / "floor"), "--inputs", *map(str, inputs)], sys.executable, input_files, floor)()
    samples: list = []
    benchmark.pedantic(_timed("tritonmerge", [str(cfg), str(out), "--device", DEVICE], sys.executable, input_files, samples),
                       rounds=ROUNDS, iterations=1, warmup_rounds=0)
    run_s = min(x.run_s for x in samples)
    info = {
        "shape": SHAPE.name,
        "params": SHAPE.num_params,
        "input_bytes": input_bytes,
        "run_s_min": run_s,
        "wall_s_min": min(x.wall_s for x in samples),
        "input_GBps": input_bytes / run_s / 1e9,
        "s_per_Bparams": run_s / (SHAPE.num_params / 1e9),
        "peak_rss_bytes": max(x.peak_rss_bytes for x in samples),
        "floor_run_s": floor[0].run_s,
        "floor_ratio": run_s / floor[0].run_s,
    }
    gpu = [x.gpu_peak_allocated_bytes for x in samples if x.gpu_peak_allocated_bytes is not None]
    if gpu:
        info["gpu_peak_allocated_bytes"] = max(gpu)
    if WITH_MERGEKIT and case.mergekit:
        mk_out = tmp_path / "mk"
        mk: list = []
        _timed("mergekit", [str(cfg), str(mk_out), "--device", DEVICE], DEFAULT_MERGEKIT_PYTHON, input_files, mk)()
        info["mergekit_wall_s"] = mk[0].wall_s
        info["mergekit_peak_rss_bytes"] = mk[0].peak_rss_bytes
        info["wall_speedup"] = mk[0].wall_s / min(x.wall_s for x in samples)
    benchmark.extra_info.update(info)
