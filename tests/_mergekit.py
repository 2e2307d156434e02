"""mergekit 0.1.5 run from the tests, in its own virtualenv (made by
benchmarks/e2e/setup_mergekit.sh; CI builds one and points TRITONMERGE_MERGEKIT_PYTHON at it).
Tests that need it skip, with the reason, where it is absent."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Sequence

import pytest
import torch

MERGEKIT_PYTHON = Path(os.environ.get("TRITONMERGE_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python"))

needs_mergekit = pytest.mark.skipif(
    not MERGEKIT_PYTHON.exists(),
    reason=f"mergekit's virtualenv is not there ({MERGEKIT_PYTHON}); make it with benchmarks/e2e/setup_mergekit.sh",
)

# every config through mergekit-yaml in one process; one failing config must not hide the others
_BATCH = textwrap.dedent(
    """
    import json, sys
    from mergekit.scripts.run_yaml import main
    results = {}
    for config, out, extra in json.loads(sys.argv[1]):
        try:
            main.main(args=[config, out, "--quiet", *extra], standalone_mode=False)
            results[out] = "ok"
        except BaseException as exc:
            results[out] = f"{type(exc).__name__}: {exc}"
    print("RESULTS " + json.dumps(results))
    """
)


def offline_env(pythonpath: str = "") -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": pythonpath}


def run_mergekit(jobs: Sequence[tuple[Path, Path]], cwd: Path, extra: Sequence[str] = (), timeout: float = 900) -> dict[str, str]:
    """mergekit-yaml CONFIG OUT for each (config, out): out (as a string) -> "ok" or the error."""
    proc = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", _BATCH, json.dumps([[str(c), str(o), list(extra)] for c, o in jobs])],
        capture_output=True, text=True, timeout=timeout, env=offline_env(), cwd=cwd,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"mergekit did not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps between two tensors (after casting to float32)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    if a.numel() == 0:
        return 0
    return int((ordered(a) - ordered(b)).abs().max())
