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
    ``runs`` (each with name, method, params, grid, inherit) and ``comparisons`` (each with
    a, b: run names, metric: id_avg | ood_avg | <group>_avg; a − b is reported with a paired CI)."""
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
    comparisons = []
    for i, entry in enumerate(raw.get("comparisons") or []):
        if "a" not in entry or "b" not in entry:
            raise ValueError(f"{path}: comparison #{i} needs 'a' and 'b'")
        metric = str(entry.get("metric", "id_avg"))
        if metric not in ("id_avg", "ood_avg", "held_out_avg", "domain_shift_avg", "corrupted_avg"):
            raise ValueError(f"{path}: comparison #{i}: unknown metric {metric!r}")
        for side in ("a", "b"):
            if entry[side] not in names:
                raise ValueError(f"{path}: comparison #{i}: {entry[side]!r} is not a run name")
        comparisons.append({"a": str(entry["a"]), "b": str(entry["b"]), "metric": metric})
    options = {
        "val_ood": bool(raw.get("val_ood", False)),
        "test": bool(raw.get("test", True)),
        "comparisons": comparisons,
    }
    return options, runs


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parents[1]))
    except ValueError:
        return str(path)


SETTINGS = {
    "standard": (HERE / "tasks.yaml", HERE / "methods.yaml"),
    "hard": (HERE / "tasks_hard.yaml", HERE / "methods_hard.yaml"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["standard", "hard", "all"], default=None,
                    help="standard = tasks.yaml + methods.yaml, hard = tasks_hard.yaml + methods_hard.yaml, all = both "
                    "(-> quality_<setting>.{json,md}); the default when neither --tasks nor --methods is given: standard")
    ap.add_argument("--tasks", type=Path, default=None, help="task file (YAML/JSON) of a custom run (default tasks.yaml)")
    ap.add_argument("--methods", type=Path, default=None, help="methods file (YAML/JSON) of a custom run (default methods.yaml)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (fine-tuning order/dropout, DARE masks); default 0,1,2")
    ap.add_argument("--name", default=None, help="result name of a custom run: quality_<name>.{json,md} (default: the methods file's stem without 'methods_')")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--cache-dir", type=Path, default=None, help="expert cache (default benchmarks/.cache/quality)")
    ap.add_argument("--retrain", action="store_true", help="ignore cached task vectors (and overwrite them)")
    ap.add_argument("--only", default=None, help="comma-separated run names to run (plus what they inherit from)")
    ap.add_argument("--val-ood", action="store_true", help="also score OOD sets on the validation split (ablations)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown report at the end")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    custom = args.tasks is not None or args.methods is not None
    if custom and args.setting is not None:
        raise SystemExit("--setting and --tasks/--methods exclude each other")
    if custom:
        methods = args.methods or SETTINGS["standard"][1]
        name = args.name or ("standard" if methods.stem == "methods" else methods.stem.removeprefix("methods_"))
        jobs = [(args.tasks or SETTINGS["standard"][0], methods, name)]
    else:
        chosen = ["standard", "hard"] if args.setting == "all" else [args.setting or "standard"]
        jobs = [(*SETTINGS[c], args.name if args.name and len(chosen) == 1 else c) for c in chosen]
        for tasks_path, methods_path, _ in jobs:
            for path in (tasks_path, methods_path):
                if not path.exists():
                    raise SystemExit(f"{path} does not exist")
    t0 = time.perf_counter()
    results = {name: run_setting(tasks_path, methods_path, name, args) for tasks_path, methods_path, name in jobs}
    if len(results) == 1:
        return next(iter(results.values()))
    print(f"all settings in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"settings": results, "total_s": time.perf_counter() - t0}


def run_setting(tasks_path: Path, methods_path: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One task file x one methods file, every seed -> quality_<name>.{json,md}."""
    import torch

    from . import harness, report
    from .finetune import CACHE_DIR
    from .tasks import OOD_GROUPS, load_task_file

    t_start = time.perf_counter()
    tasks = load_task_file(tasks_path)
    options, runs = load_methods_file(methods_path)
    val_ood = options["val_ood"] or args.val_ood
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            raise SystemExit(f"--only names unknown runs {sorted(unknown)}; runs: {[r.name for r in runs]}")
        # keep what the wanted runs inherit from, transitively
        by_name = {r.name: r for r in runs}
        for run_name in list(wanted):
            while by_name[run_name].inherit:
                run_name = by_name[run_name].inherit
                wanted.add(run_name)
        runs = [r for r in runs if r.name in wanted]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    log = lambda msg: print(msg, flush=True)

    log(f"quality benchmark {name!r}: {len(tasks.tasks)} tasks, {len(runs)} runs, seeds {seeds}")
    bench = harness.build_bench(tasks)
    log(f"  model {bench.timings['load_model_s']:.1f}s, data/heads {bench.timings['data_and_heads_s']:.1f}s")
    setup_s = time.perf_counter() - t_start
    per_seed: dict[int, list[dict[str, Any]]] = {}
    finetune_s = merge_eval_s = 0.0
    cached = total = 0
    for seed in seeds:
        log(f"seed {seed}")
        t0 = time.perf_counter()
        experts = harness.get_experts(
            bench, seed, use_cache=not args.retrain, cache_dir=args.cache_dir or CACHE_DIR, log=log
        )
        finetune_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        cached += sum(e.cached for e in experts.values())
        total += len(experts)
        records: list[dict[str, Any]] = []
        selected: dict[str, dict[str, Any]] = {}
        memo: dict[str, Any] = {}  # (method, params) -> scores, shared by the runs of this seed
        for spec in runs:
            rec = harness.run_method(
                bench, spec, experts, seed, selected, expert_acc=None, val_ood=val_ood, test=options["test"], log=log,
                memo=memo,
            )
            selected[spec.name] = rec["params"]
            records.append(rec)
            log(f"  {spec.name}: {rec['seconds']:.1f}s")
        expert_rec = next((r for r in records if r["method"] == harness.EXPERTS), None)
        for rec in records:
            rec["summary"] = harness.summarize(bench, rec["test"], expert_rec["test"] if expert_rec else None)
            rec["val_summary"] = harness.summarize(bench, rec["val"], expert_rec["val"] if expert_rec else None)
        per_seed[seed] = records
        merge_eval_s += time.perf_counter() - t1

    import transformers

    t_stats = time.perf_counter()
    ood_groups = [g for g in OOD_GROUPS if any(s.group == g for s in bench.sets["test"])]
    result: dict[str, Any] = {
        "benchmark": "quality",
        "name": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task_file": _display(tasks_path),
        "methods_file": _display(methods_path),
        "seeds": seeds,
        "val_ood": val_ood,
        "ood_groups": ood_groups,
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
        "items_encoding": "per run, split, seed and set: '<n>:<base64>' of the per-item correctness bits, "
        "8 per byte, first item in the high bit (report.decode_bits); item order = the split's order",
        "runs": report.aggregate(per_seed, ood_groups=ood_groups),
    }
    names = {r["name"] for r in result["runs"]}
    result["comparisons"] = report.comparisons(
        result, [c for c in options["comparisons"] if c["a"] in names and c["b"] in names]
    )
    stats_s = time.perf_counter() - t_stats
    result["timings"] = {
        **bench.timings,
        "setup_s": setup_s,
        "finetune_s": finetune_s,
        "merge_eval_s": merge_eval_s,
        "stats_s": stats_s,
        "experts_cached": cached,
        "experts_total": total,
        "total_s": time.perf_counter() - t_start,
    }
    json_path, md_path = report.write(result, args.out_dir, name)
    if not args.quiet:
        print(report.markdown(result))
    log(
        f"wrote {json_path} and {md_path} in {result['timings']['total_s']:.0f}s "
        f"(fine-tuning {finetune_s:.0f}s, merges + evaluation {merge_eval_s:.0f}s)"
    )
    return result


if __name__ == "__main__":
    main()
