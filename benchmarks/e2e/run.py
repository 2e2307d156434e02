"""Run the end-to-end benchmark: ``python -m benchmarks.e2e.run --shape 150m``.

For one checkpoint shape (built once into benchmarks/.cache/), for each merge case: runs the
I/O floor, tritonmerge and (where it has the method) mergekit, alternating, each in a fresh
process with the page cache prepared the same way; checks parity of the outputs (untimed); and
writes ``benchmarks/results/e2e_<device>.json`` (one entry per shape, replaced on re-run; saved
after every case, so a run cut short keeps the cases it finished; the directory follows
``TRITONMERGE_BENCH_RESULTS`` like the other benchmarks').
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from benchmarks import machine

from . import configs, measure, parity
from .checkpoints import CACHE_DIR, ensure_checkpoints, model_files
from .shapes import SHAPES, Shape

DEFAULT_MERGEKIT_PYTHON = os.environ.get("TRITONMERGE_MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(samples: list[measure.RunSample]) -> dict:
    """Medians over the successful samples (wall, in-process run time, CPU time, peak RSS)."""
    ok = [s for s in samples if s.rc == 0]
    out = {
        "runs": len(samples),
        "failed": len(samples) - len(ok),
        "wall_s": _median([s.wall_s for s in ok]),
        "run_s": _median([s.run_s for s in ok]),
        "import_s": _median([s.import_s for s in ok]),
        "cpu_s": _median([s.cpu_s for s in ok]),
        "peak_rss_bytes": int(_median([s.peak_rss_bytes for s in ok])) if ok else None,
        # the least-disturbed run: on a shared machine the minimum is the better estimate
        "wall_s_min": min((s.wall_s for s in ok), default=float("nan")),
        "run_s_min": min((s.run_s for s in ok), default=float("nan")),
        "samples": [s.to_json() for s in samples],
    }
    gpu = [s.gpu_peak_allocated_bytes for s in ok if s.gpu_peak_allocated_bytes is not None]
    if gpu:
        out["gpu_peak_allocated_bytes"] = max(gpu)
        out["gpu_peak_reserved_bytes"] = max(s.gpu_peak_reserved_bytes or 0 for s in ok)
    if samples and not ok:
        out["error"] = samples[-1].stderr_tail
    return out


def derived(tool: dict, floor: dict, input_bytes: int, params: int) -> dict:
    """Throughput figures of one tool from its in-process run time (imports excluded)."""
    run_s = tool["run_s"]
    return {
        "input_GBps": input_bytes / run_s / 1e9 if run_s == run_s and run_s > 0 else None,
        "s_per_Bparams": run_s / (params / 1e9),
        "floor_ratio": run_s / floor["run_s"] if floor["run_s"] > 0 else None,
        # least-disturbed run of each: the floor's samples vary most (its page-cache writes and
        # fresh allocations depend on the machine's memory state), and noise only adds time
        "floor_ratio_best": tool["run_s_min"] / floor["run_s_min"] if floor["run_s_min"] > 0 else None,
    }


def run_case(
    case: configs.Case,
    precision: str,
    cache: str,
    *,
    shape: Shape,
    base: Path,
    experts: list[Path],
    work: Path,
    repeats: int,
    device: str,
    mergekit_python: str | None,
    timeout: float,
    quiet_wait: float,
    nproc: Sequence[int] = (1,),
    log: Callable[[str], None] = lambda m: print(m, flush=True),
) -> dict:
    """Floor, tritonmerge and mergekit runs of one case, alternating; then parity (untimed)."""
    inputs = [base, *experts]
    input_files = [f for d in inputs for f in model_files(d)]
    input_bytes = sum(f.stat().st_size for f in input_files)
    cfg = configs.write_config(work / f"{case.name}-{precision}.yml", case, base, experts, precision)
    # tritonmerge on more processes (--nproc N) runs as the tool "tritonmerge@N"
    tools = ["tritonmerge", *(f"tritonmerge@{n}" for n in nproc if n > 1)]
    tools += ["mergekit"] if case.mergekit and mergekit_python else []
    samples: dict[str, list[measure.RunSample]] = {"floor": [], **{t: [] for t in tools}}
    outs = {t: work / f"out-{case.name}-{precision}-{t}" for t in [*tools, "floor"]}
    for r in range(repeats):
        order = tools if r % 2 == 0 else tools[::-1]
        for tool in ["floor", *order]:
            out = outs[tool]
            measure.remove(out)
            if tool == "floor":
                args, python = [str(out), "--inputs", *map(str, inputs)], sys.executable
            else:
                args = [str(cfg), str(out), "--device", device]
                python = mergekit_python if tool == "mergekit" else sys.executable
                if tool.startswith("tritonmerge@"):
                    args += ["--nproc", tool.split("@")[1]]
            child_tool = "tritonmerge" if tool.startswith("tritonmerge") else tool
            s = measure.run_child(child_tool, args, python=python, cache=cache, input_files=input_files,
                                  timeout=timeout, quiet_wait=quiet_wait)
            samples[tool].append(s)
            status = "ok" if s.rc == 0 else f"FAILED rc={s.rc}: {s.stderr_tail.strip().splitlines()[-1:] if s.stderr_tail else ''}"
            log(f"  {case.name:16s} {precision:6s} {cache:4s} #{r + 1} {tool:11s} wall {s.wall_s:7.2f} s  run {s.run_s:7.2f} s  "
                f"cpu {s.cpu_s:7.2f} s  rss {s.peak_rss_bytes / 2**20:7.0f} MiB  busy {s.busy_before:.2f}  {status}")
    result = {
        "case": case.name,
        "merge_method": case.merge_method,
        "parameters": {"per_model": case.per_model, "global": case.parameters},
        "precision": precision,
        "cache": cache,
        "input_bytes": input_bytes,
        "output_bytes": sum(f.stat().st_size for f in model_files(base)),
        "floor": summarize(samples["floor"]),
    }
    for tool in tools:
        result[tool] = summarize(samples[tool])
        if result[tool]["failed"] < result[tool]["runs"]:
            result[tool].update(derived(result[tool], result["floor"], input_bytes, shape.num_params))
    ranked = [t for t in tools if t.startswith("tritonmerge@")]
    if ranked and result["tritonmerge"]["failed"] == 0:
        one = result["tritonmerge"]
        result["scaling"] = {
            t.split("@")[1]: {
                "wall_s": result[t]["wall_s"],
                "run_s": result[t]["run_s"],
                "speedup_wall": one["wall_s"] / result[t]["wall_s"],
                "input_GBps": result[t].get("input_GBps"),
            }
            for t in ranked
            if result[t]["failed"] < result[t]["runs"]
        }
        outs_equal = [measure.same_files(outs["tritonmerge"], outs[t]) for t in ranked]
        result["scaling_outputs_identical"] = all(outs_equal)
    tm, mk = result["tritonmerge"], result.get("mergekit")
    if mk and tm["failed"] == 0 and mk["failed"] == 0:
        result["vs_mergekit"] = {
            "wall_speedup": mk["wall_s"] / tm["wall_s"],
            "run_speedup": mk["run_s"] / tm["run_s"],
            "wall_speedup_min": mk["wall_s_min"] / tm["wall_s_min"],
            "rss_ratio": tm["peak_rss_bytes"] / mk["peak_rss_bytes"],
        }
        if case.parity:
            log(f"  parity ({case.parity}) ...")
            # TIES in float32: mismatches at entries tied in |τ| at the top-k threshold are told
            # apart (mergekit's argsort keeps an arbitrary subset of them). In stored bf16 mergekit
            # forms τ in bf16, so its ties are elsewhere and the check would not apply.
            ties_density = case.per_model.get("density") if case.merge_method == "ties" and precision == "fp32" else None
            p = parity.compare_outputs(case.parity, outs["tritonmerge"], outs["mergekit"], base,
                                       expert_dirs=experts, ties_density=ties_density)
            # with no dtype key mergekit does its arithmetic in bf16 and tritonmerge in float32:
            # differences beyond one bf16 rounding are expected there and reported, not required
            p["required"] = precision == "fp32" or case.parity == "statistical"
            result["parity"] = p
            log(f"  parity ok={p['ok']} " + ", ".join(f"{k}={v:.3g}" for k, v in p.items() if isinstance(v, float)))
    for out in outs.values():
        measure.remove(out)
    return result


def _device_label(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l40s", "a10", "4090", "3090"):
        if key in name:
            return key
    return "cuda"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="150m", choices=sorted(SHAPES), help="checkpoint shape (default 150m)")
    p.add_argument("--cases", default=",".join(configs.CASES), help="comma-separated cases (default: all)")
    p.add_argument("--precision", default="stored,fp32",
                   help="YAML precision variants for cases mergekit also runs: stored (no dtype key) and/or fp32 "
                        "(dtype float32, out_dtype bfloat16); tritonmerge-only cases run 'stored'")
    p.add_argument("--cache", default="warm", help="warm, cold or warm,cold (cold needs a writable /proc/sys/vm/drop_caches)")
    p.add_argument("--repeats", type=int, default=3, help="runs per tool and case (default 3; medians reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--nproc", default="1", help="comma-separated process counts for tritonmerge (e.g. 1,2): each N > 1 "
                                                 "also runs `tritonmerge merge --nproc N` (reported under 'scaling')")
    p.add_argument("--mergekit-python", default=DEFAULT_MERGEKIT_PYTHON,
                   help="python of the mergekit virtualenv (benchmarks/e2e/setup_mergekit.sh); 'none' to skip mergekit")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before one run is killed (counted as failed)")
    p.add_argument("--quiet-wait", type=float, default=180, help="wait up to this long for other processes to go idle before each run")
    p.add_argument("--cache-dir", default=str(CACHE_DIR))
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/e2e_<device>.json, or "
                                               "$TRITONMERGE_BENCH_RESULTS/e2e_<device>.json)")
    args = p.parse_args(argv)

    shape = SHAPES[args.shape]
    cases = [configs.CASES[c.strip()] for c in args.cases.split(",") if c.strip()]
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    caches = [x.strip() for x in args.cache.split(",") if x.strip()]
    if "cold" in caches and not measure.can_drop_caches():
        p.error("--cache cold needs a writable /proc/sys/vm/drop_caches (root, not in a read-only container)")
    mk_python = None if args.mergekit_python in ("", "none") else args.mergekit_python
    if mk_python and not Path(mk_python).exists():
        print(f"mergekit python {mk_python} not found; running without mergekit (see benchmarks/e2e/setup_mergekit.sh)")
        mk_python = None

    out = Path(args.out) if args.out else machine.results_dir() / f"e2e_{_device_label(args.device)}.json"
    base, experts = ensure_checkpoints(shape, Path(args.cache_dir))
    work = Path(args.cache_dir) / f"work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    entry = {
        "shape": shape.describe(),
        "device": args.device,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": measure.machine_description(mk_python),
        "settings": {"repeats": args.repeats, "cache": caches, "precisions": precisions,
                     "command": "python -m benchmarks.e2e." + "run " + " ".join(argv if argv is not None else sys.argv[1:])},
        "results": [],
    }
    try:
        for case in cases:
            for precision in (precisions if case.mergekit and mk_python else ["stored"]):
                for cache in caches:
                    result = run_case(
                        case, precision, cache, shape=shape, base=base, experts=experts, work=work,
                        repeats=args.repeats, device=args.device, mergekit_python=mk_python,
                        timeout=args.timeout, quiet_wait=args.quiet_wait,
                        nproc=[int(n) for n in args.nproc.split(",") if n.strip()],
                    )
                    # results of one shape may come from several invocations (and commits)
                    result["git_commit"] = entry["machine"]["git_commit"]
                    result["git_dirty"] = entry["machine"]["git_dirty"]
                    # tells this run's rows from rows of earlier runs kept in the same file
                    result["measured_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                    entry["results"].append(result)
                    save_entry(out, dict(entry, results=list(entry["results"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def save_entry(path: Path, entry: dict) -> None:
    """Add ``entry`` to a results file. Results of the same shape and (case, precision, cache)
    are replaced; the shape's other results are kept, so cases can be re-run one at a time (the
    machine description and settings are those of the latest run). Results measured on another
    machine are dropped instead: one table never mixes machines."""
    data = json.loads(path.read_text()) if path.exists() else {"schema": 1, "runs": []}
    key = lambda r: (r["case"], r["precision"], r["cache"])  # noqa: E731
    previous = [
        r for r in data["runs"]
        if r["shape"]["name"] == entry["shape"]["name"] and _same_machine(r["machine"], entry["machine"])
    ]
    if previous:
        fresh = {key(r) for r in entry["results"]}
        kept = [r for r in previous[0]["results"] if key(r) not in fresh]
        order = list(configs.CASES)
        entry["results"] = sorted(kept + entry["results"],
                                  key=lambda r: (order.index(r["case"]) if r["case"] in order else 99, r["precision"], r["cache"]))
    data["runs"] = [r for r in data["runs"] if r["shape"]["name"] != entry["shape"]["name"]] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _same_machine(a: dict, b: dict) -> bool:
    fields = ("cpu_model", "cpu_cores", "gpu")
    return all(a.get(f) == b.get(f) for f in fields)


if __name__ == "__main__":
    sys.exit(main())
