"""What the NaN/Inf check of the inputs costs: the same ties merge through the CLI with the check
(the default) and without it (``--allow-nonfinite``), alternating, in one run, on one machine.

    python -m benchmarks.e2e.nonfinite_cost [--shape 150m] [--repeats 3]

Writes ``nonfinite_check_<machine>.json`` under benchmarks/results/."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.e2e.checkpoints import ensure_checkpoints
from benchmarks.e2e.shapes import SHAPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="150m", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    base, experts = ensure_checkpoints(SHAPES[args.shape])
    work = Path(tempfile.mkdtemp(prefix="tm-nonfinite-"))
    cfg = work / "ties.yml"
    models = "\n".join(f"  - model: {e}\n    parameters: {{weight: 1.0, density: 0.3}}" for e in experts)
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}\n", encoding="utf-8")
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    variants = [("checked", []), ("unchecked", ["--allow-nonfinite"])]
    for r in range(args.repeats):
        # each variant goes first in every other round: neither always runs on a cache the other warmed
        for variant, flags in variants if r % 2 == 0 else variants[::-1]:
            out = work / "out"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tritonmerge", "merge", str(cfg), str(out), "--quiet", *flags], check=True)
            times[variant].append(time.perf_counter() - t0)
            shutil.rmtree(out)
    shutil.rmtree(work)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "wall time of `tritonmerge merge` (ties, density 0.3, stored dtype) with and without the input NaN/Inf check",
        "machine": machine.cpu_model(),
        "shape": args.shape,
        "seconds": times,
        "median_seconds": med,
        "check_cost_fraction": med["checked"] / med["unchecked"] - 1.0,
        "git": machine.git_sha(),
    }
    path = machine.results_dir() / f"nonfinite_check_{machine.slug(machine.cpu_model())[:40]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
