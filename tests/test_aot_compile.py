"""Ahead-of-time compilation of every Triton kernel specialisation (sm_80, sm_90, sm_100) and of
the CUDA extension (sm_80, sm_90), on a machine without a GPU: tools/aot_report.py.

The kernels are found by reading tritonmerge/backends/triton/ (a new launched kernel without a
LaunchTable fails here); the specialisations come from the LaunchTables the launchers launch
through. Writes benchmarks/results/triton_aot.json; fails on any compile error, spill, or shared
memory / register use beyond the architecture's limit. Takes a few minutes on 2 cores."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("tools.aot_report", ROOT / "tools" / "aot_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tools.aot_report", module)
    spec.loader.exec_module(module)
    return module


aot_report = _load_tool()


def test_aot_discovery_finds_kernels_and_helpers():
    found = aot_report.discover()
    assert found.jit_functions, "no @triton.jit function under tritonmerge/backends/triton/"
    assert found.direct_launches == [], "launch these through their LaunchTable"
    # helpers are called only from kernels; the kernels need tables
    assert "_uniform" in set(found.jit_functions) - set(found.launched)
    assert "_fused_merge_kernel" in found.launched
    tables = aot_report.tables_by_kernel(found.jit_functions.values())
    missing = sorted(set(found.launched) - set(tables))
    assert missing == [], f"launched kernels without a LaunchTable: {missing}"


def test_aot_discovery_flags_an_untabled_kernel(tmp_path, monkeypatch):
    kernels = tmp_path / "tritonmerge" / "backends" / "triton"
    kernels.mkdir(parents=True)
    (kernels / "new.py").write_text(
        "import triton\n\n@triton.jit\ndef _helper(x):\n    return x\n\n"
        "@triton.jit\ndef _new_kernel(p):\n    _helper(p)\n\n"
        "def launch(t):\n    _new_kernel[(1,)](t)\n"
    )
    monkeypatch.setattr(aot_report, "ROOT", tmp_path)
    monkeypatch.setattr(aot_report, "KERNELS_DIR", kernels)
    monkeypatch.setattr(aot_report, "PACKAGE_DIR", tmp_path / "tritonmerge")
    found = aot_report.discover()
    assert found.launched == {"_new_kernel": "tritonmerge.backends.triton.new"}
    assert found.direct_launches == ["tritonmerge/backends/triton/new.py:12 _new_kernel"]


def test_aot_launch_refuses_an_unlisted_specialization():
    from tritonmerge.backends.triton import fused_merge as K
    from tritonmerge.backends.triton.specializations import UnlistedSpecialization

    x = torch.zeros(4)
    with pytest.raises(UnlistedSpecialization, match="not in its LaunchTable"):
        K.fused_merge_triton(x, [x], weights=[1.0], divide=K.DIVIDE_COUNT)  # a count needs an election
    with pytest.raises(UnlistedSpecialization):
        K.fused_merge_triton(x, [x], weights=[1.0], out_dtype=torch.float16)


def test_kernels_contract_no_product_into_an_fma_unless_asked():
    """Triton fuses a·b + c into one FMA by default; the references round twice, so a contracted
    kernel would be an ulp off them on a GPU (the interpreter never contracts: only the PTX shows
    it). linear asks for its FMA with tl.fma; task arithmetic's b + λ·Σwτ must stay unfused."""
    from tritonmerge.backends.triton import fused_merge as K
    from tritonmerge.backends.triton.specializations import compile_specialization

    table = K.FUSED_MERGE_LAUNCHES

    def first(**flags):
        return next(
            s for s in table.specializations
            if all(s.constexprs[k] == v for k, v in flags.items()) and set(s.inputs.values()) == {torch.float32}
        )

    common = dict(SPARSIFY=K.SPARSIFY_NONE, ELECT=K.ELECT_NONE, DIVIDE=K.DIVIDE_NONE)
    arithmetic = compile_specialization(table, first(HAS_BASE=True, **common), 90)
    linear = compile_specialization(table, first(HAS_BASE=False, **common), 90)
    assert arithmetic["ok"] and linear["ok"], (arithmetic.get("error"), linear.get("error"))
    assert arithmetic["fma_f32"] == 0
    assert linear["fma_f32"] > 0


def test_aot_ptxas_log_parsing():
    from tritonmerge.backends.triton.specializations import parse_ptxas_log

    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 2048 bytes smem, 8 bytes cumulative stack size\n"
    )
    assert parse_ptxas_log(log) == {
        "registers": 128, "stack_bytes": 8, "spill_store_bytes": 4, "spill_load_bytes": 4, "static_shared_bytes": 2048,
    }
    nvcc_log = (
        "ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z6kernelPf\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 30 registers, used 0 barriers, 384 bytes cmem[0]\n"
    )
    [row] = aot_report.parse_nvcc_log(nvcc_log, "csrc/x.cu")
    assert (row["arch"], row["registers"], row["spill_store_bytes"], row["shared_bytes"]) == ("sm_80", 30, 0, 0)
    assert row["kernel"] in ("kernel(float*)", "_Z6kernelPf")  # mangled where no c++filt is installed


def test_aot_compile_every_specialization():
    report = aot_report.build_report()
    aot_report.write_report(report)
    bad = aot_report.failures(report)
    assert not bad, f"{len(bad)} failing rows (see {aot_report.DEFAULT_OUT}):\n" + "\n".join(bad[:40])
    triton_rows = [r for r in report["rows"] if r["compiler"] == "triton"]
    assert {r["arch"] for r in triton_rows} == {f"sm_{a}" for a in aot_report.TRITON_ARCHS}
    assert {r["kernel"] for r in triton_rows} == set(report["kernels"])
    if report["cuda_skipped"]:
        pytest.skip(f"Triton kernels compiled and reported; CUDA extension not checked: {report['cuda_skipped']}")
    assert {r["arch"] for r in report["rows"] if r["compiler"] == "nvcc"} == {f"sm_{a}" for a in aot_report.CUDA_ARCHS}
