"""Batched WUDI solver: the official Adam iterates at a fraction of the cost, and the closed form.

For one 2-D weight with task vectors τ₁…τ_T (each m×n) the official WUDI loss is

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F

(https://arxiv.org/abs/2503.08099, nathanielyvo/WUDI-Merging:wudi_main.py). With the unit task
vectors uᵢ = τᵢ/‖τᵢ‖, Gᵢ = uᵢᵀuᵢ (n×n), G = Σ Gᵢ, B = Σ τᵢGᵢ (m×n) and c = Σ ‖τᵢuᵢᵀ‖²:

    L(τ) = tr(τGτᵀ) − 2·tr(τBᵀ) + c,      ∇L(τ) = 2(τG − B),      argmin = B G⁻¹.

So each Adam step is one m×n×n GEMM (P = τG) plus elementwise work, instead of the official
code's T pairs of m×n×m products forward and backward. Two equivalent ways of forming P are
used, whichever has fewer flops (checked in tests):

* ``gram``:     P = τ·G                       2mn² flops per step, G held as n×n;
* ``factored``: P = (τ·Uᵀ)·U, U = [u₁;…;u_T]  4Tm²n flops per step, no n×n matrix at all;
  cheaper when n > 2Tm (very wide, short matrices).

Note on "the transposed problem": L is *not* symmetric under τ ↦ τᵀ (the products are m×m,
the transposed loss would use n×n products), so the variable always stays m×n; only the
association order of the products changes. B is formed through the m×m products τᵢuᵢᵀ when
2m < n (4m²n + 2mn² flops per task instead of 4mn²).

The Adam update replicates ``torch.optim.Adam``'s default single-tensor path
(``torch/optim/adam.py:_single_tensor_adam``) op by op: lerp_ for the first moment,
mul_ + addcmul_ for the second, sqrt / bias_correction2_sqrt + eps, addcdiv_ with
−lr/bias_correction1. The reformulated iterates are therefore the official ones up to the
rounding of the gradient (summation order differs), not bit-identical.

Tasks whose τᵢ is zero (LwPTV-pruned, or an expert equal to the base) would get weight 1/0:
they are dropped from the loss (uᵢ := 0). A layer with no non-zero task returns zeros.

The Adam update is torch's ops here (CPU or GPU); backends/cuda.py passes ``adam_step``, one
fused gradient + Adam kernel from ``tritonmerge._C`` after the same cuBLAS GEMM.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch

BETA1 = 0.9
BETA2 = 0.999
ADAM_EPS = 1e-8
# eigenvalues of the float32-accumulated Gram below this fraction of the largest are noise
EXACT_RCOND = 1e-6
DEFAULT_RIDGE = 1e-6
# float32's smallest normal number: a task vector whose squared norm is below it would get an
# infinite weight in float32 (the official code would produce inf/NaN), so it counts as zero
_TINY_SQ_NORM = torch.finfo(torch.float32).tiny

Orientation = Literal["auto", "gram", "factored"]
Solver = Literal["auto", "adam", "exact", "autograd"]
# solver="auto" solves a layer exactly only when its non-zero tasks stack at least this many
# times as many rows as G has columns (T_nonzero·m ≥ ratio·n): below it G is singular or close to
# it, and the minimiser's components along the small eigen-directions blow up (docs/algorithms.md §1.2)
AUTO_EXACT_ROWS_PER_COLUMN = 2.0


@dataclass
class WudiLosses:
    """Per-layer WUDI loss at the initial point Σᵢτᵢ and at the returned merged vector."""

    init: list[float] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    n_tasks: list[int] = field(default_factory=list)
    solvers: list[str] = field(default_factory=list)  # the solver that ran, per layer
    gram_rank: list[int] = field(default_factory=list)  # exact solver: G's numerical rank, per layer


@dataclass
class WudiProblem:
    """Precomputed quantities for a batch of b same-shaped layers (all on the compute device).

    B: [b, m, n]; init: [b, m, n] (Σᵢτᵢ); const: [b] float64 (c above); n_tasks: [b] number of
    non-zero task vectors; G: [b, n, n] or None (factored form without exact solve);
    U: [b, T·m, n] unit task vectors or None (gram form).
    """

    B: torch.Tensor
    init: torch.Tensor
    const: torch.Tensor
    n_tasks: torch.Tensor
    G: torch.Tensor | None = None
    U: torch.Tensor | None = None

    def product(self, tau: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """P = τG for the whole batch (through G, or as (τUᵀ)U)."""
        if self.G is not None:
            return torch.bmm(tau, self.G, out=out)
        assert self.U is not None
        k = torch.bmm(tau, self.U.transpose(1, 2))
        return torch.bmm(k, self.U, out=out)

    def loss(self, tau: torch.Tensor, P: torch.Tensor | None = None) -> torch.Tensor:
        """L(τ) per layer, float64, from the quadratic form Σ τ⊙(P − 2B) + c (P = τG).

        Absolute error ≈ 1e-7·(tr(τGτᵀ) + c) from cancellation: fine for reporting (tests compare
        it with the direct evaluation ``wudi_loss_direct``); clamped at 0, as L ≥ 0."""
        if P is None:
            P = self.product(tau)
        out = torch.empty(tau.shape[0], dtype=torch.float64, device=tau.device)
        for i in range(tau.shape[0]):  # one layer at a time: no batch-sized float64 temporaries
            out[i] = torch.sum(tau[i] * (P[i] - 2 * self.B[i]), dtype=torch.float64)
        return (out + self.const).clamp_min_(0.0)


# ----------------------------------------------------------------------------------------------
# precompute


def task_scales(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per task of [..., T, m, n]: (1/‖τᵢ‖ with 0 for zero task vectors, ‖τᵢ‖², non-zero mask),
    each [..., T] in float64."""
    sq = torch.linalg.vector_norm(task_vectors, dim=(-2, -1), dtype=torch.float64) ** 2
    valid = sq >= _TINY_SQ_NORM
    inv = torch.where(valid, sq.clamp_min(_TINY_SQ_NORM).rsqrt(), torch.zeros_like(sq))
    return inv, torch.where(valid, sq, torch.zeros_like(sq)), valid


def choose_orientation(m: int, n: int, T: int, orientation: Orientation = "auto") -> str:
    """``gram`` (2mn² flops per step) unless ``factored`` (4Tm²n) is cheaper."""
    if orientation != "auto":
        return orientation
    return "factored" if 2 * T * m < n else "gram"


def precompute(
    task_vectors: torch.Tensor, *, orientation: Orientation = "auto", need_gram: bool = False
) -> WudiProblem:
    """G, B, c and Σᵢτᵢ for a batch [b, T, m, n] of task vectors (computed in their dtype)."""
    b, T, m, n = task_vectors.shape
    form = choose_orientation(m, n, T, orientation)
    inv, sq_norms, valid = task_scales(task_vectors)
    dtype = task_vectors.dtype
    init = task_vectors.sum(dim=1)
    B = torch.zeros(b, m, n, dtype=dtype, device=task_vectors.device)
    const = torch.zeros(b, dtype=torch.float64, device=task_vectors.device)
    keep_gram = form == "gram" or need_gram
    G = torch.zeros(b, n, n, dtype=dtype, device=task_vectors.device) if keep_gram else None
    U = torch.empty(b, T, m, n, dtype=dtype, device=task_vectors.device) if form == "factored" else None
    small_side = 2 * m < n  # B through the m×m products
    for i in range(T):
        tau_i = task_vectors[:, i]
        u_i = tau_i * inv[:, i].to(dtype).view(b, 1, 1)
        if U is not None:
            U[:, i] = u_i
        if small_side:
            k_i = torch.bmm(tau_i, u_i.transpose(1, 2))  # τᵢuᵢᵀ, [b, m, m]
            B.baddbmm_(k_i, u_i)
            const += torch.linalg.matrix_norm(k_i, dtype=torch.float64) ** 2
            if G is not None:
                G.baddbmm_(u_i.transpose(1, 2), u_i)
        else:
            g_i = torch.bmm(u_i.transpose(1, 2), u_i)  # uᵢᵀuᵢ, [b, n, n]
            B.baddbmm_(tau_i, g_i)
            # ‖τᵢuᵢᵀ‖² = ‖τᵢ‖²·‖uᵢuᵢᵀ‖² = ‖τᵢ‖²·‖uᵢᵀuᵢ‖²
            const += sq_norms[:, i] * torch.linalg.matrix_norm(g_i, dtype=torch.float64) ** 2
            if G is not None:
                G += g_i
            del g_i
    return WudiProblem(
        B=B,
        init=init,
        const=const,
        n_tasks=valid.sum(dim=1),
        G=G,
        U=U.view(b, T * m, n) if U is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# Adam


@dataclass(frozen=True)
class AdamScalars:
    """The per-step scalars of ``_single_tensor_adam`` (python floats, computed the same way)."""

    step_size: float  # lr / (1 − β₁ᵗ)
    bias_correction2_sqrt: float  # (1 − β₂ᵗ)^½


def adam_scalars(step: int, lr: float, beta1: float = BETA1, beta2: float = BETA2) -> AdamScalars:
    t = float(step)  # torch keeps the step count as a float tensor and reads it with .item()
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    return AdamScalars(step_size=lr / bias_correction1, bias_correction2_sqrt=bias_correction2**0.5)


def adam_update_torch(
    tau: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    lr: float,
    beta1: float = BETA1,
    beta2: float = BETA2,
    eps: float = ADAM_EPS,
) -> None:
    """One in-place Adam update with exactly the ops of torch.optim.Adam's single-tensor path."""
    s = adam_scalars(step, lr, beta1, beta2)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(eps)
    tau.addcdiv_(exp_avg, denom, value=-s.step_size)


def _round_to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def kernel_step_scalars(
    step: int, lr: float, beta1: float = BETA1, beta2: float = BETA2, eps: float = ADAM_EPS
) -> tuple[float, float, float, float, float, float]:
    """The scalar arguments of the fused kernel's step ``step``, in ``AdamStepScalars`` order
    (csrc/common.h): lerp weight, β₂, 1 − β₂, 1/bias_correction2_sqrt, eps, −step_size. The
    extension rounds each to float32, as torch's CUDA kernels round their Scalar arguments."""
    s = adam_scalars(step, lr, beta1, beta2)
    # CUDA torch divides by a CPU scalar as a multiplication by its reciprocal, computed in
    # float32 from the float32-rounded divisor (BinaryDivTrueKernel.cu: opmath_t(1.0) /
    # iter.scalar_value<opmath_t>(2)); the reciprocal of the double differs from it in some
    # steps (t = 1, 3, 4, ... for β₂ = 0.999). Dividing in double and rounding to float32 later
    # gives the float32 quotient exactly (double rounding is harmless for one division).
    inv_bc2_sqrt = 1.0 / _round_to_float32(s.bias_correction2_sqrt)
    return (1 - beta1, beta2, 1 - beta2, inv_bc2_sqrt, eps, -s.step_size)


# One fused Adam update on the device (backends/cuda.py); None: torch's ops (adam_update_torch).
# Arguments: tau, exp_avg, exp_avg_sq, P, B, step, lr, beta1, beta2, eps; it forms the gradient
# 2(P − B) itself.
AdamStep = Callable[..., None]


def adam_loop(
    problem: WudiProblem,
    *,
    steps: int,
    lr: float,
    adam_step: AdamStep | None = None,
    beta1: float = BETA1,
    beta2: float = BETA2,
    eps: float = ADAM_EPS,
    init_loss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run ``steps`` Adam steps from Σᵢτᵢ on the batch; returns (τ, loss at init, P for τ)."""
    tau = problem.init.clone()
    exp_avg = torch.zeros_like(tau)
    exp_avg_sq = torch.zeros_like(tau)
    P = torch.empty_like(tau)
    grad = torch.empty_like(tau)
    loss0 = None
    for t in range(1, steps + 1):
        problem.product(tau, out=P)
        if t == 1 and init_loss:
            loss0 = problem.loss(tau, P)
        if adam_step is not None:
            adam_step(tau, exp_avg, exp_avg_sq, P, problem.B, t, lr, beta1, beta2, eps)
        else:
            torch.sub(P, problem.B, out=grad).mul_(2.0)
            adam_update_torch(tau, exp_avg, exp_avg_sq, grad, t, lr, beta1, beta2, eps)
    problem.product(tau, out=P)
    if loss0 is None and init_loss:
        loss0 = problem.loss(tau, P)
    return tau, loss0, P


def _graphed_adam(problem: WudiProblem, *, steps: int, lr: float, adam_step: AdamStep | None) -> "_GraphedAdam":
    return _GraphedAdam(problem, steps=steps, lr=lr, adam_step=adam_step)


class _GraphedAdam:
    """The whole unrolled step loop captured once in a CUDA graph and replayed for every batch
    of the same shape (the per-step scalars are python constants baked into the graph, so the
    arithmetic is exactly that of ``adam_loop``). Worth it for small layers, where kernel
    launches rather than the GEMM dominate a step."""

    def __init__(self, problem: WudiProblem, *, steps: int, lr: float, adam_step: AdamStep | None) -> None:
        self.static = WudiProblem(
            B=problem.B.clone(),
            init=problem.init.clone(),
            const=problem.const.clone(),
            n_tasks=problem.n_tasks.clone(),
            G=None if problem.G is None else problem.G.clone(),
            U=None if problem.U is None else problem.U.clone(),
        )
        self.tau = torch.empty_like(problem.init)
        self.P = torch.empty_like(problem.init)
        self.key = self._key(problem)
        stream = torch.cuda.Stream(device=problem.init.device)
        stream.wait_stream(torch.cuda.current_stream(problem.init.device))
        with torch.cuda.stream(stream):  # warm-up outside capture (cuBLAS workspaces, lazy init)
            self._body(steps=1, lr=lr, adam_step=adam_step)
        torch.cuda.current_stream(problem.init.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(steps=steps, lr=lr, adam_step=adam_step)

    @staticmethod
    def _key(p: WudiProblem) -> tuple:
        return (tuple(p.B.shape), None if p.G is None else tuple(p.G.shape), None if p.U is None else tuple(p.U.shape))

    def _body(self, *, steps: int, lr: float, adam_step: AdamStep | None) -> None:
        tau, _, P = adam_loop(self.static, steps=steps, lr=lr, adam_step=adam_step, init_loss=False)
        self.tau.copy_(tau)
        self.P.copy_(P)

    def run(self, problem: WudiProblem) -> tuple[torch.Tensor, torch.Tensor]:
        self.static.B.copy_(problem.B)
        self.static.init.copy_(problem.init)
        if problem.G is not None:
            self.static.G.copy_(problem.G)  # type: ignore[union-attr]
        if problem.U is not None:
            self.static.U.copy_(problem.U)  # type: ignore[union-attr]
        self.graph.replay()
        return self.tau.clone(), self.P.clone()


# ----------------------------------------------------------------------------------------------
# exact solve


def exact_solve(
    problem: WudiProblem, *, ridge: float = DEFAULT_RIDGE, rcond: float = EXACT_RCOND
) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ, rank): argmin of L + ε‖τ‖² restricted to G's numerical range, τ = B V diag(1/(λ+ε)) Vᵀ
    over the eigenpairs of G with λ > rcond·λ_max, ε = ridge · tr(G)/n = ridge · T_nonzero/n;
    rank [b] counts those eigenpairs (n: G is numerically invertible and the minimiser unique).

    G = Σ wᵢτᵢᵀτᵢ is rank-deficient whenever the task vectors are low-rank (few tasks, short
    fine-tuning, LwPTV-pruned tasks). G and B are accumulated in float32, so G's tiny eigenvalues
    are rounding noise and B has noise along them: a plain solve of (G + εI) divides that noise by
    ~ε and the result explodes. The exact B G⁺ has no component there, so those directions are
    cut (rcond ≈ float32's relative precision) and the rest solved in float64."""
    assert problem.G is not None, "exact_solve needs the Gram matrix (precompute(..., need_gram=True))"
    G = problem.G.to(torch.float64)
    G = (G + G.transpose(1, 2)) / 2
    b, n, _ = G.shape
    eps = (ridge * problem.n_tasks.to(torch.float64) / n).view(b, 1)
    evals, evecs = torch.linalg.eigh(G)
    cutoff = rcond * evals.abs().amax(dim=1, keepdim=True)
    retained = evals > cutoff
    inv = torch.where(retained, 1.0 / (evals + eps), torch.zeros_like(evals))
    B = problem.B.to(torch.float64)
    X = ((B @ evecs) * inv.unsqueeze(1)) @ evecs.transpose(1, 2)
    X[problem.n_tasks == 0] = 0
    return X.to(problem.B.dtype).contiguous(), retained.sum(dim=1)


# ----------------------------------------------------------------------------------------------
# direct evaluation and the official-style baseline


def wudi_loss_direct(task_vectors: torch.Tensor, tau: torch.Tensor) -> float:
    """Σᵢ ‖(τ − τᵢ)τᵢᵀ‖² / ‖τᵢ‖² evaluated literally in float64 (zero task vectors skipped)."""
    tv = task_vectors.to(torch.float64)
    t = tau.to(torch.float64)
    total = 0.0
    for i in range(tv.shape[0]):
        sq = float(torch.sum(tv[i] ** 2))
        if sq < _TINY_SQ_NORM:
            continue
        total += float(torch.sum(((t - tv[i]) @ tv[i].T) ** 2)) / sq
    return total


def official_wudi_autograd(
    task_vectors: torch.Tensor, *, steps: int = 300, lr: float = 1e-5
) -> tuple[torch.Tensor, list[float]]:
    """The official WUDI recipe written plainly: autograd on the literal loss, torch.optim.Adam.

    ``task_vectors``: [T, m, n]. Returns (merged τ, the loss before every step). This is the
    independent check the reformulated solver is tested against and the "official-style"
    baseline in the benchmarks. Like the official code it cannot handle a zero task vector
    (its weight would be 1/0): that raises ValueError here.
    """
    vectors = task_vectors.detach()
    sq_norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    if bool((sq_norms == 0).any()):
        raise ValueError("official_wudi_autograd: a task vector is all zero (its weight 1/‖τ‖² is infinite)")
    merged = torch.nn.Parameter(vectors.sum(dim=0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    history: list[float] = []
    for _ in range(steps):
        product = torch.matmul(merged.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(product) / sq_norms.view(-1, 1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return merged.detach().clone(), history


def _autograd_layers(
    layers: Sequence[torch.Tensor], *, steps: int, lr: float, device: torch.device, dtype: torch.dtype,
    tf32: bool, out_device: torch.device,
) -> tuple[torch.Tensor, WudiLosses]:
    """``solver="autograd"``: ``official_wudi_autograd`` per layer. A zero task vector would put
    0/0 into the official loss; it is dropped from its layer (adding nothing to Στᵢ either)."""
    T, m, n = layers[0].shape
    merged = torch.empty(len(layers), m, n, dtype=dtype, device=out_device)
    losses = WudiLosses()
    with matmul_precision(tf32, device):
        for i, layer in enumerate(layers):
            tv = layer.to(device=device, dtype=dtype)
            live = tv.reshape(T, -1).abs().amax(dim=1) > 0
            kept = tv[live]
            if len(kept) == 0:
                merged[i] = 0
                losses.init.append(0.0)
                losses.final.append(0.0)
                losses.n_tasks.append(0)
                losses.solvers.append("autograd")
                continue
            with torch.enable_grad():
                tau, history = official_wudi_autograd(kept, steps=steps, lr=lr)
            losses.init.append(history[0] if history else wudi_loss_direct(kept, tau))
            losses.final.append(wudi_loss_direct(kept, tau))
            losses.n_tasks.append(len(kept))
            losses.solvers.append("autograd")
            merged[i] = tau.to(out_device)
    return merged, losses


# ----------------------------------------------------------------------------------------------
# the driver


@contextlib.contextmanager
def matmul_precision(tf32: bool, device: torch.device) -> Iterator[None]:
    """TF32 matmuls on/off on CUDA for the duration (restored afterwards); no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def auto_solver(n_tasks: int, m: int, n: int) -> str:
    """The solver ``solver="auto"`` tries first on one [m, n] layer with ``n_tasks`` non-zero task
    vectors; a layer it tries exactly falls back to Adam if G turns out numerically singular
    (low-rank task vectors, e.g. LoRA deltas)."""
    return "exact" if n_tasks > 0 and n_tasks * m >= AUTO_EXACT_ROWS_PER_COLUMN * n else "adam"


def layer_bytes(m: int, n: int, T: int, *, solver: str = "adam", orientation: Orientation = "auto") -> int:
    """Upper estimate of the device bytes one layer needs inside a batch (float32)."""
    if solver == "auto":
        solver = auto_solver(T, m, n)
    form = choose_orientation(m, n, T, orientation)
    mn = m * n
    work = T * mn + 6 * mn  # task vectors, τ, m, v, P, grad, B
    if form == "gram" or solver == "exact":
        work += 2 * n * n  # G and one per-task Gram
    if form == "factored":
        work += T * mn + m * T * m
    if 2 * m < n:
        work += m * m
    if solver == "exact":
        work += 2 * n * n + 2 * mn  # float64 copy of G + εI and of the right-hand side
        return 4 * work + 8 * (n * n + mn)
    return 4 * work


def default_budget(device: torch.device) -> int:
    """Bytes a batch may use: half the free GPU memory, or 4 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 4 << 30


def wudi_solve_batched(
    task_vectors: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: int = 300,
    lr: float = 1e-5,
    solver: Solver = "adam",
    adam_step: AdamStep | None = None,
    ridge: float = DEFAULT_RIDGE,
    tf32: bool = False,
    batch_memory_gb: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    orientation: Orientation = "auto",
    cuda_graph: bool = False,
    compute_losses: bool = True,
) -> tuple[torch.Tensor, WudiLosses]:
    """Merged WUDI task vectors for L same-shaped layers.

    Args:
        task_vectors: [L, T, m, n] tensor, or a sequence of L tensors [T, m, n] (any float dtype,
            any device). Zero task vectors are dropped from their layer's loss.
        steps, lr: Adam iterations and learning rate (official: 300, 1e-5).
        solver: ``adam`` (the official iterates), ``exact`` (B(G + εI)⁻¹, ε = ridge·T/n),
            ``auto`` (per layer: ``exact`` where its non-zero tasks give T·m ≥ 2n and G is
            numerically invertible, else ``adam``; ``auto_solver``) or ``autograd`` (the official
            loop as written, ``official_wudi_autograd``, one layer at a time: the official code's
            and FusionBench's bits, at several times the cost).
        adam_step: the fused Adam update to use (backends/cuda.py's, on CUDA tensors); None:
            torch's ops. The dispatcher (``backends.run_op("wudi_solve", ...)``) chooses it.
        tf32: allow TF32 tensor-core matmuls on CUDA (faster, ~1e-3 relative GEMM error).
        batch_memory_gb: device memory one batch of layers may use (default: half the free GPU
            memory, 4 GiB on CPU); layers are processed in batches that fit.
        device: compute device (default: the input's).
        dtype: compute dtype (float32 as the official code; float64 for checks).
        orientation: ``auto`` | ``gram`` | ``factored`` way of forming τG (see module doc).
        cuda_graph: on CUDA, capture the step loop once per batch shape and replay it.
        compute_losses: also return the loss at Σᵢτᵢ and at the result (one extra GEMM).

    Returns:
        (merged [L, m, n] in ``dtype`` on the input's device, ``WudiLosses``).
    """
    if solver not in ("auto", "adam", "exact", "autograd"):
        raise ValueError(f"wudi_solve_batched: solver {solver!r} is not 'auto', 'adam', 'exact' or 'autograd'")
    layers = list(task_vectors) if not isinstance(task_vectors, torch.Tensor) else task_vectors
    if len(layers) == 0:
        raise ValueError("wudi_solve_batched: no layers given")
    first = layers[0]
    if first.dim() != 3:
        raise ValueError(f"wudi_solve_batched: each layer must be [T, m, n], got {tuple(first.shape)}")
    T, m, n = first.shape
    for x in layers:
        if tuple(x.shape) != (T, m, n):
            raise ValueError(f"wudi_solve_batched: layer shapes differ: {tuple(x.shape)} vs {(T, m, n)}")
    out_device = first.device
    dev = torch.device(device) if device is not None else first.device
    options = dict(
        steps=steps, lr=lr, adam_step=adam_step, ridge=ridge, tf32=tf32, batch_memory_gb=batch_memory_gb,
        device=device, dtype=dtype, orientation=orientation, cuda_graph=cuda_graph, compute_losses=compute_losses,
    )
    if solver == "auto":
        return _auto_layers(layers, m, n, options)
    if solver == "autograd":
        return _autograd_layers(layers, steps=steps, lr=lr, device=dev, dtype=dtype, tf32=tf32, out_device=out_device)
    budget = int(batch_memory_gb * (1 << 30)) if batch_memory_gb is not None else default_budget(dev)
    per_layer = layer_bytes(m, n, T, solver=solver, orientation=orientation)
    batch = max(1, min(len(layers), budget // max(per_layer, 1)))
    merged = torch.empty(len(layers), m, n, dtype=dtype, device=out_device)
    losses = WudiLosses()
    graphed: _GraphedAdam | None = None
    use_graph = cuda_graph and dev.type == "cuda" and solver == "adam"
    with torch.no_grad(), matmul_precision(tf32, dev):
        for start in range(0, len(layers), batch):
            chunk = layers[start : start + batch]
            tv = torch.stack([x.to(device=dev, dtype=dtype) for x in chunk]) if not isinstance(
                chunk, torch.Tensor
            ) else chunk.to(device=dev, dtype=dtype)
            problem = precompute(tv, orientation=orientation, need_gram=solver == "exact")
            del tv
            if solver == "exact":
                tau, rank = exact_solve(problem, ridge=ridge)
                losses.gram_rank.extend(int(r) for r in rank.tolist())
                P = problem.product(tau) if compute_losses else None
                loss0 = problem.loss(problem.init) if compute_losses else None
            elif use_graph:
                if graphed is None or graphed.key != _GraphedAdam._key(problem):
                    graphed = _graphed_adam(problem, steps=steps, lr=lr, adam_step=adam_step)
                tau, P = graphed.run(problem)
                loss0 = problem.loss(problem.init) if compute_losses else None
            else:
                tau, loss0, P = adam_loop(problem, steps=steps, lr=lr, adam_step=adam_step, init_loss=compute_losses)
            if compute_losses:
                assert loss0 is not None
                losses.init.extend(loss0.tolist())
                losses.final.extend(problem.loss(tau, P).tolist())
            losses.n_tasks.extend(int(k) for k in problem.n_tasks.tolist())
            losses.solvers.extend([solver] * len(chunk))
            merged[start : start + len(chunk)] = tau.to(out_device)
    return merged, losses


def _auto_layers(layers: torch.Tensor | Sequence[torch.Tensor], m: int, n: int, options: dict) -> tuple[torch.Tensor, WudiLosses]:
    """``solver="auto"``: split the layers by ``auto_solver`` of their non-zero task count, solve
    each share with its solver, and return the results in the input order."""
    counts = [int(task_scales(x)[2].sum()) for x in layers]
    out_device = layers[0].device
    merged = torch.empty(len(layers), m, n, dtype=options["dtype"], device=out_device)
    per_layer: list[tuple[float, float, int, str] | None] = [None] * len(layers)

    def solve(idx: list[int], share_solver: str) -> list[int]:
        """Solve layers ``idx`` with ``share_solver``; returns those the exact solve found singular."""
        if not idx:
            return []
        part, part_losses = wudi_solve_batched([layers[i] for i in idx], solver=share_solver, **options)
        singular = []
        for j, i in enumerate(idx):
            if share_solver == "exact" and part_losses.gram_rank[j] < n:
                singular.append(i)
                continue
            merged[i] = part[j]
            init = part_losses.init[j] if part_losses.init else float("nan")
            final = part_losses.final[j] if part_losses.final else float("nan")
            per_layer[i] = (init, final, part_losses.n_tasks[j], share_solver)
        return singular

    chosen = [auto_solver(k, m, n) for k in counts]
    singular = solve([i for i, c in enumerate(chosen) if c == "exact"], "exact")
    solve(sorted([i for i, c in enumerate(chosen) if c == "adam"] + singular), "adam")
    losses = WudiLosses()
    for init, final, k, s in per_layer:  # type: ignore[misc]
        if options["compute_losses"]:
            losses.init.append(init)
            losses.final.append(final)
        losses.n_tasks.append(k)
        losses.solvers.append(s)
    return merged, losses
