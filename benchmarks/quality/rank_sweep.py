"""Rank the readings of a modifiers' sweep (``sweep_hard.yaml``) by the rules its header states,
from validation numbers only: ``python -m benchmarks.quality.rank_sweep [RESULT.json]``.

Every grid point of a modifier run is compared with its host run (the run it ``inherit``s from) at
the host's own selected point, seed by seed, so that the differences are paired by seed:

- TADrop readings: mean over seeds and hosts of (reading − host) on the validation ID average;
  a reading is a candidate default only if it is above the host on every host.
- LwPTV readings: mean over seeds and hosts of (reading − host) on the validation OOD average,
  among readings whose ID average is within 1 point of the host on every host.

A reading measured on only some of its modifier's hosts is listed but cannot win.

Writes ``quality_<name>_ranking.md`` beside the result and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
ID_TOLERANCE = 1.0  # points of validation ID average LwPTV may cost
# parameters the modifiers inherit from their host: they say nothing about the reading
HOST_KEYS = {"lambda", "density", "topk_scope", "merge_method", "seed", "solver"}


def reading_of(params: Mapping[str, Any], fixed: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    keys = sorted(k for k in params if k not in HOST_KEYS)
    return tuple((k, params[k]) for k in keys) + tuple(sorted((k, v) for k, v in fixed.items() if k not in HOST_KEYS and k not in params))


def hosts_from_methods_file(result: Mapping[str, Any]) -> dict[str, str]:
    """run name -> the run it ``inherit``s from, read from the methods file the result names."""
    from .run import load_methods_file

    path = Path(result["methods_file"])
    if not path.is_absolute():
        path = REPO / path
    _, runs = load_methods_file(path)
    return {r.name: r.inherit for r in runs if r.inherit is not None}


def paired_differences(result: Mapping[str, Any]) -> dict[str, dict[tuple, dict[str, list[float]]]]:
    """modifier -> reading -> {'id': [...], 'ood': [...], 'hosts_id': {host: mean diff}} over
    (host, seed) pairs."""
    runs = {r["name"]: r for r in result["runs"]}
    hosts = hosts_from_methods_file(result)
    out: dict[str, dict[tuple, dict[str, Any]]] = {"tadrop": defaultdict(dict), "lwptv": defaultdict(dict)}
    for name, run in runs.items():
        if run["method"] not in out or "grid" not in run:
            continue
        host = hosts.get(name)
        if host is None or host not in runs:
            continue
        for seed, points in run["grid"].items():
            host_val = runs[host]["grid"][seed] if "grid" in runs[host] else None
            selected = runs[host]["selected"][seed]
            host_point = next(p for p in host_val if p["params"] == selected) if host_val else None
            if host_point is None:
                continue
            for point in points:
                key = reading_of(point["params"], {})
                slot = out[run["method"]][key].setdefault(host, {"id": [], "ood": []})
                slot["id"].append(point["summary"]["id_avg"] - host_point["summary"]["id_avg"])
                if point["summary"].get("ood_avg") is not None and host_point["summary"].get("ood_avg") is not None:
                    slot["ood"].append(point["summary"]["ood_avg"] - host_point["summary"]["ood_avg"])
    return out


def _fmt_reading(key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in key) or "(defaults)"


def ranking(result: Mapping[str, Any]) -> str:
    diffs = paired_differences(result)
    seeds = result.get("seeds")
    lines = [
        f"# Ranking of the modifiers' readings ({result.get('name')}, seeds {seeds}, validation only)",
        "",
        "Differences in points against the host at its own selected parameters, paired by seed;",
        "mean over seeds, per host, then the mean over hosts. Rules: see `benchmarks/quality/rank_sweep.py`.",
        "",
    ]
    for modifier, primary in (("tadrop", "id"), ("lwptv", "ood")):
        readings = diffs[modifier]
        if not readings:
            continue
        hosts = sorted({h for per in readings.values() for h in per})
        rows = []
        for key, per_host in readings.items():
            id_by_host = {h: statistics.fmean(v["id"]) for h, v in per_host.items() if v["id"]}
            ood_by_host = {h: statistics.fmean(v["ood"]) for h, v in per_host.items() if v["ood"]}
            # a default must have been measured on every host of its modifier
            on_every_host = set(id_by_host) == set(hosts)
            if modifier == "tadrop":
                eligible = on_every_host and all(d > 0 for d in id_by_host.values())
            else:
                eligible = on_every_host and all(d >= -ID_TOLERANCE for d in id_by_host.values()) and bool(ood_by_host)
            score_src = id_by_host if primary == "id" else ood_by_host
            score = statistics.fmean(score_src.values()) if score_src else float("-inf")
            rows.append((eligible, score, key, id_by_host, ood_by_host))
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        what = "ID" if primary == "id" else "OOD"
        lines += [f"## {modifier} (ranked by mean Δ val {what}; eligible: " + (
            "above the host on every host)" if modifier == "tadrop" else f"ID within {ID_TOLERANCE} point of the host on every host)"), ""]
        header = "| reading | eligible | mean Δ " + what + " | " + " | ".join(f"Δ ID {h} | Δ OOD {h}" for h in hosts) + " |"
        lines += [header, "|" + "---|" * (3 + 2 * len(hosts))]
        for eligible, score, key, id_by_host, ood_by_host in rows:
            cells = []
            for h in hosts:
                cells.append(f"{id_by_host[h]:+.2f}" if h in id_by_host else "—")
                cells.append(f"{ood_by_host[h]:+.2f}" if h in ood_by_host else "—")
            lines.append(f"| {_fmt_reading(key)} | {'yes' if eligible else 'no'} | {score:+.2f} | " + " | ".join(cells) + " |")
        best = next((r for r in rows if r[0]), None)
        lines += ["", f"Winner: **{_fmt_reading(best[2])}**" if best else "Winner: none (no reading meets the rule)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", nargs="?", default=str(RESULTS / "quality_sweep_hard.json"))
    args = ap.parse_args(argv)
    path = Path(args.result)
    result = json.loads(path.read_text(encoding="utf-8"))
    text = ranking(result)
    out = path.with_name(path.stem + "_ranking.md")
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
