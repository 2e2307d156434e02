"""Render the README's performance table and a PNG chart from benchmarks/results/e2e_*.json.

    python -m benchmarks.e2e.render            # print the Markdown table
    python -m benchmarks.e2e.render --write    # also replace the table in README.md (between the
                                               # <!-- perf:start --> / <!-- perf:end --> markers)
                                               # and write benchmarks/results/e2e.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every run entry of every e2e_<device>.json, in file-name order."""
    runs = []
    for f in sorted(results_dir.glob("e2e_*.json")):
        for run in json.loads(f.read_text())["runs"]:
            runs.append(run)
    return runs


def _fmt(x, spec: str, missing: str = "–") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return missing
    return format(x, spec)


def _gib(b) -> str:
    return _fmt(None if b is None else b / 2**30, ".2f")


def _machine(run: dict) -> str:
    m = run["machine"]
    gpu = f", {m['gpu']['name']}" if m.get("gpu") else ""
    return f"{m['cpu_cores']}-core {m['cpu_model']}, {m['ram_bytes'] / 2**30:.0f} GiB RAM{gpu}"


def _parity(r: dict) -> str:
    p = r.get("parity")
    if not p:
        return "–"
    if p["kind"] == "statistical":
        return ("ok" if p["ok"] else "FAIL") + f" (stat., unchanged {p['unchanged_fraction_ours']:.3f} vs {p['unchanged_fraction_theirs']:.3f})"
    if p.get("error"):
        return "FAIL: " + p["error"]
    label = "ok" if p["ok"] else ("FAIL" if p.get("required") else "differs")
    return f"{label} ({p['mismatch_fraction'] * 100:.3g}% > 1 ulp)"


def table(runs: list[dict]) -> str:
    """One Markdown table per (device, shape) run, with the machine line above it."""
    parts = []
    for run in runs:
        sh = run["shape"]
        commits = sorted({r.get("git_commit", run["machine"]["git_commit"])[:10] for r in run["results"]})
        dirty = any(r.get("git_dirty", run["machine"].get("git_dirty")) for r in run["results"])
        head = (f"**{run['device']}, {sh['name']} shape** ({sh['num_params'] / 1e6:.0f}M parameters per model, "
                f"{sh['num_experts']} experts + base, {sh['dtype']}; {_machine(run)}; torch {run['machine']['torch']}, "
                f"mergekit {run['machine']['mergekit']}; commit {', '.join(commits)}"
                f"{' + local changes' if dirty else ''}; medians over n runs per tool; {run['created'][:10]})")
        gpu = any("gpu_peak_allocated_bytes" in r["tritonmerge"] for r in run["results"])
        cols = ["method", "YAML precision", "page cache", "n", "tritonmerge wall s", "merge s", "input GB/s", "s / B params",
                "peak RSS GiB"] + (["peak GPU GiB"] if gpu else []) + [
                "× I/O floor", "× floor, best runs", "mergekit wall s", "mergekit RSS GiB", "speed-up", "RSS ratio", "parity"]
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in run["results"]:
            tm, mk, vs = r["tritonmerge"], r.get("mergekit"), r.get("vs_mergekit", {})
            failed = tm["failed"] == tm["runs"]
            row = [r["case"], r["precision"], r["cache"], str(tm["runs"]),
                   "timed out / failed" if failed else _fmt(tm["wall_s"], ".2f"), _fmt(tm["run_s"], ".2f"),
                   _fmt(tm.get("input_GBps"), ".2f"), _fmt(tm.get("s_per_Bparams"), ".1f"), _gib(tm["peak_rss_bytes"])]
            if gpu:
                row.append(_gib(tm.get("gpu_peak_allocated_bytes")))
            row += [_fmt(tm.get("floor_ratio"), ".1f") + f" ({r['floor']['run_s']:.2f} s)",
                    _fmt(tm.get("floor_ratio_best"), ".1f")
                    + (f" ({tm['run_s_min']:.2f} / {r['floor']['run_s_min']:.2f} s)" if "run_s_min" in tm else ""),
                    _fmt(mk["wall_s"], ".1f") if mk else "–", _gib(mk["peak_rss_bytes"]) if mk else "–",
                    _fmt(vs.get("wall_speedup"), ".1f") + ("×" if vs else ""),
                    _fmt(vs.get("rss_ratio"), ".2f"), _parity(r)]
            lines.append("| " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    notes = (
        "\n\n*wall s*: whole process, start to exit, as a user sees it (interpreter, imports, merge, writes). "
        "*merge s*: inside the process after imports; *input GB/s*, *s / B params* (per billion parameters of one "
        "model) and *× I/O floor* use it. The I/O floor is measured in the same run: read every input tensor and "
        "write one output of the base's size with safetensors (through the page cache), nothing else; tritonmerge writes its "
        "shards with O_DIRECT where the file system takes it, so on a machine where fresh page-cache pages are dear it "
        "can take less than the floor. *× I/O floor*: median over median (the floor's "
        "median in brackets); *× floor, best runs*: the fastest run of each (tritonmerge / floor seconds in brackets), "
        "the better estimate on a shared machine, where the floor's page-cache writes and fresh allocations vary most "
        "and noise only adds time. *page cache warm*: every input file was "
        "read once right before each run (all tools alike); *cold*: the page cache was dropped before each run. "
        "*YAML precision stored*: no `dtype` key (mergekit then does its arithmetic in bf16, tritonmerge always in "
        "float32), *fp32*: `dtype: float32`, `out_dtype: bfloat16`. *speed-up* = mergekit wall / tritonmerge wall; "
        "*RSS ratio* = tritonmerge peak RSS / mergekit peak RSS. Parity: exact = equal within one bf16 ulp (share of "
        "elements beyond shown); stat. = same dropped share and delta distribution (random drops, different seeds)."
    )
    return "\n\n".join(parts) + notes


def chart(runs: list[dict], path: Path) -> Path:
    """Grouped bars: wall seconds per case for the I/O floor, tritonmerge and mergekit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 4 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        # one page-cache setting per chart (warm when there is one); log scale, since WUDI's
        # compute-bound minutes and the floor's fraction of a second share the axis
        cache = "warm" if any(r["cache"] == "warm" for r in run["results"]) else run["results"][0]["cache"]
        rows = [r for r in run["results"] if r["cache"] == cache]
        labels = [f"{r['case']}\n({r['precision']})" for r in rows]
        series = {
            "I/O floor": [r["floor"]["wall_s"] for r in rows],
            "tritonmerge": [r["tritonmerge"]["wall_s"] for r in rows],
            "mergekit": [r["mergekit"]["wall_s"] if r.get("mergekit") else float("nan") for r in rows],
        }
        width = 0.27
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, vals, width, label=name)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("wall time, s, log scale (lower is better)")
        ax.set_title(f"{run['device']}, {run['shape']['name']} shape, {run['shape']['num_experts']} experts, "
                     f"{cache} page cache")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with the part between the perf markers replaced (markers appended if missing)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        return f"{head}{START}\n{block}\n{END}{tail}"
    return text.rstrip("\n") + f"\n\n## Performance\n\n{START}\n{block}\n{END}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="update README.md in place and write the PNG chart")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--readme", default=str(README))
    p.add_argument("--chart", default=str(RESULTS_DIR / "e2e.png"))
    args = p.parse_args(argv)
    runs = load_results(Path(args.results))
    if not runs:
        print(f"no e2e_*.json results in {args.results}; run python -m benchmarks.e2e.run first", file=sys.stderr)
        return 1
    block = table(runs) + f"\n\n![merge wall time]({Path(args.chart).relative_to(Path(args.readme).parent).as_posix() if Path(args.chart).is_relative_to(Path(args.readme).parent) else args.chart})"
    print(block)
    if args.write:
        readme = Path(args.readme)
        readme.write_text(replace_between_markers(readme.read_text(), block))
        chart(runs, Path(args.chart))
        print(f"updated {readme} and {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
