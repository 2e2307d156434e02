"""The project's one tolerance rule, input factories and the Triton-interpreter switch for tests.

Error budget (flash-attention's rule, docs/algorithms.md §5): with ``golden`` the reference computed in
float64 and ``ref_lowp`` the same reference run in the test dtype,

    max|out − golden| ≤ 2 · max|ref_lowp − golden| + floor[dtype] · max|golden|

Floors are relative to the magnitude of the result: fp32 1e-6, bf16 2⁻⁸ (one ulp), fp16 2⁻¹¹.
A kernel that accumulates in fp32 usually beats ``ref_lowp``; the rule lets it. NaN/Inf must
appear in exactly the same places as in ``golden``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Iterator, Sequence

import torch

FLOORS = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 1e-12}
KERNEL_MODULES = ("tritonmerge.backends.triton.stats", "tritonmerge.backends.triton.select", "tritonmerge.backends.triton.fused_merge")


def error_budget(golden: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest max-abs error allowed for a result in ``dtype`` (see the module docstring)."""
    g = golden.detach().to(device="cpu", dtype=torch.float64)
    r = ref_lowp.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(g) & torch.isfinite(r)
    scale = float(g[finite].abs().max()) if bool(finite.any()) else 0.0
    ref_err = float((r[finite] - g[finite]).abs().max()) if bool(finite.any()) else 0.0
    return 2.0 * ref_err + FLOORS[dtype] * scale


def assert_close_budget(
    out: torch.Tensor, golden: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype, *, what: str = "output"
) -> None:
    """Assert ``out`` is within the error budget of ``golden``; the message gives the number of
    elements over budget, the first few flat indices with their values, and NaN/Inf mismatches."""
    if out.shape != golden.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != golden {tuple(golden.shape)}")
    o = out.detach().to(device="cpu", dtype=torch.float64).flatten()
    g = golden.detach().to(device="cpu", dtype=torch.float64).flatten()
    nonfinite_xor = torch.isfinite(o) ^ torch.isfinite(g)
    if bool(nonfinite_xor.any()):
        idx = torch.nonzero(nonfinite_xor).flatten()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(nonfinite_xor.sum())} elements are NaN/Inf in only one of out/golden, "
            f"first at flat indices {idx}: out={[o[i].item() for i in idx]}, golden={[g[i].item() for i in idx]}"
        )
    finite = torch.isfinite(g)
    budget = error_budget(golden, ref_lowp, dtype)
    err = (o[finite] - g[finite]).abs()
    if err.numel() == 0 or float(err.max()) <= budget:
        return
    bad = torch.nonzero(finite).flatten()[torch.nonzero(err > budget).flatten()]
    idx = bad[:5].tolist()
    rms = float(err.pow(2).mean().sqrt() / g[finite].pow(2).mean().sqrt().clamp_min(1e-300))
    raise AssertionError(
        f"{what} ({dtype}): {bad.numel()} of {o.numel()} elements exceed the error budget {budget:.3e} "
        f"(max error {float(err.max()):.3e}, relative RMS {rms:.2e}); first at flat indices {idx}: "
        f"out={[o[i].item() for i in idx]}, golden={[g[i].item() for i in idx]}"
    )


def make_inputs(
    shape: Sequence[int] | int,
    n_experts: int,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, [experts]) with base ~ N(0, 1) and expertᵢ = base + scale·N(0, 1), rounded to
    ``dtype``; depends only on the arguments. Continuous values: exact ties in |τ| are rare."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    experts = [base + scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n_experts)]
    return base.to(device=device, dtype=dtype), [e.to(device=device, dtype=dtype) for e in experts]


def make_tied_inputs(
    shape: Sequence[int] | int,
    n_experts: int,
    dtype: torch.dtype = torch.float32,
    *,
    levels: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, [experts]) whose task vectors take only ``levels`` magnitudes (multiples of 1/8,
    exact in every dtype, signs random): most entries tie, which is where top-k rules differ."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-16, 17, shape, generator=gen).double() / 8
    experts = []
    for _ in range(n_experts):
        magnitude = torch.randint(1, levels + 1, shape, generator=gen).double() / 8
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        experts.append(base + magnitude * sign)
    return base.to(device=device, dtype=dtype), [e.to(device=device, dtype=dtype) for e in experts]


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors (``TRITON_INTERPRET=1``) inside this block only.

    ``triton.jit`` decides at decoration time whether a function is interpreted. So: kernel
    modules imported as compiled kernels are re-imported here, and if ``triton.language`` itself
    was imported before the variable was set (its ``tl.sum``, ``tl.cumsum``... are then compiled
    functions the interpreter cannot call) they are swapped for interpreted ones until the block
    ends. ``backends.triton_status`` is cached, so its cache is cleared on entry and exit: the
    setting does not leak into other tests' backend choice."""
    from .backends import status as backends

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    backends.triton_status.cache_clear()
    swapped: list[tuple[object, str, object]] = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        interpreted: dict[int, object] = {}
        for name, module in list(sys.modules.items()):
            if not name.startswith("triton.language") or module is None:
                continue
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    if id(value) not in interpreted:
                        interpreted[id(value)] = InterpretedFunction(value.fn)
                    swapped.append((module, attr, value))
                    setattr(module, attr, interpreted[id(value)])
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is not None and any(isinstance(v, JITFunction) for v in vars(module).values()):
                importlib.reload(module)
            importlib.import_module(name)
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        backends.triton_status.cache_clear()
