"""Run the quality benchmark: ``python -m benchmarks.quality.run`` (see README.md).

Fine-tunes (or reads from benchmarks/.cache/quality) one expert per in-distribution task of the
task file, runs every entry of the methods file (grid on the validation split, selected
parameters on test), and writes benchmarks/results/quality_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE.parent / "results"
DEFAULT_TASKS = HERE / "tasks.yaml"
DEFAULT_METHODS = HERE / "methods.yaml"


def load_methods_file(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """(options, [RunSpec]) from a methods file (YAML/JSON): top-level ``val_ood``, ``test``,
    and ``runs``: each with name, method, params, grid, inherit."""
    import json

    import yaml

    from .harness import RunSpec

    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    runs = []
    for i, entry in enumerate(raw.get("runs") or []):
        if "method" not in entry:
            raise ValueError(f"{path}: run #{i} has no 'method'")
        runs.append(
            RunSpec(
                name=str(entry.get("name", entry["method"])),
                method=str(entry["method"]),
                params=dict(entry.get("params") or {}),
                grid={k: list(v) for k, v in (entry.get("grid") or {}).items()},
                inherit=entry.get("inherit"),
            )
        )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names repeat: {names}")
    options = {"val_ood": bool(raw.get("val_ood", False)), "test": bool(raw.get("test", True))}
    return options, runs


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parents[1]))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=Path, default=DEFAULT_TASKS, help="task file (YAML/JSON)")
    ap.add_argument("--methods", type=Path, default=DEFAULT_METHODS, help="methods file (YAML/JSON)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (fine-tuning order/dropout, DARE masks)")
    ap.add_argument("--name", default=None, help="result name: quality_<name>.{json,md} (default: full for methods.yaml, else the methods file's stem)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None, help="expert cache (default benchmarks/.cache/quality)")
    ap.add_argument("--retrain", action="store_true", help="ignore cached task vectors (and overwrite them)")
    ap.add_argument("--only", default=None, help="comma-separated run names to run (plus what they inherit from)")
    ap.add_argument("--val-ood", action="store_true", help="also score OOD sets on the validation split (ablations)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from . import harness, report
    from .finetune import CACHE_DIR
    from .tasks import load_task_file

    t_start = time.perf_counter()
    tasks = load_task_file(args.tasks)
    options, runs = load_methods_file(args.methods)
    val_ood = options["val_ood"] or args.val_ood
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            raise SystemExit(f"--only names unknown runs {sorted(unknown)}; runs: {[r.name for r in runs]}")
        # keep what the wanted runs inherit from, transitively
        by_name = {r.name: r for r in runs}
        for name in list(wanted):
            while by_name[name].inherit:
                name = by_name[name].inherit
                wanted.add(name)
        runs = [r for r in runs if r.name in wanted]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    # methods.yaml -> "full", methods_small.yaml -> "small", ablation.yaml -> "ablation"
    name = args.name or ("full" if args.methods.stem == "methods" else args.methods.stem.removeprefix("methods_"))
    log = lambda msg: print(msg, flush=True)

    log(f"quality benchmark {name!r}: {len(tasks.tasks)} tasks, {len(runs)} runs, seeds {seeds}")
    bench = harness.build_bench(tasks)
    log(f"  model {bench.timings['load_model_s']:.1f}s, data/heads {bench.timings['data_and_heads_s']:.1f}s")
    per_seed: dict[int, list[dict[str, Any]]] = {}
    finetune_s = 0.0
    cached = total = 0
    for seed in seeds:
        log(f"seed {seed}")
        t0 = time.perf_counter()
        experts = harness.get_experts(
            bench, seed, use_cache=not args.retrain, cache_dir=args.cache_dir or CACHE_DIR, log=log
        )
        finetune_s += time.perf_counter() - t0
        cached += sum(e.cached for e in experts.values())
        total += len(experts)
        records: list[dict[str, Any]] = []
        selected: dict[str, dict[str, Any]] = {}
        for spec in runs:
            rec = harness.run_method(
                bench, spec, experts, seed, selected, expert_acc=None, val_ood=val_ood, test=options["test"], log=log
            )
            selected[spec.name] = rec["params"]
            records.append(rec)
            log(f"  {spec.name}: {rec['seconds']:.1f}s")
        expert_rec = next((r for r in records if r["method"] == harness.EXPERTS), None)
        for rec in records:
            rec["summary"] = harness.summarize(bench, rec["test"], expert_rec["test"] if expert_rec else None)
            rec["val_summary"] = harness.summarize(bench, rec["val"], expert_rec["val"] if expert_rec else None)
        per_seed[seed] = records

    import transformers

    result: dict[str, Any] = {
        "benchmark": "quality",
        "name": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task_file": _display(args.tasks),
        "methods_file": _display(args.methods),
        "seeds": seeds,
        "val_ood": val_ood,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "settings": tasks.settings,
        "tasks": [
            {
                "name": t.name,
                "role": t.role,
                "source": t.source,
                "classes": len(t.labels),
                "head": t.head_task,
                "per_class": t.per_class,
            }
            for t in tasks.tasks
        ],
        "runs": report.aggregate(per_seed),
        "timings": {
            **bench.timings,
            "finetune_s": finetune_s,
            "experts_cached": cached,
            "experts_total": total,
            "total_s": time.perf_counter() - t_start,
        },
    }
    json_path, md_path = report.write(result, args.out_dir, name)
    print(report.markdown(result))
    log(f"wrote {json_path} and {md_path} in {result['timings']['total_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
