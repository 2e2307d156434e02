"""The compiled variants ("specialisations") each Triton kernel of this package can be launched with.

Triton compiles a kernel once per combination of its constexpr arguments and of the element types
of its pointer arguments. Every launched kernel has a ``LaunchTable`` next to its launcher, built
from that module's own mode constants, and the launcher launches through it: ``table.launch``
refuses a combination that is not listed. So the table is exactly what the dispatch code can
produce, and tests/test_aot_compile.py compiles every entry for the GPU architectures the project
supports (on a machine without a GPU; see ``compile_specialization``).

Value specialisations that Triton adds at run time (an integer argument equal to 1 or divisible
by 16, i64 instead of i32 for values of 2**31 and above, pointer alignment) are not enumerated:
the ahead-of-time compile uses 16-byte-aligned pointers and i32 integers, the common case.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

# The inputs' dtypes the fused merge takes (backends/triton/merge.KERNEL_DTYPES), and the wider set the
# selection and statistics kernels read (float64 magnitudes are converted in registers).
MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
READ_DTYPES = (*MERGE_DTYPES, torch.float64)

TRITON_TYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}


class UnlistedSpecialization(ValueError):
    """A launch asked for a constexpr/dtype combination its kernel's LaunchTable does not list."""


@dataclass(frozen=True)
class Specialization:
    """One compiled variant: constexpr values, and the element type of every pointer argument.
    ``inputs`` names the dtypes that vary with the caller's tensors (the report's label)."""

    constexprs: Mapping[str, Any]
    pointer_dtypes: Mapping[str, torch.dtype]
    inputs: Mapping[str, torch.dtype]

    @property
    def uniform_inputs(self) -> bool:
        return len(set(self.inputs.values())) == 1

    def label(self) -> str:
        flags = ",".join(f"{k}={_constexpr_text(v)}" for k, v in self.constexprs.items())
        if self.uniform_inputs:
            dtypes = TRITON_TYPE_NAMES[next(iter(self.inputs.values()))]
        else:
            dtypes = ",".join(f"{role}={TRITON_TYPE_NAMES[d]}" for role, d in self.inputs.items())
        return f"{dtypes}[{flags}]"


def _constexpr_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


@dataclass
class LaunchTable:
    """The specialisations one kernel is launched with, and the launch options they share.

    ``scalar_types``: Triton types of the non-pointer, non-constexpr arguments (for the
    ahead-of-time signature). ``flag_names``: the constexprs that distinguish specialisations."""

    kernel: Any
    scalar_types: Mapping[str, str]
    specializations: Sequence[Specialization]
    options: Mapping[str, Any] = field(default_factory=dict)
    _keys: frozenset = field(init=False, repr=False)
    _pointer_positions: tuple[int, ...] = field(init=False, repr=False)
    _constexpr_names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Triton contracts a·b + c into one FMA unless told not to; the torch references round
        # every product and every sum, so the kernels ask for an FMA where they want one (tl.fma)
        self.options = {"enable_fp_fusion": False, **self.options}
        names = list(self.kernel.arg_names)
        first = self.specializations[0]
        self._constexpr_names = tuple(first.constexprs)
        self._pointer_positions = tuple(names.index(a) for a in first.pointer_dtypes)
        listed = set(first.constexprs) | set(first.pointer_dtypes) | set(self.scalar_types)
        if listed != set(names) or len(listed) != len(names):
            raise ValueError(
                f"{self.name}: the table names arguments {sorted(listed)}, the kernel has {names}"
            )
        self._keys = frozenset(self._key_of(s) for s in self.specializations)

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__

    def _key_of(self, spec: Specialization) -> tuple:
        names = self.kernel.arg_names
        return (
            tuple(spec.pointer_dtypes[names[p]] for p in self._pointer_positions),
            tuple(spec.constexprs[c] for c in self._constexpr_names),
        )

    def launch(self, grid, *args, **constexprs) -> None:
        """``kernel[grid](*args, **constexprs, **options)`` after checking that the pointer
        arguments' dtypes and the constexprs form a listed specialisation (a set lookup)."""
        try:
            key = (
                tuple(args[p].dtype for p in self._pointer_positions),
                tuple(constexprs[c] for c in self._constexpr_names),
            )
        except (KeyError, IndexError, AttributeError) as exc:
            raise UnlistedSpecialization(f"{self.name}: launch arguments do not match its table ({exc!r})") from exc
        if key not in self._keys or len(constexprs) != len(self._constexpr_names):
            dtypes = dict(zip((self.kernel.arg_names[p] for p in self._pointer_positions), key[0]))
            raise UnlistedSpecialization(
                f"{self.name}: constexprs {constexprs} with pointer dtypes {dtypes} are not in its LaunchTable; "
                "add them to the table next to the launcher so that tests/test_aot_compile.py compiles them"
            )
        self.kernel[grid](*args, **constexprs, **self.options)

    def signature(self, spec: Specialization) -> dict[str, str]:
        """The ahead-of-time ``triton.compile`` signature of a specialisation."""
        sig = {}
        for name in self.kernel.arg_names:
            if name in spec.constexprs:
                sig[name] = "constexpr"
            elif name in spec.pointer_dtypes:
                sig[name] = "*" + TRITON_TYPE_NAMES[spec.pointer_dtypes[name]]
            else:
                sig[name] = self.scalar_types[name]
        return sig


def specializations(
    flag_sets: Iterable[Mapping[str, Any]],
    input_sets: Iterable[Mapping[str, torch.dtype]],
    pointer_dtypes,
) -> list[Specialization]:
    """Every (flags, inputs) pair; ``pointer_dtypes(flags, inputs)`` gives the pointer arguments'
    dtypes (it may depend on the flags: a launcher passes a stand-in tensor for an unused one)."""
    input_sets = list(input_sets)
    return [
        Specialization(dict(flags), dict(pointer_dtypes(flags, inputs)), dict(inputs))
        for flags, inputs in itertools.product(flag_sets, input_sets)
    ]


def input_dtype_sets(roles: Sequence[str], dtypes: Sequence[torch.dtype]) -> list[dict[str, torch.dtype]]:
    """Each role (e.g. base, experts) independently in ``dtypes``: uniform sets first."""
    sets = [dict(zip(roles, combo)) for combo in itertools.product(dtypes, repeat=len(roles))]
    return sorted(sets, key=lambda s: len(set(s.values())) > 1)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed: Triton and its bundled ptxas run on the CPU)

ARCH_LIMITS = {  # per block: opt-in shared memory (bytes); registers per thread
    80: {"shared_bytes": 163 * 1024, "registers": 255},
    90: {"shared_bytes": 227 * 1024, "registers": 255},
    100: {"shared_bytes": 227 * 1024, "registers": 255},
}

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame, spill stores/loads and static shared memory from ``ptxas -v``
    output for a single entry function."""
    used, spills, smem = _PTXAS_USED.search(log), _PTXAS_SPILLS.search(log), _PTXAS_SMEM.search(log)
    if used is None or spills is None:
        raise ValueError(f"no register/spill line in the ptxas log:\n{log}")
    return {
        "registers": int(used.group(1)),
        "stack_bytes": int(spills.group(1)),
        "spill_store_bytes": int(spills.group(2)),
        "spill_load_bytes": int(spills.group(3)),
        "static_shared_bytes": int(smem.group(1)) if smem else 0,
    }


def compile_specialization(table: LaunchTable, spec: Specialization, arch: int) -> dict[str, Any]:
    """Compile one specialisation for ``sm_<arch>`` with ``triton.compile`` and return its report
    row (``ok``, registers, shared memory, spills; ``error`` when it failed). The register and
    spill counts come from the log of the very ptxas run that produced the cubin."""
    import contextlib
    import io
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = table.kernel
    names = list(kernel.arg_names)
    # torch allocations are 16-byte aligned: the launches see the same divisibility hint
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.pointer_dtypes}
    row: dict[str, Any] = {
        "kernel": table.name,
        "arch": f"sm_{arch}",
        "specialization": spec.label(),
        "constexprs": {k: _constexpr_text(v) for k, v in spec.constexprs.items()},
        "inputs": {role: TRITON_TYPE_NAMES[d] for role, d in spec.inputs.items()},
        "num_warps": table.options.get("num_warps", 4),
        "triton_version": triton.__version__,
    }
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # a cached kernel would skip ptxas and its log: compile every time
        with knobs.compilation.scope(), knobs.nvidia.scope():
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    ASTSource(kernel, table.signature(spec), dict(spec.constexprs), attrs),
                    target=GPUTarget("cuda", arch, 32),
                    options=dict(table.options),
                )
        usage = parse_ptxas_log(log.getvalue())
    except Exception as exc:  # the report row records it; the test fails on it
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:4000])
        row["compile_s"] = round(time.perf_counter() - start, 3)
        return row
    row.update(usage)
    # fused multiply-adds in the PTX: only where a kernel asks for one (tl.fma); see LaunchTable
    row["fma_f32"] = compiled.asm["ptx"].count("fma.rn.f32")
    row["shared_bytes"] = int(compiled.metadata.shared) + usage["static_shared_bytes"]
    row["compile_s"] = round(time.perf_counter() - start, 3)
    judge_usage(row, arch)
    return row


def judge_usage(row: dict[str, Any], arch: int) -> None:
    """Set ``ok`` (and ``error``) on a report row from its registers, spills and shared memory:
    no spills, and within ``ARCH_LIMITS`` of the architecture."""
    limits = ARCH_LIMITS[arch]
    problems = []
    if row["spill_store_bytes"] or row["spill_load_bytes"]:
        problems.append(f"spills {row['spill_store_bytes']} B stores / {row['spill_load_bytes']} B loads")
    if row["shared_bytes"] > limits["shared_bytes"]:
        problems.append(f"shared memory {row['shared_bytes']} B > {limits['shared_bytes']} B")
    if row["registers"] > limits["registers"]:
        problems.append(f"{row['registers']} registers > {limits['registers']}")
    row["ok"] = not problems
    if problems:
        row["error"] = "; ".join(problems)


def launch_tables(module) -> dict[str, LaunchTable]:
    """The module's LaunchTables by attribute name."""
    return {name: value for name, value in vars(module).items() if isinstance(value, LaunchTable)}


def compile_listed(module_name: str, table_name: str, index: int, arch: int) -> dict[str, Any]:
    """``compile_specialization`` of one table entry named by strings, for a process pool whose
    workers import the kernel modules themselves."""
    import importlib

    table = getattr(importlib.import_module(module_name), table_name)
    row = compile_specialization(table, table.specializations[index], arch)
    row["module"] = module_name
    return row
