"""WUDI: the reformulated solver against the official recipe, the exact solver, batching,
tensor selection and edge cases (zero / identical task vectors). GPU tests compare the fused
CUDA Adam kernel with the torch loop."""

from __future__ import annotations

import pytest
import torch

import tritonmerge
from tritonmerge import MergeReport, backends, merge_state_dicts, merge_tensors
from tritonmerge.context import TensorContext, TensorDecisions
from tritonmerge.errors import ParameterError
from tritonmerge.ops import wudi_solve as W

STEPS, LR = 300, 1e-5


def task_vectors(T: int, m: int, n: int, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """T task vectors ~1e-3 with a shared component, like fine-tunes of one model."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, m, n, generator=g, dtype=torch.float64) * 5e-4
    return (torch.randn(T, m, n, generator=g, dtype=torch.float64) * 1e-3 + shared).to(dtype)


SHAPES = [(48, 32), (24, 96), (40, 40)]  # m > n, m < n (2m < n: m×m route for B), square


@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reformulated_adam_matches_autograd_official_float32(shape, T):
    tv = task_vectors(T, *shape, seed=T)
    ref, history = W.official_wudi_autograd(tv, steps=STEPS, lr=LR)
    merged, losses = W.wudi_solve_batched(tv.unsqueeze(0), steps=STEPS, lr=LR)
    moved = (ref - tv.sum(0)).abs().max().item()
    assert moved > 1e-3  # the iterates really travelled (~steps·lr), so the comparison means something
    # summation order differs, so not bit-identical; observed ≤ 1e-8 against a ~3e-3 displacement
    torch.testing.assert_close(merged[0], ref, rtol=0, atol=5e-8)
    assert losses.init[0] == pytest.approx(history[0], rel=1e-5)
    assert losses.final[0] == pytest.approx(W.wudi_loss_direct(tv, ref), rel=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reformulated_adam_matches_autograd_official_float64(shape):
    # in float64 the only difference left is rounding at 1e-16: any slip in the gradient (a
    # missing factor 2 changes how ε=1e-8 enters) or in Adam's arithmetic shows up far above it
    tv = task_vectors(4, *shape, seed=1, dtype=torch.float64)
    ref, _ = W.official_wudi_autograd(tv, steps=STEPS, lr=LR)
    merged, _ = W.wudi_solve_batched(tv.unsqueeze(0), steps=STEPS, lr=LR, dtype=torch.float64)
    torch.testing.assert_close(merged[0], ref, rtol=0, atol=1e-13)


def test_gradient_formula_matches_autograd_float64():
    tv = task_vectors(5, 13, 9, seed=3, dtype=torch.float64)
    tau = (tv.sum(0) + 1e-3 * torch.randn(13, 9, dtype=torch.float64)).requires_grad_(True)
    sq = (tv**2).sum(dim=(1, 2))
    loss = sum(torch.sum(((tau - tv[i]) @ tv[i].T) ** 2) / sq[i] for i in range(5))
    (grad_auto,) = torch.autograd.grad(loss, tau)
    problem = W.precompute(tv.unsqueeze(0), orientation="gram")
    grad = 2 * (problem.product(tau.detach().unsqueeze(0)) - problem.B)
    torch.testing.assert_close(grad[0], grad_auto, rtol=1e-10, atol=0)
    assert problem.loss(tau.detach().unsqueeze(0))[0].item() == pytest.approx(loss.item(), rel=1e-10)


@pytest.mark.parametrize("m,n,T", [(6, 40, 2), (30, 20, 4), (8, 64, 3)])
def test_gram_and_factored_products_agree(m, n, T):
    tv = task_vectors(T, m, n, seed=4, dtype=torch.float64)
    tau = torch.randn(1, m, n, dtype=torch.float64)
    gram = W.precompute(tv.unsqueeze(0), orientation="gram")
    fact = W.precompute(tv.unsqueeze(0), orientation="factored")
    torch.testing.assert_close(fact.product(tau), gram.product(tau), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fact.B, gram.B)
    torch.testing.assert_close(fact.const, gram.const)
    assert W.choose_orientation(m, n, T) == ("factored" if 2 * T * m < n else "gram")


@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES + [(8, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_exact_solver_reaches_a_loss_no_higher_than_adam(shape, T):
    tv = task_vectors(T, *shape, seed=10 + T)
    _, adam = W.wudi_solve_batched(tv.unsqueeze(0), steps=STEPS, lr=LR)
    exact, losses = W.wudi_solve_batched(tv.unsqueeze(0), solver="exact")
    direct = W.wudi_loss_direct(tv, exact[0])
    assert direct <= W.wudi_loss_direct(tv, tv.sum(0))
    # the quadratic-form loss is accurate to ~1e-7 of tr(τGτᵀ)+c; compare through the direct one
    assert direct <= adam.final[0] * (1 + 1e-4) + 1e-9
    assert losses.final[0] == pytest.approx(direct, rel=1e-3, abs=1e-9)


def test_exact_solver_is_stationary_and_falls_back_to_lstsq():
    tv = task_vectors(3, 10, 12, seed=5, dtype=torch.float64)
    problem = W.precompute(tv.unsqueeze(0), need_gram=True)
    tau, _ = W.exact_solve(problem, ridge=1e-12)
    grad = 2 * (problem.product(tau) - problem.B)
    assert grad.abs().max() < 1e-9 * problem.B.abs().max()
    # an exactly singular G (a column no task touches) with no ridge: Cholesky fails -> lstsq
    tv[:, :, -1] = 0
    problem = W.precompute(tv.unsqueeze(0), need_gram=True)
    assert int(torch.linalg.cholesky_ex(problem.G)[1][0]) != 0
    tau, _ = W.exact_solve(problem, ridge=0.0)
    assert torch.isfinite(tau).all()
    assert tau[0, :, -1].abs().max() < 1e-12  # minimum-norm solution leaves the dead column at 0
    grad = 2 * (problem.product(tau) - problem.B)
    assert grad.abs().max() < 1e-9 * problem.B.abs().max()


def test_batched_and_grouped_match_one_layer_at_a_time():
    layers = [task_vectors(4, 24, 16, seed=s) for s in range(5)]
    one_by_one = torch.stack([W.wudi_solve_batched(x.unsqueeze(0), steps=50)[0][0] for x in layers])
    all_at_once, losses = W.wudi_solve_batched(layers, steps=50)
    tiny_batches, _ = W.wudi_solve_batched(torch.stack(layers), steps=50, batch_memory_gb=1e-5)  # 1 layer per batch
    torch.testing.assert_close(all_at_once, one_by_one, rtol=0, atol=1e-9)
    torch.testing.assert_close(tiny_batches, one_by_one, rtol=0, atol=1e-9)
    assert len(losses.final) == 5 and all(f < i for f, i in zip(losses.final, losses.init))


def _ctx(name, report=None, keep=None):
    return TensorContext(name=name, decisions=TensorDecisions(keep=keep), report=report)


def test_merge_group_matches_merge_tensors(make_state_dicts):
    names = [f"model.layers.{i}.mlp.c_fc.weight" for i in range(3)]
    base, experts = make_state_dicts({k: (12, 20) for k in names}, n_experts=3, scale=1e-3)
    params = tritonmerge.get_method("wudi").validate({"steps": 40, "transpose_conv1d": ["c_fc"]})
    report = MergeReport()
    grouped = tritonmerge.get_method("wudi").merge_group(
        params, [(base[k], [e[k] for e in experts], _ctx(k, report)) for k in names]
    )
    for k, got in zip(names, grouped):
        single = merge_tensors("wudi", base[k], [e[k] for e in experts], name=k, steps=40, transpose_conv1d=["c_fc"])
        torch.testing.assert_close(got, single, rtol=0, atol=1e-9)
        assert report.tensors[k]["wudi_loss"] < report.tensors[k]["wudi_init_loss"]
    spec = tritonmerge.get_method("wudi")
    assert spec.group_key(params, names[0], (12, 20), torch.float32) == ("wudi", (20, 12))
    assert spec.group_key(params, "model.embed_tokens.weight", (12, 20), torch.float32) is None


def test_transpose_conv1d_optimises_the_out_in_layout(make_tensors):
    base, experts = make_tensors((10, 24), n_experts=3, scale=1e-3)
    flipped = merge_tensors("wudi", base.T.contiguous(), [e.T.contiguous() for e in experts], name="h.0.mlp.fc.weight", steps=30)
    got = merge_tensors("wudi", base, experts, name="h.0.mlp.c_fc.weight", steps=30, transpose_conv1d=["c_fc"])
    torch.testing.assert_close(got, flipped.T, rtol=0, atol=1e-9)
    plain = merge_tensors("wudi", base, experts, name="h.0.mlp.c_fc.weight", steps=30)
    assert not torch.allclose(plain, got, rtol=0, atol=1e-7)  # the loss is not transpose-symmetric


def test_zero_task_vectors_are_dropped(make_tensors):
    base, experts = make_tensors((16, 12), n_experts=3, scale=1e-3)
    with_zero = merge_tensors("wudi", base, experts + [base.clone()], name="w", steps=60)
    without = merge_tensors("wudi", base, experts, name="w", steps=60)
    torch.testing.assert_close(with_zero, without, rtol=0, atol=0)
    report = MergeReport()
    all_zero = merge_tensors("wudi", base, [base.clone(), base.clone()], name="w", report=report)
    assert torch.equal(all_zero, base)
    assert report.tensors["w"]["wudi_tasks"] == 0 and report.tensors["w"]["wudi_loss"] == 0
    exact_zero = merge_tensors("wudi", base, [base.clone()], name="w", solver="exact")
    assert torch.equal(exact_zero, base)


def test_lwptv_keep_flags_are_applied_in_groups(make_tensors):
    base, experts = make_tensors((16, 12), n_experts=3, scale=1e-3)
    spec = tritonmerge.get_method("wudi")
    params = spec.validate({"steps": 40})
    (pruned,) = spec.merge_group(params, [(base, experts, _ctx("w", keep=[True, False, True]))])
    expected = merge_tensors("wudi", base, [experts[0], base, experts[2]], name="w", steps=40)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=0)


def test_autograd_solver_is_the_official_loop_bit_for_bit(make_tensors):
    """solver="autograd" runs official_wudi_autograd itself (FusionBench's loop), per layer and in
    groups; a zero task vector is left out of its layer instead of making the loss NaN."""
    base, experts = make_tensors((16, 12), n_experts=3, scale=1e-3)
    tv = torch.stack([e.float() - base.float() for e in experts])
    ref, history = W.official_wudi_autograd(tv, steps=30, lr=LR)
    report = MergeReport()
    out = merge_tensors("wudi", base, experts, name="w", steps=30, lr=LR, solver="autograd", report=report)
    assert torch.equal(out, (base.float() + ref).to(base.dtype))
    assert report.tensors["w"]["wudi_solver"] == "autograd"
    assert report.tensors["w"]["wudi_init_loss"] == history[0]
    with_zero = merge_tensors("wudi", base, experts + [base.clone()], name="w", steps=30, lr=LR, solver="autograd")
    assert torch.equal(with_zero, out)
    spec = tritonmerge.get_method("wudi")
    params = spec.validate({"steps": 30, "lr": LR, "solver": "autograd"})
    (grouped,) = spec.merge_group(params, [(base, experts, _ctx("w"))])
    assert torch.equal(grouped, out)


def test_official_autograd_rejects_zero_task_vectors():
    tv = task_vectors(3, 5, 4)
    tv[1] = 0
    with pytest.raises(ValueError, match="zero"):
        W.official_wudi_autograd(tv, steps=2)


SD_SHAPES = {
    "model.embed_tokens.weight": (30, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.layers.0.mlp.down_proj.weight": (8, 20),
    "model.norm.weight": (8,),
    "lm_head.weight": (30, 8),
}


def test_selection_official_keeps_embeddings_lm_head_and_1d_at_base(make_state_dicts):
    base, experts = make_state_dicts(SD_SHAPES, n_experts=3, scale=1e-3)
    out = merge_state_dicts("wudi", base, experts, steps=20)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(out[name], base[name]), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert not torch.equal(out[name], base[name]), name


def test_selection_mean_all_2d_include_and_exclude(make_state_dicts):
    base, experts = make_state_dicts(SD_SHAPES, n_experts=3, scale=1e-3)
    mean = {k: torch.stack([e[k] for e in experts]).mean(0) for k in base}
    out = merge_state_dicts("wudi", base, experts, steps=20, others="mean")
    torch.testing.assert_close(out["model.norm.weight"], mean["model.norm.weight"])
    torch.testing.assert_close(out["lm_head.weight"], mean["lm_head.weight"])
    report = MergeReport()
    out = merge_state_dicts("wudi", base, experts, steps=20, select="all_2d", report=report)
    assert "model.embed_tokens.weight" in report.tensors and "lm_head.weight" in report.tensors
    out = merge_state_dicts("wudi", base, experts, steps=20, include=["q_proj"], exclude=["bias"])
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_identical_experts_fixed_point(make_tensors):
    # documented behaviour: the official Adam run starts at T·τ₀ and moves each entry by at most
    # a few steps·lr, so it does NOT return the expert; the exact minimiser does (up to the ridge)
    base, (expert,) = make_tensors((16, 10), n_experts=1, scale=1e-2)
    T = 4
    tau0 = expert - base
    adam = merge_tensors("wudi", base, [expert] * T, name="w", solver="adam") - base
    assert (adam - T * tau0).abs().max() <= 3 * STEPS * LR
    assert (adam - tau0).abs().max() > 0.5 * (T - 1) * tau0.abs().max()
    exact = merge_tensors("wudi", base, [expert] * T, name="w", solver="exact", ridge=1e-9)
    torch.testing.assert_close(exact, expert, rtol=0, atol=1e-5)


def test_bad_parameters_name_the_parameter():
    base = torch.zeros(4, 4)
    with pytest.raises(ParameterError, match="solver"):
        merge_tensors("wudi", base, [base + 1], solver="sgd")
    with pytest.raises(ParameterError, match="lr"):
        merge_tensors("wudi", base, [base + 1], lr=0)


def test_low_precision_inputs_are_merged_in_float32(make_tensors):
    base, experts = make_tensors((12, 8), n_experts=3, scale=1e-2, dtype=torch.bfloat16)
    out = merge_tensors("wudi", base, experts, name="w", steps=10)
    ref = merge_tensors("wudi", base.float(), [e.float() for e in experts], name="w", steps=10)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# GPU


def _extension_or_skip():
    from tritonmerge.backends import extension_status

    ext, why = extension_status()
    if ext is None:
        pytest.skip(f"CUDA extension not available: {why}")
    return ext


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 48), (37, 53), (128, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_extension_matches_torch_loop(shape):
    _extension_or_skip()
    tv = task_vectors(8, *shape, seed=7).cuda()
    layers = torch.stack([tv, tv.flip(0) * 0.5])
    ref, ref_losses = W.wudi_solve_batched(layers)
    got, got_losses = backends.run_op("wudi_solve", layers, backend="cuda")
    # same GEMMs, same per-element rounding sequence: expected bit-identical; allow a few ulps in
    # case this torch build's elementwise kernels contract differently
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-9)
    assert got_losses.final == pytest.approx(ref_losses.final, rel=1e-6)
    cpu, _ = W.wudi_solve_batched(layers.cpu())
    torch.testing.assert_close(got.cpu(), cpu, rtol=0, atol=5e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_cuda_graph_replay_matches_eager(backend):
    if backend == "cuda":
        _extension_or_skip()
    layers = [task_vectors(4, 32, 48, seed=s).cuda() for s in range(5)]
    eager, _ = backends.run_op("wudi_solve", layers, backend=backend, batch_memory_gb=1e-4)
    graphed, _ = backends.run_op("wudi_solve", layers, backend=backend, batch_memory_gb=1e-4, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_merge_on_cuda_uses_the_extension(make_state_dicts):
    _extension_or_skip()
    base, experts = make_state_dicts({"model.layers.0.mlp.up_proj.weight": (24, 16)}, n_experts=3, scale=1e-3, device="cuda")
    report = MergeReport()
    out = merge_state_dicts("wudi", base, experts, report=report)
    assert report.backends["model.layers.0.mlp.up_proj.weight"] == "cuda"
    cpu = merge_state_dicts(
        "wudi", {k: v.cpu() for k, v in base.items()}, [{k: v.cpu() for k, v in e.items()} for e in experts]
    )
    for k in out:
        torch.testing.assert_close(out[k].cpu(), cpu[k], rtol=0, atol=5e-8)


def test_exact_solver_stays_bounded_on_low_rank_task_vectors():
    """Two rank-1 task vectors make G rank 2 out of 48: float32 rounding noise along G's null
    space must not be amplified (it once produced a merged vector 1000x larger than the inputs)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=gen)
    experts = [base + 1e-3 * torch.randn(64, 1, generator=gen) @ torch.randn(1, 48, generator=gen) for _ in range(2)]
    name = "model.layers.0.mlp.up_proj.weight"
    report = tritonmerge.MergeReport()
    exact = tritonmerge.merge_tensors("wudi", base, experts, name=name, solver="exact", report=report)
    adam_report = tritonmerge.MergeReport()
    tritonmerge.merge_tensors("wudi", base, experts, name=name, solver="adam", report=adam_report)
    scale = sum(float((e - base).norm()) for e in experts)
    assert float((exact - base).norm()) <= 2 * scale
    assert report.tensors[name]["wudi_loss"] <= adam_report.tensors[name]["wudi_loss"] + 1e-12


def test_the_cuda_backend_declines_the_exact_solver():
    """The exact solver runs in torch: auto selection then reports "torch", and an explicit
    backend="cuda" is told why it cannot be honoured."""
    from tritonmerge.context import TensorContext
    from tritonmerge.catalog import get_method

    wudi = get_method("wudi")
    x = torch.zeros(4, 4)
    exact = wudi.impls["cuda"].supports(wudi.validate({"solver": "exact"}), x, [x], TensorContext(name="w"))
    adam = wudi.impls["cuda"].supports(wudi.validate({"solver": "adam"}), x, [x], TensorContext(name="w"))
    assert any("solver 'exact'" in why for why in exact)
    assert not any("solver" in why for why in adam)


def test_auto_solver_picks_exact_only_where_tasks_stack_twice_the_columns(make_tensors):
    # [16, 10] with 2 tasks: 2·16 rows ≥ 2·10 columns -> exact; [4, 10] with 2 tasks: 8 < 20 -> adam
    for shape, expected in (((16, 10), "exact"), ((4, 10), "adam")):
        base, experts = make_tensors(shape, n_experts=2, scale=1e-2)
        report = MergeReport()
        auto = merge_tensors("wudi", base, experts, name="w", report=report)
        assert report.tensors["w"]["wudi_solver"] == expected
        same = merge_tensors("wudi", base, experts, name="w", solver=expected)
        assert torch.equal(auto, same), shape


def test_auto_solver_decides_per_layer_from_the_non_zero_tasks():
    # one batch of same-shaped layers where one layer has lost 3 of its 4 tasks (as LwPTV prunes
    # them): that layer alone falls back to Adam, and every layer equals its own solver's result
    from tritonmerge.ops.wudi_solve import wudi_solve_batched

    gen = torch.Generator().manual_seed(7)
    layers = torch.randn(3, 4, 12, 8, generator=gen, dtype=torch.float64) * 1e-2
    layers[1, 1:] = 0
    merged, losses = wudi_solve_batched(layers, solver="auto", dtype=torch.float64)
    assert losses.solvers == ["exact", "adam", "exact"]
    assert losses.n_tasks == [4, 1, 4]
    exact, exact_losses = wudi_solve_batched(layers[[0, 2]], solver="exact", dtype=torch.float64)
    adam, adam_losses = wudi_solve_batched(layers[[1]], solver="adam", dtype=torch.float64)
    assert torch.equal(merged[[0, 2]], exact) and torch.equal(merged[1], adam[0])
    assert losses.final == [exact_losses.final[0], adam_losses.final[0], exact_losses.final[1]]


def test_auto_solver_falls_back_to_adam_where_the_gram_is_singular():
    # rank-1 task vectors (as LoRA deltas of rank 1): 2·64 rows ≥ 2·48 columns, but G has rank 2,
    # so the minimiser is not unique and auto runs the Adam recipe instead
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=gen)
    experts = [base + 1e-3 * torch.randn(64, 1, generator=gen) @ torch.randn(1, 48, generator=gen) for _ in range(2)]
    report = MergeReport()
    auto = merge_tensors("wudi", base, experts, name="model.layers.0.mlp.up_proj.weight", report=report)
    assert report.tensors["model.layers.0.mlp.up_proj.weight"]["wudi_solver"] == "adam"
    assert torch.equal(auto, merge_tensors("wudi", base, experts, name="model.layers.0.mlp.up_proj.weight", solver="adam"))


def test_the_cuda_backend_declines_layers_auto_solves_exactly():
    from tritonmerge.catalog import get_method

    wudi = get_method("wudi")
    base = torch.zeros(16, 10)
    experts = [base + 1, base + 2]
    auto = wudi.validate({})
    exact_layer = wudi.impls["cuda"].supports(auto, base, experts, TensorContext(name="w"))
    assert any("solver 'auto' solves this layer exactly" in why for why in exact_layer)
    adam_layer = wudi.impls["cuda"].supports(auto, base[:4], [e[:4] for e in experts], TensorContext(name="w"))
    assert not any("solver" in why for why in adam_layer)
