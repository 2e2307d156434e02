"""The merge configurations the benchmark runs: mergekit-schema YAML, identical for both tools."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Case:
    """One benchmarked merge: a method (maybe wrapped by a modifier) and its parameters."""

    name: str
    merge_method: str
    per_model: dict[str, Any]
    parameters: dict[str, Any]
    mergekit: bool  # mergekit has this method with the same semantics
    parity: str | None  # "exact" (equal within output rounding), "statistical" (random drops) or None
    # linear averages the listed models only; with a base_model mergekit would average the base too
    uses_base: bool = True


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("task_arithmetic", "task_arithmetic", {"weight": 0.5}, {}, True, "exact"),
        Case("linear", "linear", {"weight": 1.0}, {}, True, "exact", uses_base=False),
        Case("ties", "ties", {"weight": 1.0, "density": 0.2}, {}, True, "exact"),
        Case("dare_ties", "dare_ties", {"weight": 1.0, "density": 0.5}, {}, True, "statistical"),
        # the official recipe (300 Adam steps); the default solver, auto, solves these full-rank
        # layers exactly, which is the wudi_exact row
        Case("wudi", "wudi", {}, {"solver": "adam"}, False, None),
        # the closed-form solver: on a GPU seconds for a 1B model where 300 Adam steps take minutes
        Case("wudi_exact", "wudi", {}, {"solver": "exact"}, False, None),
        Case("ties+tadrop", "tadrop", {"weight": 1.0}, {"merge_method": "ties", "density": 0.2}, False, None),
        Case("ties+lwptv", "lwptv", {"weight": 1.0}, {"merge_method": "ties", "density": 0.2}, False, None),
    ]
}

# The YAML's precision settings. "stored": no dtype key, so mergekit does its arithmetic in the
# stored bf16 (tritonmerge always accumulates in float32); "fp32": ``dtype: float32`` and
# ``out_dtype: bfloat16``, so both tools compute in float32 and round once at the end — the
# setting under which outputs must agree within bf16 rounding.
PRECISIONS = {
    "stored": {},
    "fp32": {"dtype": "float32", "out_dtype": "bfloat16"},
}


def config_dict(case: Case, base: Path, experts: list[Path], precision: str = "stored") -> dict[str, Any]:
    """The mergekit-schema config of ``case`` over the given checkpoint folders."""
    models = [{"model": str(e), **({"parameters": dict(case.per_model)} if case.per_model else {})} for e in experts]
    cfg: dict[str, Any] = {"merge_method": case.merge_method, "models": models}
    if case.uses_base:
        cfg["base_model"] = str(base)
    if case.parameters:
        cfg["parameters"] = dict(case.parameters)
    cfg.update(PRECISIONS[precision])
    return cfg


def write_config(path: Path, case: Case, base: Path, experts: list[Path], precision: str = "stored") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_dict(case, base, experts, precision), sort_keys=False))
    return path
