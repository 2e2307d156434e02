"""WUDI-Merging: per linear weight, the merged task vector that minimises the interference it
causes on each task's own input directions (https://arxiv.org/abs/2503.08099, ICML 2025).

For a selected 2-D weight with task vectors τᵢ = θᵢ − θ₀ ([out, in] = [m, n]):

    τ* ≈ argmin_τ Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,        θ = θ₀ + 1·τ*

``solver="adam"`` reaches it as the official code does (nathanielyvo/WUDI-Merging:wudi_main.py):
start at Σᵢτᵢ, 300 steps of Adam (lr 1e-5, β 0.9/0.999, ε 1e-8, bias correction), float32, no
λ, computed through the reformulation of ``ops/wudi_solve.py`` (one GEMM per step, same iterates
up to rounding). ``solver="exact"`` returns the ridge-regularised minimiser B(G + εI)⁻¹ instead
(ε = ridge·tr(G)/n, tr(G) = number of non-zero tasks). The default ``solver="auto"`` takes the
exact minimiser where a layer's non-zero tasks determine it (T·m ≥ 2n and G numerically
invertible) and the Adam recipe elsewhere: the quality benchmark's validation splits chose it,
and the exact solve of a near-singular G blows up (docs/algorithms.md §1.2).

Tensor selection (docs/algorithms.md §1.3): ``select="official"`` optimises 2-D weights except names
containing a substring of ``exclude`` (default: embeddings ``embed``/``wte``/``wpe``/
``position_embedding`` and ``lm_head``); ``select="all_2d"`` is FusionBench's rule (every 2-D
tensor; ``exclude`` empty by default). ``include`` restricts the optimised set further (e.g. the
official ViT run: ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
``mlp.c_proj.weight``). Substrings match case-sensitively. Everything else (1-D, >2-D,
excluded) is ``others="base"`` (official: θ₀) or ``"mean"`` (FusionBench: θ₀ + mean τᵢ).
``transpose_conv1d`` names 2-D weights stored [in, out] (GPT-2 Conv1D); they are transposed
to [out, in] for the loss and back.

Zero task vectors (an expert equal to the base, or a layer LwPTV pruned for that task) would
weigh 1/0 in the loss: they are dropped; a layer with no non-zero task stays at θ₀.
Identical experts (τᵢ = τ₀ for all i) are a fixed point only of the exact solver (≈ τ₀); the
official Adam run starts at T·τ₀ and moves each entry by at most ~steps·lr, so it returns
≈ T·τ₀ — that is the official behaviour, kept.

Per tensor, ``ctx.record`` stores ``wudi_init_loss`` (at Σᵢτᵢ), ``wudi_loss`` (at the result)
and ``wudi_tasks`` (non-zero tasks). Batched execution over same-shaped layers:
``wudi_group_key`` + ``merge_wudi_group`` (see the module's ``merge_group`` hook).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from .. import backends
from ..context import TensorContext
from ..errors import BackendUnavailableError
from ..backends.cuda import wudi_solve_reasons
from ..ops import wudi_solve
from ..params import MethodParams
from ..registry import MergeMethod, register

DEFAULT_EXCLUDE = ("embed", "wte", "wpe", "position_embedding", "lm_head")


class WudiParams(MethodParams):
    steps: int = Field(300, ge=0, description="Adam iterations per tensor (official 300; 0 = task arithmetic with λ=1)")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (official ViT 1e-5, RoBERTa 2e-5)")
    solver: Literal["auto", "adam", "exact", "autograd"] = Field(
        "auto",
        description=(
            "auto (default, chosen on the quality benchmark's validation splits): per layer, exact where "
            "its non-zero tasks stack T·m ≥ 2n rows against G's n columns and G is invertible, else adam; "
            "adam: the official early-stopped Adam run (reformulated, batched); exact: closed-form ridge "
            "minimiser; autograd: the official loop as written (autograd and torch.optim.Adam, one layer at "
            "a time), the official code's and FusionBench's bits at several times adam's cost"
        ),
    )
    ridge: float = Field(
        wudi_solve.DEFAULT_RIDGE,
        ge=0,
        description="exact solver: ridge ε relative to tr(G)/n (G's mean eigenvalue)",
    )
    select: Literal["official", "all_2d"] = Field(
        "official", description="official: 2-D weights minus embeddings/lm_head; all_2d: every 2-D tensor (FusionBench)"
    )
    exclude: list[str] | None = Field(
        None, description="name substrings never optimised (default: embed, wte, wpe, position_embedding, lm_head for official; none for all_2d)"
    )
    include: list[str] | None = Field(None, description="if set, only names containing one of these substrings are optimised")
    others: Literal["base", "mean"] = Field(
        "base", description="tensors not optimised: base (official) or base + mean task vector (FusionBench)"
    )
    transpose_conv1d: list[str] = Field(
        default_factory=list, description="name substrings of 2-D weights stored [in, out] (GPT-2 Conv1D)"
    )
    tf32: bool = Field(False, description="allow TF32 matmuls on CUDA (faster, ~1e-3 relative GEMM error)")
    batch_memory_gb: float | None = Field(
        None, gt=0, description="device memory for one batch of same-shaped layers (default: half the free GPU memory; 4 GiB on CPU)"
    )


def excluded_substrings(params: WudiParams) -> tuple[str, ...]:
    if params.exclude is not None:
        return tuple(params.exclude)
    return DEFAULT_EXCLUDE if params.select == "official" else ()


def is_selected(name: str, shape: Sequence[int], params: WudiParams) -> bool:
    """True when the tensor is optimised by WUDI (2-D and not excluded by name)."""
    if len(shape) != 2:
        return False
    if params.include is not None and not any(s in name for s in params.include):
        return False
    return not any(s in name for s in excluded_substrings(params))


def _is_transposed(name: str, params: WudiParams) -> bool:
    return any(s in name for s in params.transpose_conv1d)


def _task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor], transposed: bool) -> torch.Tensor:
    b = base.to(torch.float32)
    tv = torch.stack([e.to(torch.float32) - b for e in experts])
    return tv.transpose(1, 2) if transposed else tv


def _merge_other(base: torch.Tensor, experts: Sequence[torch.Tensor], params: WudiParams) -> torch.Tensor:
    if params.others == "base":
        return base.clone()
    b = base.to(torch.float32)
    acc = torch.zeros_like(b)
    for e in experts:
        acc += e.to(torch.float32) - b
    return b + acc / len(experts)


def _solve_kwargs(params: WudiParams) -> dict[str, Any]:
    return dict(
        steps=params.steps,
        lr=params.lr,
        solver=params.solver,
        ridge=params.ridge,
        tf32=params.tf32,
        batch_memory_gb=params.batch_memory_gb,
    )


def _record(ctx: TensorContext, losses: wudi_solve.WudiLosses, i: int) -> None:
    ctx.record(
        wudi_init_loss=losses.init[i],
        wudi_loss=losses.final[i],
        wudi_tasks=losses.n_tasks[i],
        wudi_solver=losses.solvers[i],
    )


def _backend_that_ran(dispatched: str, solver_that_ran: str) -> str:
    # the exact and autograd solvers are torch's on every device, whichever backend took the call
    return dispatched if solver_that_ran == "adam" else "torch"


def _merge(base: torch.Tensor, experts: Sequence[torch.Tensor], params: WudiParams, ctx: TensorContext, backend: str) -> torch.Tensor:
    if not is_selected(ctx.name, base.shape, params):
        return _merge_other(base, experts, params)
    transposed = _is_transposed(ctx.name, params)
    tv = _task_vectors(base, experts, transposed)
    merged, losses = backends.run_op("wudi_solve", tv.unsqueeze(0), backend=backend, **_solve_kwargs(params))
    _record(ctx, losses, 0)
    tau = merged[0].T if transposed else merged[0]
    return base.to(torch.float32) + tau


def merge_wudi(base: torch.Tensor, experts: Sequence[torch.Tensor], params: WudiParams, ctx: TensorContext) -> torch.Tensor:
    """The torch reference for one tensor (reformulated Adam loop or exact solve, on base's device)."""
    return _merge(base, experts, params, ctx, backend="torch")


wudi = register(
    MergeMethod(
        name="wudi",
        params=WudiParams,
        doc="WUDI: per linear weight, the minimiser of Σ‖(τ−τᵢ)τᵢᵀ‖²/‖τᵢ‖² where the tasks determine it, else the official early-stopped Adam run from Στᵢ",
        merge_tensor=merge_wudi,
        reference="nathanielyvo/WUDI-Merging:wudi_main.py; arXiv 2503.08099",
        min_experts=1,
    )
)


def _cuda_supports(params: WudiParams, base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: TensorContext) -> list[str]:
    # the exact solver is declined so that the merge report names torch, which runs it
    if params.solver == "auto" and is_selected(ctx.name, base.shape, params):
        m, n = base.shape[::-1] if _is_transposed(ctx.name, params) else base.shape
        live = sum(e is not base for e in experts)  # merge_one hands LwPTV-pruned experts in as base
        if wudi_solve.auto_solver(live, m, n) == "exact":
            return [f"solver 'auto' solves this layer exactly ({live} tasks × {m} rows ≥ 2 × {n} columns), in torch"]
    return wudi_solve_reasons(base.device, solver=params.solver)


@wudi.register_impl("cuda", supports=_cuda_supports)
def _wudi_cuda(base: torch.Tensor, experts: Sequence[torch.Tensor], params: WudiParams, ctx: TensorContext) -> torch.Tensor:
    return _merge(base, experts, params, ctx, backend="cuda")


# ----------------------------------------------------------------------------------------------
# batched execution of same-shaped layers (the merge_group hook)


def wudi_group_key(params: WudiParams, name: str, shape: Sequence[int], dtype: torch.dtype) -> tuple | None:
    """Tensors with equal keys can be merged together by ``merge_wudi_group``; None = merge alone.

    The key is the problem shape [m, n] after the optional Conv1D transpose, so a Conv1D weight
    and a Linear weight of the transposed shape batch together."""
    if not is_selected(name, shape, params):
        return None
    m, n = shape
    return ("wudi", (n, m) if _is_transposed(name, params) else (m, n))


def max_group_size(params: WudiParams, shape: Sequence[int], n_experts: int, device: torch.device | str) -> int:
    """How many layers of this shape one batch holds within ``batch_memory_gb`` (or the default
    budget): the engine should not hand ``merge_wudi_group`` more than this many at once."""
    dev = torch.device(device)
    m, n = shape
    budget = int(params.batch_memory_gb * (1 << 30)) if params.batch_memory_gb else wudi_solve.default_budget(dev)
    per = wudi_solve.layer_bytes(m, n, n_experts, solver=params.solver)
    return max(1, budget // max(per, 1))


def merge_wudi_group(
    params: WudiParams,
    items: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], TensorContext]],
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Merge several selected, same-key tensors at once; the per-tensor results equal
    ``merge_wudi`` on each (up to GEMM batching, see tests). Returns tensors in each base's
    dtype and device. ``items``: (base, experts, ctx) per tensor; LwPTV keep flags in ``ctx``
    are applied here too. ``backend``: None/auto | torch | cuda (``TRITONMERGE_BACKEND`` when None)."""
    if not items:
        return []
    want = backends.requested_backend(backend)
    if want == "triton":
        raise BackendUnavailableError("wudi has no triton implementation; use backend 'cuda' or 'torch'")
    layers, flags = [], []
    for base, experts, ctx in items:
        if wudi_group_key(params, ctx.name, base.shape, base.dtype) is None:
            raise ValueError(f"wudi: tensor {ctx.name!r} is not optimised by WUDI and cannot be grouped")
        transposed = _is_transposed(ctx.name, params)
        layers.append(_task_vectors(base, ctx.decisions.kept_experts(base, experts), transposed))
        flags.append(transposed)
    shapes = {tuple(x.shape) for x in layers}
    if len(shapes) != 1:
        raise ValueError(f"wudi: a group must share one problem shape, got {sorted(shapes)}")
    solve_backend = want if want in ("torch", "cuda") else "auto"
    if solve_backend == "cuda" and params.solver not in ("adam", "auto"):
        solve_backend = "torch"  # the exact and autograd solvers are torch's on any device
    used, (merged, losses) = backends.dispatch("wudi_solve", layers, backend=solve_backend, **_solve_kwargs(params))
    out = []
    for i, (base, _, ctx) in enumerate(items):
        _record(ctx, losses, i)
        ctx.record_backend(_backend_that_ran(used, losses.solvers[i]))
        tau = merged[i].T if flags[i] else merged[i]
        out.append((base.to(torch.float32) + tau).to(dtype=base.dtype, device=base.device))
    return out


def wudi_flops(params: WudiParams, name: str, shape: Sequence[int], n_experts: int) -> float:
    """The matrix products of one tensor: per Adam step one [m, n] × [n, n] product (forming G
    and B costs about one more step per task); the exact solver about one step's worth (``auto``:
    as if every expert's task vector were non-zero)."""
    if not is_selected(name, shape, params):
        return 0.0
    m, n = shape
    solver = wudi_solve.auto_solver(n_experts, m, n) if params.solver == "auto" else params.solver
    steps = 1 if solver == "exact" else max(params.steps, 1)
    return (steps + n_experts) * 2.0 * m * n * n


wudi.flops = wudi_flops
wudi.group_key = wudi_group_key
wudi.merge_group = merge_wudi_group
wudi.max_group_size = max_group_size
