"""Aggregation over seeds, paired statistics, and the result files (JSON + Markdown) of the
quality benchmark.

Statistics (see ``bootstrap``): every reported average is a fixed linear combination of per-set
accuracies (``metric_weights``), so a resample only has to redraw the items of each set. The
test items are the same for every seed (the splits depend on ``split_seed`` only), so one draw
of item indices per set is applied to every seed and, for a paired comparison, to both methods.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import statistics
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("id_avg", "id_normalized", "held_out_avg", "domain_shift_avg", "corrupted_avg", "ood_avg")
OOD_GROUP_NAMES = ("held_out", "domain_shift", "corrupted")
METRICS = ("id_avg", "ood_avg")
N_BOOT = 2000
BOOT_SEED = 2000


# ---------------------------------------------------------------------------------------------
# per-item correctness, compactly


def encode_bits(correct: Sequence[bool] | Any) -> str:
    """``"<n>:<base64 of the bits packed 8 per byte, first item in the high bit>"``."""
    bits = [bool(x) for x in (correct.tolist() if hasattr(correct, "tolist") else correct)]
    packed = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            packed[i >> 3] |= 0x80 >> (i & 7)
    return f"{len(bits)}:{base64.b64encode(bytes(packed)).decode('ascii')}"


def decode_bits(text: str) -> list[bool]:
    n_text, _, data = text.partition(":")
    n = int(n_text)
    packed = base64.b64decode(data)
    return [bool(packed[i >> 3] & (0x80 >> (i & 7))) for i in range(n)]


def _group(key: str) -> str:
    return "id" if "/" not in key else key.split("/", 1)[0]


def metric_weights(keys: Sequence[str], metric: str, ood_groups: Sequence[str]) -> dict[str, float] | None:
    """Weights w_k with metric = sum_k w_k * accuracy_k, as ``harness.summarize`` computes it:
    ``id_avg`` = mean over in-distribution sets; ``<group>_avg`` = mean over that group's sets;
    ``ood_avg`` = mean over ``ood_groups`` of the group means (None when a group is missing)."""
    by_group: dict[str, list[str]] = {}
    for k in keys:
        by_group.setdefault(_group(k), []).append(k)
    if metric == "ood_avg":
        if not ood_groups or any(not by_group.get(g) for g in ood_groups):
            return None
        return {k: 1.0 / (len(ood_groups) * len(by_group[g])) for g in ood_groups for k in by_group[g]}
    group = metric.removesuffix("_avg")
    if not by_group.get(group):
        return None
    return {k: 1.0 / len(by_group[group]) for k in by_group[group]}


@functools.lru_cache(maxsize=512)
def _indices(key: str, n: int, n_boot: int, seed: int):
    """[n_boot, n] item indices for set ``key``: fixed by (seed, key), whatever else is scored."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode("utf-8")))
    return torch.randint(0, n, (n_boot, n), generator=g)


def bootstrap(
    values: Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    level: float = 0.95,
) -> dict[str, float]:
    """Point estimate and percentile interval of ``mean_seeds sum_k w_k mean_items values[k]``.

    ``values[k]`` is a [seeds, items] array of per-item scores of set ``k`` (0/1 correctness,
    or a difference of two methods' correctness for a paired comparison). Each resample draws
    the items of every set with replacement (stratified by set, so an average stays an average
    over tasks), the same item indices for every seed (the seeds share their test items).
    Returns {"value", "lo", "hi", "n_boot"} in the units of ``values`` (x100 for %)."""
    import torch

    point = 0.0
    boots = torch.zeros(n_boot, dtype=torch.float64)
    for key, w in weights.items():
        v = torch.as_tensor(values[key], dtype=torch.float64)
        if v.dim() == 1:
            v = v.unsqueeze(0)
        n = v.shape[1]
        point += w * float(v.mean())
        idx = _indices(key, n, n_boot, seed)
        # mean over seeds first (the same indices apply to every seed), then resample items
        per_item = v.mean(0)
        boots += w * per_item[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    lo, hi = torch.quantile(boots, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return {"value": point, "lo": lo, "hi": hi, "n_boot": n_boot}


def _item_matrix(per_seed_items: Mapping[str, Mapping[str, str]], seeds: Sequence[str]) -> dict[str, Any]:
    """{set key: [seeds, items] 0/1 tensor} for the sets every seed scored."""
    import torch

    keys = [k for k in per_seed_items[seeds[0]] if all(k in per_seed_items[s] for s in seeds)]
    return {k: torch.tensor([decode_bits(per_seed_items[s][k]) for s in seeds], dtype=torch.float64) for k in keys}


def run_interval(run: Mapping[str, Any], metric: str, ood_groups: Sequence[str], split: str = "test") -> dict[str, float] | None:
    """95% bootstrap interval (in %) of one run's ``metric`` pooled over seeds."""
    items = run.get("items", {}).get(split)
    if not items:
        return None
    seeds = sorted(items, key=int)
    mat = _item_matrix(items, seeds)
    w = metric_weights(list(mat), metric, ood_groups)
    if w is None:
        return None
    out = bootstrap({k: 100.0 * v for k, v in mat.items()}, w)
    return {**out, "seeds": len(seeds)}


def paired_comparison(
    run_a: Mapping[str, Any], run_b: Mapping[str, Any], metric: str, ood_groups: Sequence[str], split: str = "test"
) -> dict[str, Any]:
    """a − b on ``metric`` (in points, pooled over the seeds both ran) with a 95% paired
    bootstrap interval: the same resampled items for a and b, per set, every seed.
    Also the discordant item counts over the metric's sets and seeds (a right & b wrong,
    a wrong & b right), for a sign test. Verdict: "a > b" / "a < b" only when the interval
    excludes 0."""
    out: dict[str, Any] = {"a": run_a["name"], "b": run_b["name"], "metric": metric}
    items_a = run_a.get("items", {}).get(split) or {}
    items_b = run_b.get("items", {}).get(split) or {}
    seeds = sorted(set(items_a) & set(items_b), key=int)
    if not seeds:
        return {**out, "value": None, "verdict": "no per-item data"}
    ma, mb = _item_matrix(items_a, seeds), _item_matrix(items_b, seeds)
    keys = [k for k in ma if k in mb]
    w_a = metric_weights(list(ma), metric, ood_groups)
    w_b = metric_weights(list(mb), metric, ood_groups)
    if w_a is None or w_b is None or w_a != w_b or any(k not in keys for k in w_a):
        return {**out, "value": None, "verdict": "not scored on the same sets"}
    diff = {k: 100.0 * (ma[k] - mb[k]) for k in w_a}
    stats = bootstrap(diff, w_a)
    per_seed = [sum(w * float(diff[k][i].mean()) for k, w in w_a.items()) for i in range(len(seeds))]
    a_only = int(sum(float(((ma[k] == 1) & (mb[k] == 0)).sum()) for k in w_a))
    b_only = int(sum(float(((ma[k] == 0) & (mb[k] == 1)).sum()) for k in w_a))
    if stats["lo"] > 0:
        verdict = "a > b"
    elif stats["hi"] < 0:
        verdict = "a < b"
    else:
        verdict = "no difference shown"
    return {**out, **stats, "seeds": len(seeds), "per_seed": per_seed, "a_only": a_only, "b_only": b_only, "sign_p": sign_test(a_only, b_only), "verdict": verdict}


def sign_test(k_a: int, k_b: int) -> float:
    """Two-sided exact sign-test p-value of the discordant counts (ties dropped)."""
    n = k_a + k_b
    if n == 0:
        return 1.0
    k = min(k_a, k_b)
    # exact integers: 2.0**n overflows a float beyond n = 1023 discordant items
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / (1 << n))


def comparisons(result: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every ``comparisons:`` entry of the methods file, on the test split."""
    runs = {r["name"]: r for r in result["runs"]}
    out = []
    for spec in specs:
        a, b, metric = spec["a"], spec["b"], spec.get("metric", "id_avg")
        if a not in runs or b not in runs:
            out.append({"a": a, "b": b, "metric": metric, "value": None, "verdict": "run not in this result"})
            continue
        out.append(paired_comparison(runs[a], runs[b], metric, result.get("ood_groups", [])))
    return out


def mean_std(values: Sequence[float | None]) -> dict[str, float | None] | None:
    """{"mean", "std", "n"} over the non-missing values (sample std; 0 for one value)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def aggregate(per_seed: Mapping[int, Sequence[Mapping[str, Any]]], *, ood_groups: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One entry per run: test accuracies and summaries as mean ± std over seeds, plus each
    seed's selected parameters, validation grid, times and per-item correctness (test, and val
    at the selected point), and the 95% bootstrap intervals of the ID and OOD averages."""
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
        items = {
            split: {str(s): r[f"{split}_items"] for s, r in zip(seeds, recs) if r.get(f"{split}_items")}
            for split in ("test", "val")
        }
        entry["items"] = {k: v for k, v in items.items() if v}
        if ood_groups is not None:
            entry["interval"] = {m: run_interval(entry, m, ood_groups) for m in METRICS}
        out.append(entry)
    return out


def _cell(stat: Mapping[str, float] | None, with_std: bool) -> str:
    if stat is None:
        return "—"
    if with_std and stat.get("n", 1) > 1:
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"
    return f"{stat['mean']:.1f}"


def _ci(run: Mapping[str, Any], metric: str) -> str:
    ci = (run.get("interval") or {}).get(metric)
    return "—" if not ci else f"[{ci['lo']:.1f}, {ci['hi']:.1f}]"


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
    t = result["timings"]
    lines.append(
        f"Task file `{result['task_file']}`, methods file `{result['methods_file']}`; seeds {result['seeds']}; "
        f"{m['cpu_count']} CPU cores, {m['threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}; "
        f"total wall time **{t['total_s']:.0f} s** (setup {t.get('setup_s', 0.0):.0f} s, fine-tuning {t['finetune_s']:.0f} s, "
        f"merges + evaluation {t.get('merge_eval_s', 0.0):.0f} s; "
        f"{t['experts_cached']} of {t['experts_total']} experts from the cache). "
        f"Accuracy in %, test split{'; mean ± std over seeds' if with_std else ''}. "
        "Merge coefficients and thresholds were chosen on the validation split (in-distribution average). "
        "95% CI: percentile bootstrap (2000 resamples) of the average pooled over seeds, resampling the "
        "test items of each set with replacement (the same items for every seed); it measures test-item "
        "noise given the experts, not seed-to-seed variation (the ± column)."
    )
    has_test = any(r["test"] for r in runs)
    if has_test:
        lines += ["", "## In-distribution (test)", ""]
        head = ["method", *id_tasks, "avg", "95% CI", "norm."]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            cells = [_cell(r["test"].get(t), with_std) for t in id_tasks]
            cells += [f"**{_cell(r['summary']['id_avg'], with_std)}**", _ci(r, "id_avg"), _cell(r["summary"]["id_normalized"], with_std)]
            lines.append("| " + " | ".join([r["name"], *cells]) + " |")
        lines += ["", "## Out-of-distribution (test)", ""]
        head = ["method", *ood_keys, "held-out avg", "domain shift", "corrupted avg", "OOD avg", "95% CI"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in runs:
            s = r["summary"]
            cells = [_cell(r["test"].get(k), with_std) for k in ood_keys]
            cells += [_cell(s["held_out_avg"], with_std), _cell(s["domain_shift_avg"], with_std), _cell(s["corrupted_avg"], with_std)]
            cells += [f"**{_cell(s['ood_avg'], with_std)}**", _ci(r, "ood_avg")]
            lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    if result.get("comparisons"):
        lines += ["", "## Paired comparisons (test)", ""]
        lines.append(
            f"a − b in points, pooled over {len(result['seeds'])} seed(s); 95% paired bootstrap CI (2000 resamples of "
            "the test items of each set, the same items for a and b and for every seed); \"a > b\" / \"a < b\" only "
            "when the CI excludes 0. per seed: a − b of each seed. a✓b✗ / a✗b✓: items (× seeds) of the metric's sets that only a / only b gets "
            "right; p: two-sided sign test on them."
        )
        lines += ["", "| a | b | metric | diff | 95% CI | per seed | a✓b✗ / a✗b✓ | sign p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for c in result["comparisons"]:
            if c.get("value") is None:
                lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | — | — | — | — | — | {c['verdict']} |")
                continue
            seeds_cell = " / ".join(f"{v:+.1f}" for v in c.get("per_seed", []))
            lines.append(
                f"| {c['a']} | {c['b']} | {c['metric']} | {c['value']:+.2f} | [{c['lo']:+.2f}, {c['hi']:+.2f}] | {seeds_cell} | "
                f"{c['a_only']} / {c['b_only']} | {c['sign_p']:.3f} | **{c['verdict']}** |"
            )
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
