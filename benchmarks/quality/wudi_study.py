"""WUDI study: the Adam solver against the exact minimiser, step by step.

``python -m benchmarks.quality.wudi_study [--tasks FILE] [--seeds 0,1,2] [--cache-dir DIR]``

For every seed's experts it merges with WUDI

* ``solver: adam`` at each of ``--steps`` (default 0, 25, 50, 100, 200, 300, 600, 1200; 0 is the
  starting point Σᵢτᵢ, i.e. task arithmetic with λ = 1) at the first of ``--lrs`` (default 1e-5,
  the official one) and at ``--other-lr-steps`` (default 25, 50, 100, 300) for the others (2e-5),
* ``solver: exact`` at each of ``--ridges`` (default 1e-8, 1e-6 = the method's default, 1e-4, 1e-2),

and reports per merge, over the layers WUDI solves (2-D weights minus embeddings):

* the WUDI loss Σ_layers Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²_F / ‖τᵢ‖²_F, computed here from the task vectors and the
  merged vector (float64, Gram form, checked against the literal sum on one layer), as the
  fraction of the gap between Σᵢτᵢ and the exact minimiser that is left:
  ``gap_left = (L − L*) / (L(Σᵢτᵢ) − L*)`` (1 = the start, 0 = the minimiser; L* = the loss of the
  exact solver at the smallest ridge), and the loss ratio L / L*;
* ‖τ_m‖ / ‖Σᵢτᵢ‖ and ‖τ_m‖ / ‖τ_exact‖ (τ_exact = the default-ridge exact solution), and the
  cosine of τ_m with τ_exact and with Σᵢτᵢ (all over the concatenated solved layers);
* the validation in-distribution and OOD averages (selection uses only validation), the test ones
  (reported, never used), and the merge time.

Writes ``benchmarks/results/quality_wudi_study[_<name>].{json,md}`` and prints a conclusion: the
best (solver, steps/ridge, lr) on validation (in-distribution average; OOD average shown), and
whether the loss minimiser is the best merge.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE.parent / "results"
DEFAULT_TASKS = HERE / "tasks.yaml"
OOD_GROUPS_ALL = ("id", "held_out", "domain_shift", "corrupted")


# ----------------------------------------------------------------------------------------------
# the WUDI loss, computed independently of the solver


class LayerLoss:
    """L(τ) = Σᵢ ‖(τ − τᵢ)τᵢᵀ‖² / ‖τᵢ‖² for one layer in the Gram form
    tr(τGτᵀ) − 2 tr(τBᵀ) + c, G = Σ τᵢᵀτᵢ/‖τᵢ‖², B = Σ τᵢτᵢᵀτᵢ/‖τᵢ‖², c = Σ ‖τᵢτᵢᵀ‖²/‖τᵢ‖²
    (float64; zero task vectors skipped, as the solver does)."""

    def __init__(self, task_vectors: torch.Tensor) -> None:
        tv = task_vectors.to(torch.float64)
        n = tv.shape[2]
        self.G = torch.zeros(n, n, dtype=torch.float64)
        self.B = torch.zeros(tv.shape[1], n, dtype=torch.float64)
        self.c = 0.0
        self.n_tasks = 0
        for t in tv:
            sq = float(torch.sum(t * t))
            if sq < torch.finfo(torch.float32).tiny:
                continue
            gi = t.T @ t / sq
            self.G += gi
            self.B += t @ gi
            self.c += float(torch.sum((t @ t.T) ** 2)) / sq
            self.n_tasks += 1

    def __call__(self, tau: torch.Tensor) -> float:
        t = tau.to(torch.float64)
        return float(torch.sum((t @ self.G) * t)) - 2.0 * float(torch.sum(t * self.B)) + self.c


def literal_loss(task_vectors: torch.Tensor, tau: torch.Tensor) -> float:
    """The loss as the module's docstring writes it, term by term (float64): the check of LayerLoss."""
    tv = task_vectors.to(torch.float64)
    t = tau.to(torch.float64)
    total = 0.0
    for ti in tv:
        sq = float(torch.sum(ti * ti))
        if sq < torch.finfo(torch.float32).tiny:
            continue
        total += float(torch.sum(((t - ti) @ ti.T) ** 2)) / sq
    return total


def solved_names(base: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors WUDI optimises with its default parameters (select=official)."""
    from tritonmerge.methods.wudi import WudiParams, is_selected

    params = WudiParams()
    return [k for k, v in base.items() if is_selected(k, tuple(v.shape), params)]


def task_vector_stacks(bench: Any, experts: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """name -> [T, m, n] float32 task vectors, exactly as the merge computes them (expert − base)."""
    states = [experts[t].state(bench.base) for t in bench.in_distribution]
    out = {}
    for k in names:
        b = bench.base[k].to(torch.float32)
        out[k] = torch.stack([s[k].to(torch.float32) - b for s in states])
    return out


def flat(taus: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([taus[k].reshape(-1).to(torch.float64) for k in names])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------
# one seed


def configs(
    steps: Sequence[int], lrs: Sequence[float], ridges: Sequence[float], other_steps: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """The merges of one seed: Adam at every step count for the first lr (``other_steps``, when
    given, for the other lrs), then the exact solver at every ridge."""
    out: list[dict[str, Any]] = []
    for lr in lrs:
        for s in (steps if lr == lrs[0] or other_steps is None else other_steps):
            if s == 0 and lr != lrs[0]:
                continue  # steps 0 is Στᵢ whatever the lr
            out.append({"solver": "adam", "steps": int(s), "lr": float(lr)})
    for r in ridges:
        out.append({"solver": "exact", "ridge": float(r)})
    return out


def label(cfg: Mapping[str, Any]) -> str:
    if cfg["solver"] == "adam":
        return f"adam steps={cfg['steps']} lr={cfg['lr']:g}"
    return f"exact ridge={cfg['ridge']:g}"


def run_seed(bench: Any, seed: int, cfgs: Sequence[dict[str, Any]], args: argparse.Namespace, log) -> dict[str, Any]:
    from . import harness
    from .finetune import CACHE_DIR

    t0 = time.perf_counter()
    experts = harness.get_experts(bench, seed, cache_dir=args.cache_dir or CACHE_DIR, log=log)
    finetune_s = time.perf_counter() - t0
    names = solved_names(bench.base)
    tvs = task_vector_stacks(bench, experts, names)
    t1 = time.perf_counter()
    losses = {k: LayerLoss(v) for k, v in tvs.items()}
    sum_tau = {k: v.sum(0) for k, v in tvs.items()}
    log(f"  {len(names)} solved layers; loss precompute {time.perf_counter() - t1:.1f}s")

    val_groups = [g for g in OOD_GROUPS_ALL if any(s.group == g for s in bench.sets["val"])]
    val_sets = bench.eval_sets("val", val_groups)
    test_sets = bench.eval_sets("test", OOD_GROUPS_ALL) if not args.no_test else []

    # experts on their own sets (the "norm." reference), once
    expert_val: dict[str, float] = {}
    for t in bench.in_distribution:
        expert_val.update(harness.evaluate(bench, experts[t].state(bench.base), bench.eval_sets("val", ("id",), [t])))

    rows: list[dict[str, Any]] = []
    taus: dict[str, dict[str, torch.Tensor]] = {}
    trajectory: dict[tuple[float, int], tuple[dict[str, torch.Tensor], float]] = {}
    if args.trajectory:
        # every Adam step count of one lr from one run: checkpoints of the same iterates
        start, start_s = harness.merge(bench, "wudi", {"solver": "adam", "steps": 0}, experts)
        for lr in sorted({c["lr"] for c in cfgs if c["solver"] == "adam"}):
            counts = sorted({c["steps"] for c in cfgs if c["solver"] == "adam" and c["lr"] == lr})
            for steps, (tau_ck, secs) in adam_trajectory(tvs, names, counts, lr, log).items():
                merged = dict(start)
                for k in names:
                    merged[k] = (bench.base[k].to(torch.float32) + tau_ck[k]).to(bench.base[k].dtype)
                trajectory[(lr, steps)] = (merged, start_s + secs)
    # the exact solver first: the reference every other row is measured against
    for cfg in sorted(cfgs, key=lambda c: c["solver"] != "exact"):
        params = dict(cfg)
        if cfg["solver"] == "adam" and (cfg["lr"], cfg["steps"]) in trajectory:
            merged, seconds = trajectory.pop((cfg["lr"], cfg["steps"]))
        else:
            merged, seconds = harness.merge(bench, "wudi", params, experts)
        tau = {k: merged[k].to(torch.float32) - bench.base[k].to(torch.float32) for k in names}
        t_eval = time.perf_counter()
        val = harness.evaluate(bench, merged, val_sets)
        test = harness.evaluate(bench, merged, test_sets) if test_sets else {}
        eval_s = time.perf_counter() - t_eval
        loss = sum(losses[k](tau[k]) for k in names)
        vs = harness.summarize(bench, val, expert_val)
        ts = harness.summarize(bench, test) if test else {}
        row = {
            "config": label(cfg),
            **cfg,
            "loss": loss,
            "merge_s": seconds,
            "eval_s": eval_s,
            "val": val,
            "val_id_avg": vs.get("id_avg"),
            "val_id_normalized": vs.get("id_normalized"),
            "val_ood_avg": _ood_avg(vs, val_groups),
            "test": test,
            "test_id_avg": ts.get("id_avg"),
            "test_ood_avg": ts.get("ood_avg"),
        }
        rows.append(row)
        taus[row["config"]] = tau
        if args.partial is not None:  # progress, in case a long run is cut short
            args.partial.write_text(json.dumps({"seed": seed, "rows": rows}, indent=1, default=float), encoding="utf-8")
        log(
            f"  {row['config']:<28} loss {loss:.6e}  merge {seconds:5.1f}s  val id {row['val_id_avg']:.2f} "
            f"ood {_fmt(row['val_ood_avg'])}  test id {_fmt(row['test_id_avg'])} ood {_fmt(row['test_ood_avg'])}"
        )

    order = [label(c) for c in cfgs]
    rows.sort(key=lambda r: order.index(r["config"]))
    # reference points: Στᵢ, the default-ridge exact solution, the smallest-loss exact solution
    from tritonmerge.ops.wudi_solve import DEFAULT_RIDGE

    exact_rows = [r for r in rows if r["solver"] == "exact"]
    ref_exact = next((r for r in exact_rows if r["ridge"] == DEFAULT_RIDGE), exact_rows[0] if exact_rows else None)
    loss_init = sum(losses[k](sum_tau[k]) for k in names)
    loss_star = min(r["loss"] for r in exact_rows) if exact_rows else min(r["loss"] for r in rows)
    v_sum = flat(sum_tau, names)
    v_exact = flat(taus[ref_exact["config"]], names) if ref_exact else None
    for r in rows:
        v = flat(taus[r["config"]], names)
        r["loss_ratio"] = r["loss"] / loss_star if loss_star > 0 else math.nan
        r["gap_left"] = (r["loss"] - loss_star) / (loss_init - loss_star) if loss_init != loss_star else math.nan
        r["norm_vs_sum"] = float(v.norm() / v_sum.norm())
        r["cos_sum"] = cosine(v, v_sum)
        if v_exact is not None:
            r["norm_vs_exact"] = float(v.norm() / v_exact.norm())
            r["cos_exact"] = cosine(v, v_exact)
        # mean over layers of the per-layer cosine to the exact solution (layers differ in scale)
        if ref_exact is not None:
            ex = taus[ref_exact["config"]]
            r["cos_exact_layer_mean"] = statistics.fmean(
                cosine(taus[r["config"]][k].reshape(-1).double(), ex[k].reshape(-1).double()) for k in names
            )
        # how far each entry moved from Στᵢ (Adam moves an entry by at most ~lr per step)
        d = (v - v_sum).abs()
        r["max_abs_move"] = float(d.max())
        r["mean_abs_move"] = float(d.mean())

    checks = verify(tvs, names, losses, rows, sum_tau, loss_init, log)
    return {
        "seed": seed,
        "finetune_s": finetune_s,
        "experts_cached": all(e.cached for e in experts.values()),
        "solved_layers": names,
        "solved_params": int(sum(tvs[k][0].numel() for k in names)),
        "loss_init": loss_init,
        "loss_star": loss_star,
        "mean_abs_tau_sum": float(v_sum.abs().mean()),
        "expert_val": expert_val,
        "rows": rows,
        "checks": checks,
    }


def adam_trajectory(
    tvs: Mapping[str, torch.Tensor], names: Sequence[str], counts: Sequence[int], lr: float, log
) -> dict[int, tuple[dict[str, torch.Tensor], float]]:
    """The solver's Adam iterates (``wudi_solve.precompute`` + ``adam_update_torch``, the ops of
    ``wudi_solve.adam_loop``) from Σᵢτᵢ, same-shaped layers batched as the method batches them,
    snapshotted at every step count in ``counts``: steps -> (name -> τ, seconds from the start
    including the precompute, i.e. what a merge with that many steps costs, less the merge's own
    overhead, which the steps-0 merge's time adds back)."""
    from tritonmerge.ops import wudi_solve as ws

    counts = sorted(set(counts))
    out: dict[int, dict[str, torch.Tensor]] = {c: {} for c in counts}
    seconds = {c: 0.0 for c in counts}
    groups: dict[tuple, list[str]] = {}
    for k in names:
        groups.setdefault(tuple(tvs[k].shape), []).append(k)
    with torch.no_grad():
        for shape, keys in groups.items():
            t0 = time.perf_counter()
            problem = ws.precompute(torch.stack([tvs[k] for k in keys]))
            tau = problem.init.clone()
            m1, m2 = torch.zeros_like(tau), torch.zeros_like(tau)
            P, grad = torch.empty_like(tau), torch.empty_like(tau)
            done = 0
            for c in counts:
                for t in range(done + 1, c + 1):
                    problem.product(tau, out=P)
                    torch.sub(P, problem.B, out=grad).mul_(2.0)
                    ws.adam_update_torch(tau, m1, m2, grad, t, lr)
                done = c
                seconds[c] += time.perf_counter() - t0
                for i, k in enumerate(keys):
                    out[c][k] = tau[i].clone()
            log(f"  trajectory lr={lr:g} {len(keys)} x {shape}: {time.perf_counter() - t0:.1f}s")
    return {c: (out[c], seconds[c]) for c in counts}


def _ood_avg(summary: Mapping[str, Any], groups: Sequence[str]) -> float | None:
    vals = [summary.get(f"{g}_avg") for g in groups if g != "id"]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def verify(tvs, names, losses, rows, sum_tau, loss_init, log) -> dict[str, Any]:
    """The loss function against the solver: Gram form = literal sum on one layer; the exact
    solution has the lowest loss of all merges; Adam's loss decreases with steps (per lr)."""
    from tritonmerge.ops.wudi_solve import wudi_loss_direct

    k = min(names, key=lambda n: tvs[n][0].numel())  # the smallest layer: cheap literal sum
    tau = sum_tau[k]
    gram, lit, mod = losses[k](tau), literal_loss(tvs[k], tau), wudi_loss_direct(tvs[k], tau)
    out: dict[str, Any] = {"layer": k, "gram_vs_literal_rel": abs(gram - lit) / abs(lit), "literal_vs_module_rel": abs(lit - mod) / abs(mod)}
    exact = [r for r in rows if r["solver"] == "exact"]
    adam = [r for r in rows if r["solver"] == "adam"]
    out["exact_is_lowest"] = bool(exact) and min(r["loss"] for r in exact) <= min(r["loss"] for r in rows) * (1 + 1e-12)
    mono = True
    for lr in sorted({r["lr"] for r in adam}):
        seq = [loss_init] + [r["loss"] for r in sorted((r for r in adam if r["lr"] == lr and r["steps"] > 0), key=lambda r: r["steps"])]
        mono &= all(b <= a * (1 + 1e-9) for a, b in zip(seq, seq[1:]))
    out["adam_decreasing"] = mono
    zero = next((r for r in adam if r["steps"] == 0), None)
    if zero is not None:
        out["steps0_equals_sum"] = abs(zero["loss"] - loss_init) <= 1e-9 * abs(loss_init)
    log(f"  checks: {out}")
    return out


# ----------------------------------------------------------------------------------------------
# aggregation, report


COLUMNS = [
    ("gap_left", "gap left", ".4f"),
    ("loss_ratio", "L/L*", ".3f"),
    ("norm_vs_sum", "‖τ‖/‖Στᵢ‖", ".3f"),
    ("norm_vs_exact", "‖τ‖/‖τ_exact‖", ".3f"),
    ("cos_exact", "cos(τ, τ_exact)", ".3f"),
    ("cos_sum", "cos(τ, Στᵢ)", ".3f"),
    ("val_id_avg", "val ID", ".2f"),
    ("val_ood_avg", "val OOD", ".2f"),
    ("test_id_avg", "test ID", ".2f"),
    ("test_ood_avg", "test OOD", ".2f"),
    ("merge_s", "merge s", ".1f"),
]


def aggregate(seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: mean (and std over seeds when > 1) of every numeric column."""
    order = [r["config"] for r in seeds[0]["rows"]]
    out = []
    for cfg in order:
        rows = [next(r for r in s["rows"] if r["config"] == cfg) for s in seeds]
        agg: dict[str, Any] = {k: rows[0][k] for k in ("config", "solver", "steps", "lr", "ridge") if k in rows[0]}
        for key, _, _ in COLUMNS + [("cos_exact_layer_mean", "", ""), ("max_abs_move", "", ""), ("loss", "", "")]:
            vals = [r.get(key) for r in rows]
            vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
            agg[key] = statistics.fmean(vals) if vals else None
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = result["aggregate"]
    multi = len(result["seeds"]) > 1
    lines = [
        f"# WUDI: Adam vs exact solver ({result['task_file']}, seeds {','.join(map(str, result['seeds']))})",
        "",
        "Loss = Σ over the solved layers of Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖². gap left = (L − L*)/(L(Στᵢ) − L*), "
        "L* = the exact solver's loss at the smallest ridge. τ_exact = exact solver at the default ridge. "
        "Norms and cosines over the concatenated solved layers. Accuracies in %; test is reported only."
        + (" Mean ± std over seeds." if multi else ""),
        "",
        "| config | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    best = max(rows, key=lambda r: (r["val_id_avg"] or -1))
    for r in rows:
        cells = []
        for key, _, spec in COLUMNS:
            v = r.get(key)
            s = _fmt(v, spec)
            if multi and key in ("val_id_avg", "val_ood_avg", "test_id_avg", "test_ood_avg") and r.get(key + "_std") is not None:
                s += f" ± {r[key + '_std']:.2f}"
            cells.append(s)
        name = f"**{r['config']}**" if r is best else r["config"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Conclusion", "", *result["conclusion"], ""]
    lines += ["## Checks", ""]
    for s in result["per_seed"]:
        lines.append(f"- seed {s['seed']}: {json.dumps(s['checks'])}")
    return "\n".join(lines) + "\n"


def conclude(rows: Sequence[dict[str, Any]]) -> list[str]:
    best = max(rows, key=lambda r: (r["val_id_avg"] or -1))
    best_ood = max(rows, key=lambda r: (r["val_ood_avg"] if r["val_ood_avg"] is not None else -1))
    minimiser = min(rows, key=lambda r: r["loss"])
    adam = [r for r in rows if r["solver"] == "adam"]
    exact = [r for r in rows if r["solver"] == "exact"]
    best_adam = max(adam, key=lambda r: r["val_id_avg"] or -1) if adam else None
    best_exact = max(exact, key=lambda r: r["val_id_avg"] or -1) if exact else None
    out = [
        f"- Best on validation (in-distribution average): **{best['config']}** — val ID {_fmt(best['val_id_avg'])}, "
        f"val OOD {_fmt(best['val_ood_avg'])}, gap left {_fmt(best['gap_left'], '.3f')}.",
        f"- Best on validation OOD: {best_ood['config']} (val OOD {_fmt(best_ood['val_ood_avg'])}, val ID {_fmt(best_ood['val_id_avg'])}).",
    ]
    if best_adam and best_exact:
        out.append(
            f"- Best Adam: {best_adam['config']} (val ID {_fmt(best_adam['val_id_avg'])}); best exact: {best_exact['config']} "
            f"(val ID {_fmt(best_exact['val_id_avg'])}); difference {best_adam['val_id_avg'] - best_exact['val_id_avg']:+.2f}."
        )
    out.append(
        f"- The loss minimiser ({minimiser['config']}, val ID {_fmt(minimiser['val_id_avg'])}) is "
        + ("the best merge on validation." if minimiser is best else
           f"not the best merge: {best['val_id_avg'] - minimiser['val_id_avg']:+.2f} points for {best['config']}.")
    )
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=Path, default=DEFAULT_TASKS, help="task file (default tasks.yaml)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--steps", default="0,25,50,100,200,300,600,1200", help="Adam step counts")
    ap.add_argument("--lrs", default="1e-5,2e-5", help="Adam learning rates (the first is the main one)")
    ap.add_argument("--other-lr-steps", default="25,50,100,300",
                    help="Adam step counts for the lrs after the first ('' = the same as --steps)")
    ap.add_argument("--ridges", default="1e-8,1e-6,1e-4,1e-2", help="exact-solver ridges (relative to tr(G)/n)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="expert cache (default benchmarks/.cache/quality)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--name", default=None, help="results: quality_wudi_study[_<name>].{json,md}")
    ap.add_argument("--no-test", action="store_true", help="skip the test split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trajectory", action="store_true",
                    help="Adam merges of one lr as checkpoints of one run (same iterates, far cheaper on a CPU; "
                    "merge s = the time to that checkpoint); default: one tritonmerge merge per step count")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = "quality_wudi_study" + (f"_{args.name}" if args.name else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.partial = args.out_dir / f"{stem}.partial.json"

    from . import harness
    from .tasks import load_task_file

    log = lambda msg: print(msg, flush=True)
    t_start = time.perf_counter()
    tasks = load_task_file(args.tasks)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cfgs = configs(
        [int(s) for s in args.steps.split(",")], [float(x) for x in args.lrs.split(",")], [float(x) for x in args.ridges.split(",")],
        [int(s) for s in args.other_lr_steps.split(",")] if args.other_lr_steps.strip() else None,
    )
    log(f"wudi study: {args.tasks}, seeds {seeds}, {len(cfgs)} merges per seed")
    bench = harness.build_bench(tasks)
    per_seed = []
    for seed in seeds:
        log(f"seed {seed}")
        per_seed.append(run_seed(bench, seed, cfgs, args, log))
    agg = aggregate(per_seed)
    try:
        task_file = str(args.tasks.resolve().relative_to(HERE.parents[1]))
    except ValueError:
        task_file = str(args.tasks)
    result = {
        "benchmark": "quality_wudi_study",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task_file": task_file,
        "seeds": seeds,
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "configs": cfgs,
        "aggregate": agg,
        "conclusion": conclude(agg),
        "per_seed": per_seed,
        "total_s": time.perf_counter() - t_start,
    }
    args.partial.unlink(missing_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    md = markdown(result)
    (args.out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    print(md)
    log(f"wrote {args.out_dir / stem}.{{json,md}} in {result['total_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
