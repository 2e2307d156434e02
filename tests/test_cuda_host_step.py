"""The CUDA kernel's per-element arithmetic (csrc/wudi_adam_step.h), built for the host by g++
and by nvcc, against torch.optim.Adam run on the CPU through the same steps, bit for bit.

The kernel follows torch.optim.Adam's single-tensor path (foreach=False, capturable=False, the
CPU default) as the CUDA torch kernels round it. Four of those ops round differently on the
CPU (torch 2.13, ATen/native/{cpu,cuda}, ATen/cpu/vml.h):

* ``exp_avg_sq.addcmul_(g, g, value=c)``: CUDA ``a + c * (g * g)``, one FMA after the product
  g·g; CPU ``a + c * g * g``, i.e. (c·g)·g, whose last step this build fuses into an FMA;
* ``exp_avg_sq.sqrt()``: CUDA correctly rounded; CPU builds with MKL take MKL's vector sqrt
  (VML_HA: within 1 ulp, about a fifth of the roots 1 ulp off), others round correctly;
* ``/ bias_correction2_sqrt`` (a python float): CUDA multiplies by the float32 reciprocal of
  the float32 divisor; the CPU divides;
* ``param.addcdiv_(exp_avg, denom, value=-step_size)``: CUDA ``a + value * (m / d)``, one FMA
  after the quotient; CPU ``a + value * m / d``, i.e. (value·m)/d, then an addition.

The others (sub, mul_, lerp_, add_) round the same on both. So the tests split:
``reference_step`` is _single_tensor_adam written out op for op with CPU torch; with
``cuda_rounding=False`` it must equal torch.optim.Adam itself (and the project's torch driver),
with ``cuda_rounding=True`` those four ops are computed the CUDA way, and the host build of the
kernel's element step must equal that. The last tests check the claims above op by op on the
CPU: which ops round like the kernel's, and which do not.

Sizes are multiples of 64 and below TensorIterator's grain size, so that every CPU kernel runs
its vectorized loop in one thread (a scalar tail loop could be compiled with other contraction).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tritonmerge.ops import wudi_solve as W

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HOST_SOURCE = CSRC / "host" / "wudi_step_host.cpp"
STEPS = 300
STATE_NAMES = ("tau", "exp_avg", "exp_avg_sq")

# the host arithmetic rounds like the device only without contraction (wudi_adam_step.h)
BUILD_COMMANDS = {
    "g++": ["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"],
    "nvcc": ["-x", "cu", "-std=c++17", "-O2", "-Xcompiler", "-ffp-contract=off,-Wall,-Wextra,-Werror",
             "-Werror", "all-warnings"],
}


def _find_compiler(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and name == "nvcc" and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        found = "/usr/local/cuda/bin/nvcc"
    return found


@pytest.fixture(scope="module", params=sorted(BUILD_COMMANDS))
def host_step_program(request, tmp_path_factory) -> Path:
    compiler = _find_compiler(request.param)
    if compiler is None:
        pytest.skip(f"{request.param} is not on PATH, so {HOST_SOURCE.relative_to(ROOT)} cannot be built with it")
    exe = tmp_path_factory.mktemp(f"host_step_{request.param}") / "wudi_step_host"
    cmd = [compiler, *BUILD_COMMANDS[request.param], f"-I{CSRC}", str(HOST_SOURCE), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.fail(f"building the host step failed:\n{' '.join(cmd)}\n{built.stdout}{built.stderr}")
    return exe


# ----------------------------------------------------------------------------------------------
# float32 arithmetic the way the CUDA kernels round it


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a·b + c rounded once to float32. The float32 product is exact in float64; the float64 sum
    is made round-to-odd (its exact error from TwoSum decides the last bit), after which rounding
    to float32 is correct: rounding the plain float64 sum would round twice."""
    a, b, c = (x.double() for x in torch.broadcast_tensors(a, b, c))
    product = a * b
    total = product + c
    c_part = total - product
    error = (product - (total - c_part)) + (c - c_part)
    inexact_and_even = (error != 0) & ((total.view(torch.int64) & 1) == 0)
    toward = torch.where(error > 0, torch.inf, -torch.inf).double()
    return torch.where(inexact_and_even, torch.nextafter(total, toward), total).float()


def reference_step(
    tau: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    step: int,
    lr: float,
    *,
    cuda_rounding: bool,
) -> None:
    """grad = 2(P − B), then torch/optim/adam.py:_single_tensor_adam (no weight decay, amsgrad
    or maximize) op for op on the CPU, in place; the scalars in python double as torch has them."""
    beta1, beta2, eps = W.BETA1, W.BETA2, W.ADAM_EPS
    grad = torch.sub(P, B).mul_(2.0)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2)
    if cuda_rounding:
        exp_avg_sq.copy_(fma32(f32(1 - beta2), grad * grad, exp_avg_sq))
    else:
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
    if cuda_rounding:
        # the float64 root of a float32 rounds to the correctly rounded float32 root
        denom = exp_avg_sq.double().sqrt().float() * (f32(1.0) / f32(bias_correction2_sqrt))
    else:
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt
    denom.add_(eps)
    if cuda_rounding:
        tau.copy_(fma32(f32(-step_size), exp_avg / denom, tau))
    else:
        tau.addcdiv_(exp_avg, denom, value=-step_size)


# ----------------------------------------------------------------------------------------------
# problems: where P comes from at each step


@dataclass
class StepProblem:
    name: str
    lr: float
    tau0: torch.Tensor  # flat float32
    B: torch.Tensor
    product: Callable[[int, torch.Tensor], torch.Tensor]  # (step, τ) -> P


def wudi_problem() -> StepProblem:
    """The solver's own sequence: P = τG from the current τ, 2 layers of 32×48 with 4 tasks."""
    g = torch.Generator().manual_seed(11)
    shared = torch.randn(2, 1, 32, 48, generator=g, dtype=torch.float64) * 5e-4
    tv = (torch.randn(2, 4, 32, 48, generator=g, dtype=torch.float64) * 1e-3 + shared).float()
    problem = W.precompute(tv, orientation="gram")
    shape = problem.init.shape
    return StepProblem(
        "wudi", 1e-5, problem.init.flatten(), problem.B.flatten(),
        lambda step, tau: problem.product(tau.view(shape)).flatten(),
    )


def random_problem() -> StepProblem:
    """Random P every step around a fixed B, per-element gradient scales from 1e-12 to 1e2, some
    at 1e-20 (squares are subnormal or zero, eps dominates), some with P = B exactly."""
    g = torch.Generator().manual_seed(12)
    n = 2048
    scale = torch.pow(10.0, torch.empty(n).uniform_(-12, 2, generator=g))
    kind = torch.rand(n, generator=g)
    scale[kind < 0.05] = 1e-20
    zero_gradient = kind > 0.95
    B = torch.randn(n, generator=g) * scale  # B of the gradient's size, so that P − B keeps its bits
    offsets = torch.randn(STEPS, n, generator=g) * scale
    offsets[:, zero_gradient] = 0
    Ps = B + offsets
    Ps[:, zero_gradient] = B[zero_gradient]
    return StepProblem("random", 1e-3, torch.randn(n, generator=g) * 1e-2, B, lambda step, tau: Ps[step - 1])


PROBLEMS = {"wudi": wudi_problem, "random": random_problem}


def run_reference(problem: StepProblem, *, cuda_rounding: bool):
    """[STEPS, n] trajectories of τ, exp_avg, exp_avg_sq after each step, and the P of each step."""
    tau = problem.tau0.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(tau), torch.zeros_like(tau)
    Ps, states = [], []
    for step in range(1, STEPS + 1):
        P = problem.product(step, tau)
        reference_step(tau, exp_avg, exp_avg_sq, P, problem.B, step, problem.lr, cuda_rounding=cuda_rounding)
        Ps.append(P.clone())
        states.append(torch.stack([tau, exp_avg, exp_avg_sq]))
    return torch.stack(Ps), torch.stack(states)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """[STEPS, 3, n] states; on mismatch, name the first step and state that differ."""
    assert got.shape == want.shape, (got.shape, want.shape)
    differs = got.view(torch.int32) != want.view(torch.int32)
    if not bool(differs.any()):
        return
    step, state = (int(i) for i in differs.any(dim=2).nonzero()[0])
    idx = int(differs[step, state].nonzero()[0])
    total = int(differs.any(dim=1).sum())
    pytest.fail(
        f"{what}: {STATE_NAMES[state]} first differs after step {step + 1} (element {idx}: "
        f"{got[step, state, idx].item()!r} vs {want[step, state, idx].item()!r}); "
        f"{total} element-steps differ in some state"
    )


# ----------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_reference_with_cpu_rounding_is_torch_optim_adam(name):
    problem = PROBLEMS[name]()
    _, reference = run_reference(problem, cuda_rounding=False)

    param = torch.nn.Parameter(problem.tau0.clone())
    optimizer = torch.optim.Adam([param], lr=problem.lr, betas=(W.BETA1, W.BETA2), eps=W.ADAM_EPS, foreach=False)
    tau = problem.tau0.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(tau), torch.zeros_like(tau)
    optimizer_states, driver_states = [], []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            param.grad = torch.sub(problem.product(step, param.detach()), problem.B).mul_(2.0)
        optimizer.step()
        state = optimizer.state[param]
        optimizer_states.append(torch.stack([param.detach(), state["exp_avg"], state["exp_avg_sq"]]))
        grad = torch.sub(problem.product(step, tau), problem.B).mul_(2.0)
        W.adam_update_torch(tau, exp_avg, exp_avg_sq, grad, step, problem.lr)
        driver_states.append(torch.stack([tau, exp_avg, exp_avg_sq]))
    optimizer_states = torch.stack(optimizer_states)
    assert (optimizer_states[-1, 0] != problem.tau0).float().mean() > 0.75  # the iterates moved
    assert_same_bits(reference, optimizer_states, "reference_step(cuda_rounding=False) vs torch.optim.Adam")
    assert_same_bits(torch.stack(driver_states), optimizer_states, "wudi_solve.adam_update_torch vs torch.optim.Adam")


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_host_build_of_kernel_step_matches_cuda_rounded_reference(host_step_program, name, tmp_path):
    problem = PROBLEMS[name]()
    Ps, reference = run_reference(problem, cuda_rounding=True)
    n = problem.tau0.numel()
    # the scalars as the driver hands them to the extension; the reference derives its own
    with open(tmp_path / "input.bin", "wb") as f:
        f.write(np.array([n, STEPS], dtype="<i8").tobytes())
        f.write(problem.tau0.numpy().astype("<f4").tobytes())
        f.write(problem.B.numpy().astype("<f4").tobytes())
        for step in range(1, STEPS + 1):
            f.write(np.array(W.kernel_step_scalars(step, problem.lr), dtype="<f8").tobytes())
            f.write(Ps[step - 1].numpy().astype("<f4").tobytes())
    ran = subprocess.run(
        [str(host_step_program), str(tmp_path / "input.bin"), str(tmp_path / "output.bin")],
        capture_output=True, text=True, timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    host = torch.from_numpy(np.fromfile(tmp_path / "output.bin", dtype="<f4").astype(np.float32))
    assert host.numel() == STEPS * 3 * n
    assert_same_bits(host.view(STEPS, 3, n), reference, f"host step ({host_step_program.parent.name}) vs reference")


def _cpu_op_cases():
    """(op, CPU torch, the kernel's CUDA rounding, same?) over inputs x, y (any sign), d > 0."""
    w, c, beta2 = 1 - W.BETA1, 1 - W.BETA2, W.BETA2
    bc2_sqrt = (1 - W.BETA2**3.0) ** 0.5
    value = -0.7  # |value·m/d| comparable with the addend, so its rounding shows

    def correctly_rounded(op):
        return lambda *args: op(*(a.double() for a in args)).float()

    return [
        ("sub", lambda x, y, d: torch.sub(x, y), correctly_rounded(lambda x, y, d: x - y), True),
        ("mul_", lambda x, y, d: x.clone().mul_(beta2), lambda x, y, d: correctly_rounded(torch.mul)(x, f32(beta2)), True),
        ("lerp_", lambda x, y, d: x.clone().lerp_(y, w), lambda x, y, d: fma32(f32(w), y - x, x), True),
        ("add_", lambda x, y, d: d.clone().add_(W.ADAM_EPS),
         lambda x, y, d: correctly_rounded(torch.add)(d, f32(W.ADAM_EPS)), True),
        ("addcmul_", lambda x, y, d: d.clone().addcmul_(y, y, value=c), lambda x, y, d: fma32(f32(c), y * y, d), False),
        ("div", lambda x, y, d: d / bc2_sqrt, lambda x, y, d: d * (f32(1.0) / f32(bc2_sqrt)), False),
        ("addcdiv_", lambda x, y, d: x.clone().addcdiv_(y, d, value=value),
         lambda x, y, d: fma32(f32(value), y / d, x), False),
    ]


@pytest.mark.parametrize("op,cpu,cuda,same", _cpu_op_cases(), ids=[case[0] for case in _cpu_op_cases()])
def test_which_cpu_ops_round_like_the_kernel(op, cpu, cuda, same):
    g = torch.Generator().manual_seed(13)
    n = 4096
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    d = torch.rand(n, generator=g) * 1e-3 + 1e-6  # small like exp_avg_sq, so eps = 1e-8 counts
    differ = int((cpu(x, y, d).view(torch.int32) != cuda(x, y, d).view(torch.int32)).sum())
    if same:
        assert differ == 0, f"CPU torch's {op} rounds unlike the CUDA kernel in {differ}/{n} elements"
    else:
        # if this fails, CPU torch now rounds {op} like CUDA: use the torch op in reference_step
        assert differ > 0, f"CPU torch's {op} now rounds like the CUDA kernel in all {n} elements"


def test_cpu_sqrt_is_correctly_rounded_unless_mkl_computes_it():
    g = torch.Generator().manual_seed(14)
    d = torch.rand(4096, generator=g) * 1e-3 + 1e-6
    cpu = d.sqrt().view(torch.int32).long()
    correct = d.double().sqrt().float().view(torch.int32).long()  # as CUDA's sqrt.rn rounds
    ulps = int((cpu - correct).abs().max())  # positive floats: ulps apart = int bits apart
    if torch.backends.mkl.is_available():
        assert ulps <= 1, f"MKL's VML_HA sqrt should be within 1 ulp, got {ulps}"
    else:
        assert ulps == 0, f"CPU torch's vectorized sqrt is {ulps} ulp off the correctly rounded root"
