"""WUDI through the disk engine vs the in-memory API on the same checkpoints.

``python -m benchmarks.e2e.wudi_compare --shape 150m [--steps 300] [--solver adam] [--repeats 2]``

Both sides run in this process, after one untimed warm-up of each, alternating: the disk-to-disk
merge (``tritonmerge.run_merge``: reads, per-shard batches of same-shaped layers via the
engine's ``_batches``, writes with fsync and checksums) and ``tritonmerge.merge_state_dicts``
on the same models already loaded in memory (loading is not timed), with the same parameters.
Its WUDI layers are batched by ``api.plan_groups`` (the whole model is one group per shape, cut
to the method's memory budget). Reports both medians, the ratio (the issue's target: disk
within 10 % of in-memory), and whether the outputs are equal. Writes
``benchmarks/results/wudi_disk_vs_memory_<device>.json`` (or under ``TRITONMERGE_BENCH_RESULTS``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine

from .checkpoints import CACHE_DIR, ensure_checkpoints
from .shapes import SHAPES


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e.wudi_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="150m", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--solver", default="adam", choices=["adam", "exact"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=str(CACHE_DIR))
    args = p.parse_args(argv)

    import torch
    import yaml

    import tritonmerge as tm
    from tritonmerge.engine import MergeOptions, run_merge

    shape = SHAPES[args.shape]
    base_dir, expert_dirs = ensure_checkpoints(shape, Path(args.cache_dir))
    params = {"steps": args.steps, "solver": args.solver}
    work = Path(tempfile.mkdtemp(prefix="wudi-compare-", dir=args.cache_dir))
    cfg = work / "wudi.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "wudi", "base_model": str(base_dir),
        "models": [{"model": str(e)} for e in expert_dirs], "parameters": params,
    }, sort_keys=False))
    base = _load(base_dir)
    experts = [_load(e) for e in expert_dirs]

    def disk() -> tuple[float, Path]:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        run_merge(str(cfg), out, MergeOptions(quiet=True))
        return time.perf_counter() - t, out

    def memory() -> tuple[float, dict]:
        t = time.perf_counter()
        merged = tm.merge_state_dicts("wudi", base, experts, **params)
        return time.perf_counter() - t, merged

    times: dict[str, list[float]] = {"disk": [], "memory": []}
    try:
        disk(), memory()  # warm-up: kernels compiled, self-checks run, pages cached
        for r in range(args.repeats):
            for side in (["disk", "memory"] if r % 2 == 0 else ["memory", "disk"]):
                secs, result = disk() if side == "disk" else memory()
                times[side].append(secs)
                print(f"  #{r + 1} {side:6s} {secs:8.2f} s", flush=True)
                if side == "disk":
                    out_dir = result
                else:
                    merged = result
        on_disk = {}
        from safetensors.torch import load_file

        for f in sorted(out_dir.glob("*.safetensors")):
            on_disk.update(load_file(str(f)))
        diffs = [float((on_disk[k].float() - merged[k].float()).abs().max()) for k in merged]
        identical = all(torch.equal(on_disk[k], merged[k]) for k in merged)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    disk_s, memory_s = statistics.median(times["disk"]), statistics.median(times["memory"])
    result = {
        "shape": shape.describe(),
        "machine": {"cpu": machine.cpu_model(), "ram_bytes": machine.mem_total(), "git_commit": machine.git_sha(),
                    "torch": torch.__version__},
        "command": "python -m benchmarks.e2e.wudi_compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parameters": params,
        "torch_threads": torch.get_num_threads(),
        "disk_s": times["disk"],
        "memory_s": times["memory"],
        "disk_median_s": disk_s,
        "memory_median_s": memory_s,
        "ratio_disk_over_memory": disk_s / memory_s,
        "outputs_identical": identical,
        "max_abs_diff": max(diffs) if diffs else 0.0,
    }
    print(f"disk {disk_s:.2f} s, in-memory {memory_s:.2f} s, ratio {disk_s / memory_s:.3f}, identical {identical}")
    out = machine.results_dir() / f"wudi_disk_vs_memory_cpu{'' if args.solver == 'adam' else '_' + args.solver}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
