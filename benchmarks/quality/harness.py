"""The benchmark's moving parts: evaluation sets, the frozen heads, experts, merges, selection.

``Bench`` holds the encoder, the base parameters, the tokenised splits and heads of one task
file; ``evaluate`` scores a parameter set on any list of evaluation sets with one batched,
length-sorted pass; ``run_method`` runs one entry of a methods file (grid of parameters ->
merge with ``tritonmerge.merge_state_dicts`` -> validation score -> best -> test).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import encoder as enc
from .finetune import CACHE_DIR, Expert, cache_key, get_expert, train_expert
from .tasks import OOD_GROUPS, TaskFile, corrupt, make_splits

# Pseudo-methods of a methods file besides the registered merge methods.
ZERO_SHOT = "zero_shot"
EXPERTS = "experts"


@dataclass
class EvalSet:
    """One scored set: ``key`` is the task name for in-distribution sets, ``<group>/<task>`` else."""

    key: str
    group: str  # id | held_out | domain_shift | corrupted
    task: str
    head_task: str
    split: str
    tokens: enc.Tokens
    labels: torch.Tensor


@dataclass
class Bench:
    tasks: TaskFile
    model: torch.nn.Module
    tokenizer: Any
    base: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    train: dict[str, tuple[enc.Tokens, list[int]]]
    sets: dict[str, list[EvalSet]]  # split -> sets
    timings: dict[str, float] = field(default_factory=dict)
    # the pre-trained encoder's accuracies do not depend on the seed: computed once per split/groups
    base_results: dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]] = field(default_factory=dict)

    def base_correctness(self, split: str, groups: Sequence[str]) -> dict[str, torch.Tensor]:
        key = (split, tuple(groups))
        if key not in self.base_results:
            self.base_results[key] = correctness(self, None, self.eval_sets(split, groups))
        return dict(self.base_results[key])

    def base_accuracy(self, split: str, groups: Sequence[str]) -> dict[str, float]:
        return accuracies(self.base_correctness(split, groups))

    @property
    def in_distribution(self) -> list[str]:
        return [t.name for t in self.tasks.by_role("in_distribution")]

    def eval_sets(self, split: str, groups: Sequence[str], head_tasks: Sequence[str] | None = None) -> list[EvalSet]:
        return [
            s
            for s in self.sets[split]
            if s.group in groups and (head_tasks is None or s.head_task in head_tasks)
        ]


def build_bench(tasks: TaskFile) -> Bench:
    """Load the encoder, draw and tokenise every split, embed the label descriptions."""
    t0 = time.perf_counter()
    model, tokenizer = enc.load_encoder()
    for p in model.parameters():
        p.requires_grad_(False)
    base = enc.encoder_state(model)
    settings = tasks.settings
    max_length = int(settings["max_length"])
    rate = float(settings["corruption"]["rate"])
    salt = str(settings["corruption"]["salt"])
    t_load = time.perf_counter()

    heads: dict[str, torch.Tensor] = {}
    train: dict[str, tuple[enc.Tokens, list[int]]] = {}
    sets: dict[str, list[EvalSet]] = {"val": [], "test": []}
    for task in tasks.tasks:
        splits = make_splits(task, int(settings["split_seed"]))
        if task.role != "domain_shift":
            heads[task.name] = enc.embed(model, enc.tokenize(tokenizer, list(task.labels.values()), max_length))
        if task.role == "in_distribution":
            train[task.name] = (enc.tokenize(tokenizer, splits["train"].texts, max_length), splits["train"].labels)
        group = {"in_distribution": "id", "held_out": "held_out", "domain_shift": "domain_shift"}[task.role]
        for split in ("val", "test"):
            if split not in splits:
                continue
            data = splits[split]
            labels = torch.tensor(data.labels, dtype=torch.long)
            key = task.name if group == "id" else f"{group}/{task.name}"
            sets[split].append(
                EvalSet(key, group, task.name, task.head_task, split, enc.tokenize(tokenizer, data.texts, max_length), labels)
            )
            if group == "id":
                noisy = [corrupt(t, rate, salt) for t in data.texts]
                sets[split].append(
                    EvalSet(
                        f"corrupted/{task.name}", "corrupted", task.name, task.name, split,
                        enc.tokenize(tokenizer, noisy, max_length), labels,
                    )
                )
    bench = Bench(tasks, model, tokenizer, base, heads, train, sets)
    bench.timings["load_model_s"] = t_load - t0
    bench.timings["data_and_heads_s"] = time.perf_counter() - t_load
    return bench


def evaluate(bench: Bench, state: Mapping[str, torch.Tensor] | None, sets: Sequence[EvalSet]) -> dict[str, float]:
    """Accuracy (%) per set of the encoder with mergeable parameters ``state`` (None = base)."""
    return accuracies(correctness(bench, state, sets))


def accuracies(correct: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy (%) per set from per-item correctness."""
    return {k: 100.0 * float(c.float().mean()) for k, c in correct.items()}


def correctness(bench: Bench, state: Mapping[str, torch.Tensor] | None, sets: Sequence[EvalSet]) -> dict[str, torch.Tensor]:
    """Per-item correctness (bool tensor per set, in the set's item order) of the encoder with
    mergeable parameters ``state`` (None = base)."""
    if not sets:
        return {}
    enc.load_state(bench.model, state if state is not None else bench.base)
    try:
        ids = [x for s in sets for x in s.tokens.ids]
        with enc.precision(bench.tasks.settings["eval_precision"]):
            emb = enc.embed(bench.model, enc.Tokens(ids))
    finally:
        if state is not None:
            enc.load_state(bench.model, bench.base)
    out: dict[str, torch.Tensor] = {}
    start = 0
    temperature = float(bench.tasks.settings["temperature"])
    for s in sets:
        e = emb[start : start + len(s.tokens)]
        start += len(s.tokens)
        pred = enc.cosine_logits(e, bench.heads[s.head_task], temperature).argmax(1)
        out[s.key] = pred == s.labels
    return out


def summarize(bench: Bench, acc: Mapping[str, float], expert_acc: Mapping[str, float] | None = None) -> dict[str, float | None]:
    """Averages: in-distribution, normalised to the experts, each OOD group, OOD overall."""

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    by_group: dict[str, list[float]] = {}
    for key, value in acc.items():
        group = "id" if "/" not in key else key.split("/", 1)[0]
        by_group.setdefault(group, []).append(value)
    out: dict[str, float | None] = {f"{g}_avg": mean(by_group.get(g, [])) for g in ("id", *OOD_GROUPS)}
    # OOD overall: the mean of the group averages, only when every group the task file has is scored
    present = [g for g in OOD_GROUPS if any(s.group == g for s in bench.sets["test"])]
    values = [out[f"{g}_avg"] for g in present]
    out["ood_avg"] = mean(values) if values and all(v is not None for v in values) else None  # type: ignore[arg-type]
    if expert_acc:
        ratios = [acc[t] / expert_acc[t] for t in bench.in_distribution if t in acc and expert_acc.get(t)]
        out["id_normalized"] = 100.0 * mean(ratios) if ratios else None
    return out


# ---------------------------------------------------------------------------------------------
# experts


def get_experts(bench: Bench, seed: int, *, use_cache: bool = True, cache_dir=CACHE_DIR, log: Callable[[str], None] = print) -> dict[str, Expert]:
    """One expert per in-distribution task: from the cache, or fine-tuned now."""
    experts = {}
    for name in bench.in_distribution:
        task = bench.tasks.get(name)
        tokens, labels = bench.train[name]
        head_fp = str(hash_tensor(bench.heads[name]))
        key = cache_key(task.fingerprint(), head_fp, bench.tasks.settings, seed)

        def train(task_name: str = name, tokens: enc.Tokens = tokens, labels: list[int] = labels) -> tuple[dict, int]:
            return train_expert(bench.model, bench.base, tokens, labels, bench.heads[task_name], bench.tasks.settings, seed)

        experts[name] = get_expert(name, key, train, cache_dir=cache_dir, use_cache=use_cache)
        e = experts[name]
        log(f"  expert {name}: {'cached' if e.cached else f'trained {e.steps} steps in {e.seconds:.1f}s'}")
    return experts


def hash_tensor(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# methods


@dataclass
class RunSpec:
    """One row of a methods file."""

    name: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    inherit: str | None = None  # start from the parameters this earlier run selected

    def grid_points(self, inherited: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        base = {**(inherited or {}), **self.params}
        if not self.grid:
            return [base]
        keys = list(self.grid)
        return [{**base, **dict(zip(keys, values))} for values in itertools.product(*(self.grid[k] for k in keys))]


def inner_chain(method: str, params: Mapping[str, Any]) -> list[str]:
    """The methods a call runs, outermost first: lwptv -> tadrop -> dare_ties."""
    chain = [method]
    if params.get("merge_method"):
        chain.append(str(params["merge_method"]))
    if params.get("inner_merge_method"):
        chain.append(str(params["inner_merge_method"]))
    return chain


def seeded_params(method: str, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``params`` plus ``seed`` (the benchmark seed) when a method of the chain draws random
    numbers and the methods file did not fix it."""
    import tritonmerge

    out = dict(params)
    if "seed" in out:
        return out
    for name in inner_chain(method, params):
        names = {row["name"] for row in tritonmerge.describe(name)["params"]}
        if "seed" in names:
            out["seed"] = seed
            break
    return out


def merge(bench: Bench, method: str, params: Mapping[str, Any], experts: Mapping[str, Expert]) -> tuple[dict[str, torch.Tensor], float]:
    """(merged mergeable parameters, seconds) through the public API."""
    import tritonmerge

    expert_states = [experts[name].state(bench.base) for name in bench.in_distribution]
    t0 = time.perf_counter()
    merged = tritonmerge.merge_state_dicts(method, bench.base, expert_states, **params)
    return merged, time.perf_counter() - t0


def _score(summary: Mapping[str, float | None]) -> float:
    value = summary.get("id_avg")
    return -math.inf if value is None else float(value)


def _bits(correct: Mapping[str, torch.Tensor]) -> dict[str, str]:
    from .report import encode_bits

    return {k: encode_bits(v) for k, v in correct.items()}


def _memo_key(method: str, params: Mapping[str, Any], groups: Sequence[str]) -> str:
    import json

    return json.dumps([method, params, list(groups)], sort_keys=True, default=str)


def run_method(
    bench: Bench,
    spec: RunSpec,
    experts: Mapping[str, Expert],
    seed: int,
    selected: Mapping[str, dict[str, Any]],
    *,
    expert_acc: Mapping[str, float] | None,
    val_ood: bool,
    test: bool,
    log: Callable[[str], None] = print,
    memo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one methods-file entry for one seed: grid on val, best on test. Returns the record,
    with per-item correctness (``val_items`` at the selected point, ``test_items``) as bitsets.

    ``memo`` (one dict per seed and expert set, shared across runs) keeps the scores of every
    (method, params) merged so far, so that a parameter set repeated by another run is neither
    merged nor evaluated again (merges are deterministic given their params, seed included)."""
    t_run = time.perf_counter()
    record: dict[str, Any] = {"name": spec.name, "method": spec.method}
    val_groups = ("id", "held_out", "domain_shift", "corrupted") if val_ood else ("id",)
    test_groups = ("id", "held_out", "domain_shift", "corrupted")

    if spec.method == ZERO_SHOT:
        record["params"] = {}
        val_c = bench.base_correctness("val", val_groups)
        record["val"], record["val_items"] = accuracies(val_c), _bits(val_c)
        if test:
            test_c = bench.base_correctness("test", test_groups)
            record["test"], record["test_items"] = accuracies(test_c), _bits(test_c)
        else:
            record["test"] = {}
        record["seconds"] = time.perf_counter() - t_run
        return record

    if spec.method == EXPERTS:
        # each expert on the sets its own head scores: its task, that task corrupted, and the
        # domain-shift sets of its head; held-out tasks have no expert
        record["params"] = {}
        val_c: dict[str, torch.Tensor] = {}
        test_c: dict[str, torch.Tensor] = {}
        for name in bench.in_distribution:
            state = experts[name].state(bench.base)
            val_c.update(correctness(bench, state, bench.eval_sets("val", val_groups, [name])))
            if test:
                test_c.update(correctness(bench, state, bench.eval_sets("test", test_groups, [name])))
        record["val"], record["val_items"] = accuracies(val_c), _bits(val_c)
        record["test"] = accuracies(test_c)
        if test:
            record["test_items"] = _bits(test_c)
        record["finetune_s"] = {n: e.seconds for n, e in experts.items()}
        record["seconds"] = time.perf_counter() - t_run
        return record

    memo = {} if memo is None else memo
    inherited = None
    if spec.inherit is not None:
        if spec.inherit not in selected:
            raise ValueError(f"run {spec.name!r} inherits from {spec.inherit!r}, which has not run before it")
        inherited = {k: v for k, v in selected[spec.inherit].items() if k != "seed"}
    grid = []
    best: tuple[float, int, dict[str, Any], dict[str, torch.Tensor] | None] = (-math.inf, -1, {}, None)
    merge_seconds = []
    val_correct = []
    for i, point in enumerate(spec.grid_points(inherited)):
        params = seeded_params(spec.method, point, seed)
        key = _memo_key(spec.method, params, val_groups)
        if key in memo:
            val_c, seconds = memo[key]
            merged = None  # merged again below only if it is selected and its test score is not known
            note = "repeated: scores reused"
        else:
            merged, seconds = merge(bench, spec.method, params, experts)
            val_c = correctness(bench, merged, bench.eval_sets("val", val_groups))
            memo[key] = (val_c, seconds)
            note = f"merge {seconds:.1f}s"
        merge_seconds.append(seconds)
        val_correct.append(val_c)
        val = accuracies(val_c)
        summary = summarize(bench, val)
        grid.append({"params": params, "val": val, "summary": summary, "merge_s": seconds})
        score = _score(summary)
        log(f"    {spec.name} {point}: val id {summary['id_avg']:.2f}" + (f" ood {summary['ood_avg']:.2f}" if val_ood and summary.get("ood_avg") is not None else "") + f" ({note})")
        if score > best[0]:
            best = (score, i, params, merged)
        else:
            del merged
    _, best_index, best_params, best_state = best
    record["params"] = best_params
    record["grid"] = grid
    record["val"] = grid[best_index]["val"]
    record["val_items"] = _bits(val_correct[best_index])
    record["merge_s"] = merge_seconds[best_index]
    record["merge_s_total"] = sum(merge_seconds)
    if test:
        test_key = "test:" + _memo_key(spec.method, best_params, test_groups)
        if test_key not in memo:
            if best_state is None:
                best_state, _ = merge(bench, spec.method, best_params, experts)
            memo[test_key] = correctness(bench, best_state, bench.eval_sets("test", test_groups))
        test_c = memo[test_key]
        record["test"], record["test_items"] = accuracies(test_c), _bits(test_c)
    else:
        record["test"] = {}
    record["seconds"] = time.perf_counter() - t_run
    return record
