"""The GPU-day script must not rot between GPU days: ``bash benchmarks/gpu/run.sh --smoke`` runs
every one of its steps at tiny sizes on CPU and must finish, within its 2-minute budget, with a
summary JSON that names every step and target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["preflight", "build", "gpu_tests", "kernels", "wudi", "e2e"]


@pytest.mark.slow
def test_gpu_script_smoke_run(tmp_path):
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITONMERGE_BENCH_RESULTS", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--smoke", "--results", str(results)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    summaries = list(results.glob("gpu-run-*.json"))
    assert len(summaries) == 1, sorted(p.name for p in results.iterdir())
    summary = json.loads(summaries[0].read_text())
    assert summary["mode"] == "smoke"
    assert summary["within_budget"], f"smoke run took {summary['wall_s']:.0f} s of {summary['total_budget_s']} s"
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"]), [(s["name"], s["status"], s["notes"]) for s in summary["steps"]]
    for key in ("estimate_s", "budget_s", "allowed_s", "seconds", "notes"):
        assert all(key in s for s in summary["steps"])
    tests = next(s for s in summary["steps"] if s["name"] == "gpu_tests")["details"]["pytest"]
    assert tests["total"] > 0 and tests["failed"] == 0

    targets = summary["targets"]
    assert len(targets) == 4
    for t in targets:
        assert t["value"] is not None, t  # every target was measured, at smoke sizes
        assert t["met"] is None  # and not judged: CPU-interpreter times say nothing about a GPU

    # the results the summary lists are there, one per benchmark, plus the log; at most 8 files
    listed = set(summary["files"])
    assert {p.name for p in results.glob("*.json")} == listed
    assert any(n.startswith("kernels-") for n in listed) and any(n.startswith("wudi-") for n in listed)
    assert any(n.startswith("e2e_") for n in listed)
    assert len(list(results.iterdir())) <= 8
    assert "targets:" in proc.stdout  # the one-screen summary was printed
    print(f"smoke run: {wall:.0f} s wall")
