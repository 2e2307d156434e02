"""backends/triton/select.py against ops/select.py: exact thresholds, exact kept counts, the same tie rule
(lowest flat index wins) and model-wide thresholds. Run on the CPU through TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tritonmerge.ops import select as ref
from tritonmerge.testing import make_inputs, make_tied_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]




def _ks(numel: int, n: int) -> list[int]:
    """A different k per expert, including the edges 0, 1, n − 1 and n."""
    choices = [1, numel // 5, numel // 2, numel - 1, numel, 0, 3, numel // 3]
    return [choices[i % len(choices)] for i in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
@pytest.mark.parametrize("shape,n", [((37, 53), 1), ((37, 53), 3), ((4099,), 2), ((7, 5, 3), 8)])
def test_topk_masks_match_reference(device, dtype, tied, shape, n):
    from tritonmerge.backends.triton.select import topk_masks_triton, topk_spec_triton

    make = make_tied_inputs if tied else make_inputs
    base, experts = make(shape, n, dtype, seed=n, device=device)
    numel = base.numel()
    ks = _ks(numel, n)
    spec = topk_spec_triton(base, experts, ks)
    masks = topk_masks_triton(base, experts, spec)
    for i, (e, k) in enumerate(zip(experts, ks)):
        magnitude = (e.float() - base.float()).abs().cpu()
        expected = ref.topk_mask(magnitude, k)
        assert int(masks[i].sum()) == min(max(k, 0), numel) == spec.kept[i]
        assert torch.equal(masks[i].cpu(), expected), f"expert {i}, k={k}"
        assert torch.equal(expected, ref.topk_mask_sorted(magnitude, k))
        if 1 <= k < numel:  # (k >= n is stored as "keep all": threshold 0)
            assert spec.threshold[i] == ref.kth_largest(magnitude, k)


def test_magnitude_entry_points(device):
    from tritonmerge.backends.triton.select import kth_largest_triton, topk_mask_triton

    gen = torch.Generator().manual_seed(3)
    magnitude = (torch.randint(0, 5, (61, 17), generator=gen).float() / 4).to(device)
    for k in (1, 7, 500, magnitude.numel()):
        assert kth_largest_triton(magnitude, k) == ref.kth_largest(magnitude.cpu(), k)
        assert torch.equal(topk_mask_triton(magnitude, k).cpu(), ref.topk_mask(magnitude.cpu(), k))
    with pytest.raises(ValueError, match="out of range"):
        kth_largest_triton(magnitude, 0)


def test_stats_histogram_feeds_the_selection(device):
    from tritonmerge.backends.triton.select import topk_spec_triton
    from tritonmerge.backends.triton.stats import task_stats_triton

    base, experts = make_inputs((37, 53), 3, torch.bfloat16, device=device)
    _, hist = task_stats_triton(base, experts, histogram=True)
    ks = [5, 400, 1000]
    assert topk_spec_triton(base, experts, ks, high_hist=hist) == topk_spec_triton(base, experts, ks)


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_model_thresholds_match_reference(device, tied):
    from tritonmerge.backends.triton.select import model_thresholds_triton

    make = make_tied_inputs if tied else make_inputs
    shapes = [(37, 53), (129,), (5, 7, 3)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [make(s, 3, dt, seed=j, device=device) for j, (s, dt) in enumerate(zip(shapes, dtypes))]
    total = sum(t[0].numel() for t in tensors)
    counts = [1, total // 5, total]

    def magnitudes():
        for base, experts in tensors:
            yield [(e.float() - base.float()).abs() for e in experts]

    def pairs():
        yield from tensors

    expected = ref.model_thresholds(lambda: ([m.cpu() for m in ms] for ms in magnitudes()), counts)
    assert model_thresholds_triton(magnitudes, counts) == expected
    assert model_thresholds_triton(pairs, counts, with_base=True) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_topk_full_size_gpu(tied):
    from tritonmerge.backends.triton.select import topk_masks_triton, topk_spec_triton

    make = make_tied_inputs if tied else make_inputs
    base, experts = make((4096, 4099), 3, torch.bfloat16, device="cuda")
    ks = [int(0.2 * base.numel()), 1, base.numel() // 2]
    spec = topk_spec_triton(base, experts, ks)
    masks = topk_masks_triton(base, experts, spec)
    for i, (e, k) in enumerate(zip(experts, ks)):
        expected = ref.topk_mask((e.float() - base.float()).abs(), k)
        assert int(masks[i].sum()) == k
        assert torch.equal(masks[i], expected)
