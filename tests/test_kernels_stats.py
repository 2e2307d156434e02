"""backends/triton/stats.py against ops/stats.py's float64 reference (on the CPU through TRITON_INTERPRET=1).

The moments are sums, so their rounding error scales with Σ|x|ᵖ, not with the (possibly
cancelling) result: the floor below is relative to Σ|x|ᵖ, the "magnitude" of each column."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tritonmerge.ops.select import HIGH_BINS
from tritonmerge.ops.stats import task_vector_stats_reference
from tritonmerge.testing import FLOORS, make_inputs, make_tied_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POWERS = {1: 1, 2: 2, 3: 1, 5: 3, 6: 4}  # stats column -> power p of its terms (Σx, Σx², Σ|x|, Σx³, Σx⁴)




def _check_stats(got: torch.Tensor, base: torch.Tensor, experts: list[torch.Tensor]) -> None:
    golden = task_vector_stats_reference(base.double(), [e.double() for e in experts])
    # the same statistics of τ rounded to fp32 (what any fp32 implementation starts from)
    taus32 = [(e.float() - base.float()).double() for e in experts]
    ref_lowp = task_vector_stats_reference(torch.zeros_like(taus32[0]), taus32)
    assert torch.equal(got[:, 0], golden[:, 0])
    assert torch.equal(got[:, 4], ref_lowp[:, 4]), "max|x| is exact from fp32 τ"
    for col, p in POWERS.items():
        magnitude = torch.stack([t.abs().pow(p).sum() for t in taus32])
        budget = 2 * (ref_lowp[:, col] - golden[:, col]).abs() + FLOORS[torch.float32] * magnitude + 1e-30
        err = (got[:, col] - golden[:, col]).abs()
        assert bool((err <= budget).all()), f"column {col}: error {err.tolist()} > budget {budget.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,n", [((37, 53), 1), ((37, 53), 3), ((4099,), 2), ((1,), 3), ((7, 5, 3), 8)])
def test_stats_match_reference(device, dtype, shape, n):
    from tritonmerge.backends.triton.stats import task_stats_triton

    base, experts = make_inputs(shape, n, dtype, seed=n, device=device)
    got, hist = task_stats_triton(base, experts, histogram=True)
    _check_stats(got, base.cpu(), [e.cpu() for e in experts])
    bits = [(e.float() - base.float()).abs().flatten().view(torch.int32) >> 16 for e in experts]
    expected = torch.stack([torch.bincount(b, minlength=HIGH_BINS) for b in bits])
    assert torch.equal(hist.cpu(), expected.cpu())


def test_stats_non_contiguous_empty_and_tied(device):
    from tritonmerge.backends.triton.stats import task_stats_triton

    base, experts = make_tied_inputs((53, 37), 3, torch.bfloat16, device=device)
    views = [t.t() for t in [base, *experts]]
    got, _ = task_stats_triton(views[0], views[1:])
    _check_stats(got, views[0].cpu(), [v.cpu() for v in views[1:]])
    empty, _ = task_stats_triton(torch.zeros(0, device=device), [torch.zeros(0, device=device)] * 2)
    assert torch.equal(empty, torch.zeros(2, 7, dtype=torch.float64))


@pytest.mark.gpu
def test_stats_full_size_gpu():
    from tritonmerge.backends.triton.stats import task_stats_triton

    base, experts = make_inputs((4096, 4099), 8, torch.bfloat16, device="cuda")
    got, _ = task_stats_triton(base, experts)
    _check_stats(got, base.cpu(), [e.cpu() for e in experts])
