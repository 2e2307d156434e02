"""Size and round settings the benchmark files read from the environment, so that the same file
runs at GPU sizes, at its small CPU sizes and at the tiny sizes of ``benchmarks/gpu/run.sh --smoke``.

Unset variables leave each file's own defaults in place. The variables:

``TRITONMERGE_BENCH_ROUNDS``        most timed rounds per case
``TRITONMERGE_BENCH_WARMUP``        untimed warm-up rounds per case (where a file has them fixed)
``TRITONMERGE_BENCH_CASE_SECONDS``  time box: as many timed rounds (1..ROUNDS) as fit in this many
                                    seconds, judged by the warm-up's time
``TRITONMERGE_BENCH_SELECT_SIZES``  threshold selection sizes, e.g. ``1e8,1e9``
``TRITONMERGE_BENCH_MERGE_SHAPE``   fused-merge tensor shape, e.g. ``4096x14336``
``TRITONMERGE_BENCH_EXPERTS``       fused-merge expert count
``TRITONMERGE_BENCH_WUDI_SHAPES``   WUDI layer shapes, e.g. ``4096x4096,4096x14336``
``TRITONMERGE_BENCH_WUDI_STEPS``    WUDI Adam steps per solve
``TRITONMERGE_BENCH_WUDI_OFFICIAL_STEPS``  steps of the official loop actually run (then extrapolated)
"""

from __future__ import annotations

import os
import time
from typing import Callable


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(float(value))


def env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def env_shape(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = os.environ.get(name)
    return default if not value else tuple(int(x) for x in value.lower().split("x"))


def env_shapes(name: str, default: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    value = os.environ.get(name)
    if not value:
        return default
    return [tuple(int(x) for x in part.lower().split("x")) for part in value.split(",") if part.strip()]


def env_sizes(name: str, default: dict[str, int]) -> dict[str, int]:
    """``"1e8,1e9"`` -> ``{"1e8": 100000000, "1e9": 1000000000}``: the label is the text given."""
    value = os.environ.get(name)
    if not value:
        return default
    return {part.strip(): int(float(part)) for part in value.split(",") if part.strip()}


def timed_rounds(benchmark, target: Callable[[], object], *, rounds: int, case_seconds: float | None,
                 warmup_rounds: int = 1) -> int:
    """Time ``target`` with pytest-benchmark's pedantic mode; returns the number of timed rounds.

    Without a time box: ``rounds`` rounds after ``warmup_rounds`` warm-ups. With one, the single
    warm-up is timed too and the rounds are cut to what fits in ``case_seconds`` (at least one),
    so a whole benchmark file fits a fixed budget whatever each case turns out to cost."""
    if case_seconds is None:
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        return rounds
    t0 = time.perf_counter()
    target()
    once = time.perf_counter() - t0
    fit = max(1, min(rounds, int(case_seconds / max(once, 1e-9))))
    benchmark.pedantic(target, rounds=fit, warmup_rounds=0, iterations=1)
    return fit
