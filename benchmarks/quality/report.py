"""Aggregation over seeds and the result files (JSON + Markdown) of the quality benchmark."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("id_avg", "id_normalized", "held_out_avg", "domain_shift_avg", "corrupted_avg", "ood_avg")


def mean_std(values: Sequence[float | None]) -> dict[str, float | None] | None:
    """{"mean", "std", "n"} over the non-missing values (sample std; 0 for one value)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(per_seed: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per run: test accuracies and summaries as mean ± std over seeds, plus each
    seed's selected parameters, validation grid and times."""
    seeds = sorted(per_seed)
    names = [r["name"] for r in per_seed[seeds[0]]]
    out = []
    for i, name in enumerate(names):
        recs = [per_seed[s][i] for s in seeds]
        keys = list(recs[0].get("test", {}))
        entry: dict[str, Any] = {
            "name": name,
            "method": recs[0]["method"],
            "test": {k: mean_std([r["test"].get(k) for r in recs]) for k in keys},
            "val": {k: mean_std([r["val"].get(k) for r in recs]) for k in recs[0].get("val", {})},
            "summary": {k: mean_std([r["summary"].get(k) for r in recs]) for k in SUMMARY_KEYS},
            "val_summary": {k: mean_std([r["val_summary"].get(k) for r in recs]) for k in SUMMARY_KEYS},
            "selected": {str(s): r["params"] for s, r in zip(seeds, recs)},
            "seconds": mean_std([r.get("seconds") for r in recs]),
            "merge_s": mean_std([r.get("merge_s") for r in recs]),
            "merge_s_total": mean_std([r.get("merge_s_total") for r in recs]),
        }
        if "grid" in recs[0]:
            entry["grid"] = {str(s): r["grid"] for s, r in zip(seeds, recs)}
        if "finetune_s" in recs[0]:
            entry["finetune_s"] = {str(s): r["finetune_s"] for s, r in zip(seeds, recs)}
        out.append(entry)
    return out


def _cell(stat: Mapping[str, float] | None, with_std: bool) -> str:
    if stat is None:
        return "—"
    if with_std and stat.get("n", 1) > 1:
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"
    return f"{stat['mean']:.1f}"


def _fmt_params(params: Mapping[str, Any]) -> str:
    if not params:
        return "—"
    shown = {k: v for k, v in params.items() if k != "seed"}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "—"


def markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report: test tables (in-distribution, OOD), selections and times, val grid."""
    runs = result["runs"]
    with_std = len(result["seeds"]) > 1
    id_tasks = [t["name"] for t in result["tasks"] if t["role"] == "in_distribution"]
    ood_keys = [k for k in (runs[0]["test"] if runs else {}) if "/" in k and not k.startswith("corrupted/")]
    lines = [f"# Quality benchmark: {result['name']}", ""]
    m = result["machine"]
    lines.append(
        f"Task file `{result['task_file']}`, methods file `{result['methods_file']}`; seeds {result['seeds']}; "
        f"{m['cpu_count']} CPU cores, {m['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}; "
        f"total wall time **{result['timings']['total_s']:.0f} s** (fine-tuning {result['timings']['finetune_s']:.0f} s, "
        f"{result['timings']['experts_cached']} of {result['timings']['experts_total']} experts from the cache). "
        f"Accuracy in %, test split{'; mean ± std over seeds' if with_std else ''}. "
        "Merge coefficients and thresholds were chosen on the validation split (in-distribution average)."
    )
    has_test = any(r["test"] for r in runs)
    if has_test:
        lines += ["", "## In-distribution (test)", ""]
        head = ["method", *id_tasks, "avg", "norm."]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            cells = [_cell(r["test"].get(t), with_std) for t in id_tasks]
            cells += [f"**{_cell(r['summary']['id_avg'], with_std)}**", _cell(r["summary"]["id_normalized"], with_std)]
            lines.append("| " + " | ".join([r["name"], *cells]) + " |")
        lines += ["", "## Out-of-distribution (test)", ""]
        head = ["method", *ood_keys, "held-out avg", "domain shift", "corrupted avg", "OOD avg"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            s = r["summary"]
            cells = [_cell(r["test"].get(k), with_std) for k in ood_keys]
            cells += [_cell(s["held_out_avg"], with_std), _cell(s["domain_shift_avg"], with_std), _cell(s["corrupted_avg"], with_std)]
            cells.append(f"**{_cell(s['ood_avg'], with_std)}**")
            lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    lines += ["", "## Selected parameters and times", ""]
    lines += ["| method | selected on val (first seed) | val ID avg | merge s | run s |", "|---|---|---|---|---|"]
    for r in runs:
        first = next(iter(r["selected"].values()))
        merge_s = r["merge_s"]["mean"] if r.get("merge_s") else None
        lines.append(
            f"| {r['name']} | {_fmt_params(first)} | {_cell(r['val_summary']['id_avg'], with_std)} | "
            f"{'—' if merge_s is None else f'{merge_s:.1f}'} | {r['seconds']['mean']:.1f} |"
        )
    grids = [r for r in runs if r.get("grid") and len(next(iter(r["grid"].values()))) > 1]
    if grids:
        lines += ["", "## Validation grid", ""]
        lines += ["| method | parameters | val ID avg | val OOD avg |", "|---|---|---|---|"]
        for r in grids:
            seed_grids = list(r["grid"].values())
            varied = _varied_keys([g["params"] for g in seed_grids[0]])
            for j, point in enumerate(seed_grids[0]):
                id_stat = mean_std([g[j]["summary"].get("id_avg") for g in seed_grids])
                ood_stat = mean_std([g[j]["summary"].get("ood_avg") for g in seed_grids])
                shown = {k: point["params"][k] for k in varied}
                lines.append(f"| {r['name']} | {_fmt_params(shown)} | {_cell(id_stat, with_std)} | {_cell(ood_stat, with_std)} |")
    lines.append("")
    return "\n".join(lines)


def _varied_keys(points: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(points[0]) if points else []
    return [k for k in keys if k != "seed" and len({json.dumps(p.get(k), sort_keys=True, default=str) for p in points}) > 1]


def write(result: Mapping[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``quality_<name>.json`` and ``quality_<name>.md`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"quality_{name}.json"
    md_path = out_dir / f"quality_{name}.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown(result), encoding="utf-8")
    return json_path, md_path
