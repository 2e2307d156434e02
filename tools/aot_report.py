#!/usr/bin/env python3
"""Ahead-of-time compile report: every Triton kernel specialisation and the CUDA extension, for
the supported GPU architectures, on a machine without a GPU.

    python -m tools.aot_report            # compile, write benchmarks/results/triton_aot.json
    python -m tools.aot_report --full     # also every mixed base/expert dtype pair (slow)
    python -m tools.aot_report --out PATH

Triton: the kernels are found by reading the sources of tritonmerge/backends/triton/ (``discover``); each
launched one must have a LaunchTable (tritonmerge/backends/triton/specializations.py) next to its
launcher, and every table entry selected by ``selected`` is compiled with ``triton.compile``
for each of ``TRITON_ARCHS`` by a process pool. Registers, spills and shared memory come from
the ptxas log of that compile (Triton's bundled ptxas).

CUDA: every csrc/*.cu is compiled by nvcc with the project's flags (.ci/compile_cuda.sh) and
``-Xptxas -v`` for each of ``CUDA_ARCHS``; each kernel's registers, spills and shared memory
become rows of the same report. Skipped (recorded as such) without nvcc.

A row is ``ok`` when it compiled without spills and within the architecture's shared-memory and
register limits. tests/test_aot_compile.py runs ``build_report`` and fails on any row that is not.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "tritonmerge" / "backends" / "triton"
PACKAGE_DIR = ROOT / "tritonmerge"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "triton_aot.json"
TRITON_ARCHS = (80, 90, 100)
CUDA_ARCHS = (80, 90)
NVCC_FLAGS = ("-std=c++20", "-O3", "-Icsrc")  # .ci/compile_cuda.sh
WORKERS = 2  # CI has 2 cores


# ---------------------------------------------------------------------------------------------
# which kernels exist, and which of them host code launches


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute):
        return target.attr == "jit"
    return isinstance(target, ast.Name) and target.id == "jit"


@dataclass
class Discovery:
    jit_functions: dict[str, str]  # name -> module (tritonmerge.backends.triton.*)
    launched: dict[str, str]  # the jit functions host code refers to: kernels, not helpers
    direct_launches: list[str]  # "file:line name" of kernel[grid](...) calls bypassing a LaunchTable


def discover() -> Discovery:
    """Read tritonmerge/backends/triton/*.py for ``@triton.jit`` functions, then all of tritonmerge/ for
    references to them outside jit bodies: a jit function that host code names (to launch it,
    or to build its LaunchTable) is a launched kernel; one named only inside other jit
    functions is a helper. A ``name[grid](...)`` call in host code is a launch that skips the
    table's check."""
    jit_functions: dict[str, str] = {}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        module = "tritonmerge.backends.triton." + path.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list):
                jit_functions[node.name] = module
    launched: dict[str, str] = {}
    direct: list[str] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        inside_jit: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list):
                inside_jit.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in inside_jit:
                continue
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in jit_functions:
                launched[name] = jit_functions[name]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                callee = node.func.value
                callee_name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", None)
                if callee_name in jit_functions:
                    direct.append(f"{path.relative_to(ROOT)}:{node.lineno} {callee_name}")
    return Discovery(jit_functions, launched, direct)


def tables_by_kernel(modules) -> dict[str, list[tuple[str, str]]]:
    """kernel name -> [(module, table attribute)] over the given kernel modules."""
    from tritonmerge.backends.triton.specializations import launch_tables

    found: dict[str, list[tuple[str, str]]] = {}
    for module_name in sorted(set(modules)):
        for attr, table in launch_tables(importlib.import_module(module_name)).items():
            found.setdefault(table.name, []).append((module_name, attr))
    return found


def selected(table, full: bool = False) -> list[int]:
    """Indices of the entries to compile: every constexpr combination with every uniform input
    dtype, and every mixed base/expert dtype pair once, with combinations spread evenly over the
    table (``full``: every pair with every combination, about 3x the compile time). A mixed pair
    changes only which conversion each load does: all arithmetic is fp32 whatever the inputs."""
    if full:
        return list(range(len(table.specializations)))
    picks: list[int] = []
    mixed: dict[tuple, list[int]] = {}  # input dtypes -> entries, in table order
    for i, spec in enumerate(table.specializations):
        if spec.uniform_inputs:
            picks.append(i)
        else:
            mixed.setdefault(tuple(spec.inputs.items()), []).append(i)
    for n, entries in enumerate(mixed.values()):
        picks.append(entries[n * len(entries) // len(mixed)])
    return sorted(picks)


# ---------------------------------------------------------------------------------------------
# Triton


def _worker_setup(cache_dir: str) -> None:
    import warnings

    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def compile_triton(jobs: list[tuple[str, str, int, int]], workers: int = WORKERS) -> list[dict[str, Any]]:
    """Compile (module, table, index, arch) jobs in a spawned process pool (fresh imports: no
    kernel swapped for the interpreter by an earlier test in this process)."""
    from tritonmerge.backends.triton.specializations import compile_listed

    with tempfile.TemporaryDirectory(prefix="tritonmerge-aot-") as cache_dir:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_setup, initargs=(cache_dir,),
        ) as pool:
            return list(pool.map(compile_listed, *zip(*jobs), chunksize=8))


def _ptxas_version(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


# ---------------------------------------------------------------------------------------------
# CUDA extension

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str | None:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_nvcc_log(log: str, source: str) -> list[dict[str, Any]]:
    """One row per (entry function, arch) from ``nvcc -Xptxas -v`` output."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    current: tuple[str, str] | None = None
    arch_of_function: dict[str, str] = {}
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            arch_of_function[m.group(1)] = m.group(2)
            rows[current] = {"compiler": "nvcc", "source": source, "mangled": m.group(1), "arch": m.group(2)}
        elif m := _PROPERTIES.search(line):
            name = m.group(1)
            current = (name, arch_of_function.get(name, current[1] if current else "?"))
        elif current and current in rows and (m := _SPILLS.search(line)):
            rows[current].update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        elif current and current in rows and (m := _USED.search(line)):
            smem = _SMEM.search(m.group(2))
            rows[current].update(registers=int(m.group(1)), shared_bytes=int(smem.group(1)) if smem else 0)
    names = _demangle(sorted({r["mangled"] for r in rows.values()}))
    for row in rows.values():
        row["kernel"] = names[row["mangled"]]
    return list(rows.values())


def compile_cuda(nvcc: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, errors) for every csrc/*.cu: one nvcc run per file for all of CUDA_ARCHS."""
    from tritonmerge.backends.triton.specializations import judge_usage

    rows, errors = [], []
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    with tempfile.TemporaryDirectory(prefix="tritonmerge-nvcc-") as out:
        for source in sorted((ROOT / "csrc").glob("*.cu")):
            rel = str(source.relative_to(ROOT))
            start = time.perf_counter()
            result = subprocess.run(
                [nvcc, *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-c", rel, "-o", os.path.join(out, source.name + ".o")],
                cwd=ROOT, capture_output=True, text=True,
            )
            seconds = round(time.perf_counter() - start, 3)
            if result.returncode != 0:
                errors.append(f"{rel}: nvcc exit {result.returncode}\n{result.stderr[-4000:]}")
                rows.append({"compiler": "nvcc", "source": rel, "kernel": rel, "arch": ",".join(f"sm_{a}" for a in CUDA_ARCHS),
                             "ok": False, "error": result.stderr[-2000:], "compile_s": seconds})
                continue
            parsed = parse_nvcc_log(result.stdout + result.stderr, rel)
            if not parsed:
                errors.append(f"{rel}: no kernel in the ptxas -v output")
            for row in parsed:
                if "registers" not in row or "spill_store_bytes" not in row:
                    row.update(ok=False, error="no register/spill line in the ptxas log")
                else:
                    judge_usage(row, int(row["arch"][3:]))
                row["compile_s"] = seconds  # of the whole file, all architectures
            rows += parsed
    return rows, errors


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


# ---------------------------------------------------------------------------------------------
# the report


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for row in rows:
        key = f"{row.get('compiler', 'triton')} {row['arch']}"
        s = summary.setdefault(key, {"ok": 0, "failed": 0, "max_registers": 0, "spilling": 0, "max_shared_bytes": 0})
        s["ok" if row["ok"] else "failed"] += 1
        s["max_registers"] = max(s["max_registers"], row.get("registers", 0))
        s["max_shared_bytes"] = max(s["max_shared_bytes"], row.get("shared_bytes", 0))
        s["spilling"] += bool(row.get("spill_store_bytes") or row.get("spill_load_bytes"))
    return summary


def build_report(full: bool = False, workers: int = WORKERS) -> dict[str, Any]:
    """Discover, compile everything, and return the report (nothing is written)."""
    import torch
    import triton

    start = time.perf_counter()
    found = discover()
    tables = tables_by_kernel(found.jit_functions.values())
    problems = [f"direct launch of {d} (launch through its LaunchTable)" for d in found.direct_launches]
    problems += [f"{k} ({m}) is launched but has no LaunchTable" for k, m in sorted(found.launched.items()) if k not in tables]
    problems += [f"{k} has {len(v)} LaunchTables: {v}" for k, v in sorted(tables.items()) if len(v) > 1]
    unique = {k: v[0] for k, v in sorted(tables.items()) if len(v) == 1}
    jobs = []
    for module, attr in unique.values():
        table = getattr(importlib.import_module(module), attr)
        jobs += [(module, attr, i, arch) for arch in TRITON_ARCHS for i in selected(table, full)]
    triton_start = time.perf_counter()
    rows = [dict(compiler="triton", **r) for r in compile_triton(jobs, workers)] if jobs else []
    triton_s = time.perf_counter() - triton_start

    nvcc = find_nvcc()
    cuda_rows, cuda_errors, cuda_s = [], [], 0.0
    if nvcc:
        cuda_start = time.perf_counter()
        cuda_rows, cuda_errors = compile_cuda(nvcc)
        cuda_s = time.perf_counter() - cuda_start
    return {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_version": triton.__version__,
        "torch_version": torch.__version__,
        "nvcc_version": nvcc_version(nvcc) if nvcc else None,
        "ptxas_versions": {f"sm_{a}": _ptxas_version(a) for a in TRITON_ARCHS},
        "triton_archs": [f"sm_{a}" for a in TRITON_ARCHS],
        "cuda_archs": [f"sm_{a}" for a in CUDA_ARCHS] if nvcc else [],
        "cuda_skipped": None if nvcc else "nvcc not found (NVCC, PATH, /usr/local/cuda/bin)",
        "coverage": "full" if full else (
            "every constexpr combination of every LaunchTable x every uniform input dtype, plus every "
            "mixed base/expert dtype pair once; pointers 16-byte aligned, integer arguments i32"
        ),
        "kernels": {k: {"module": m, "table": a, "listed": len(getattr(importlib.import_module(m), a).specializations),
                        "compiled_per_arch": len(selected(getattr(importlib.import_module(m), a), full))}
                    for k, (m, a) in unique.items()},
        "helpers": sorted(set(found.jit_functions) - set(found.launched)),
        "discovery_problems": problems,
        "cuda_errors": cuda_errors,
        "seconds": {"total": round(time.perf_counter() - start, 1), "triton": round(triton_s, 1), "nvcc": round(cuda_s, 1)},
        "workers": workers,
        "summary": _summary(rows + cuda_rows),
        "rows": rows + cuda_rows,
    }


def write_report(report: dict[str, Any], out: Path = DEFAULT_OUT) -> None:
    """JSON with one row per line, so that a change of one kernel is a one-line diff."""
    head = {k: v for k, v in report.items() if k != "rows"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n'
    text += ",\n".join("  " + json.dumps(row, sort_keys=True) for row in report["rows"])
    text += "\n ]\n}\n"
    json.loads(text)  # the hand-joined text must stay valid JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def failures(report: dict[str, Any]) -> list[str]:
    """Everything that makes the report fail: discovery problems, nvcc errors, bad rows."""
    bad = [f"{r.get('compiler')} {r['kernel']} {r['arch']} {r.get('specialization', '')}: {r.get('error')}"
           for r in report["rows"] if not r["ok"]]
    return list(report["discovery_problems"]) + list(report["cuda_errors"]) + bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every mixed dtype pair with every combination")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)
    report = build_report(full=args.full, workers=args.workers)
    write_report(report, args.out)
    for key, s in report["summary"].items():
        print(f"{key}: {s}")
    bad = failures(report)
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    print(f"{len(report['rows'])} rows in {report['seconds']['total']} s -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
