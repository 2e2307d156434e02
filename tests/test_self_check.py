"""The fast backends' self-check on first use (tritonmerge/backends/self_check.py) and the fallback it drives.

On the CPU the triton backend runs under the Triton interpreter (the ``device`` fixture). Broken
kernels are injected through the method registry (``MergeMethod.impls``, the table
``backends.choose`` dispatches through), never by editing kernel code. Auto selection never
picks the interpreter for CPU tensors, so the fallback tests widen ``backends.auto_candidates``.
Every test gets its own cache file and a fresh process state."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import tritonmerge
import tritonmerge as tm
from tritonmerge import backends, info
from tritonmerge.backends import self_check
from tritonmerge.context import MergeReport
from tritonmerge.errors import BackendUnavailableError, ParameterError
from tritonmerge.backends.triton import merge as F
from tritonmerge.ops import wudi_solve
from tritonmerge.catalog import get_method
from tritonmerge.registry import Implementation
from tritonmerge.testing import make_inputs

TIES_CHECK = "fused_merge (ties, exact top-k with ties)"


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "self_check.json"
    monkeypatch.setenv(self_check.CACHE_ENV, str(path))
    monkeypatch.delenv(self_check.SWITCH_ENV, raising=False)
    self_check.reset()
    yield path
    self_check.reset()  # injected failures must not outlive the test


def _inject(monkeypatch, method: str, fn) -> None:
    real = get_method(method).impls["triton"]
    monkeypatch.setitem(get_method(method).impls, "triton", Implementation("triton", fn, real.supports))


def _raising(base, experts, params, ctx):
    raise RuntimeError("injected: PTX assembly failed")


def _wrong_values(base, experts, params, ctx):
    from tritonmerge.methods.task_arithmetic import lower

    spec = lower(get_method("ties").family, params, ctx, base, len(experts), "ties")
    out = F.merge_triton(spec, base, experts).clone()
    out.view(-1)[5] += 0.25
    return out


def _count_calls(monkeypatch, backend: str) -> dict[str, int]:
    calls = {name: 0 for name in self_check.CHECKS[backend]}
    for name, check in list(self_check.CHECKS[backend].items()):
        def counted(device, _name=name, _check=check):
            calls[_name] += 1
            _check(device)

        monkeypatch.setitem(self_check.CHECKS[backend], name, counted)
    return calls


def _auto_tries_triton(monkeypatch) -> None:
    monkeypatch.setattr(backends, "auto_candidates", lambda base: ("triton", "cpu", "torch"))


def _fallback_backend() -> str:
    return "cpu" if backends.cpu_status() is None else "torch"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tritonmerge" and r.levelno == logging.WARNING]


def test_a_pass_is_cached_and_not_run_again(device, cache, monkeypatch):
    calls = _count_calls(monkeypatch, "triton")
    assert self_check.failure("triton", device) is None
    assert set(calls.values()) == {1}, "every triton kernel ran once"
    entries = json.loads(cache.read_text())["entries"]
    (entry,) = entries.values()
    assert entry["passed"] is True and entry["backend"] == "triton"
    assert self_check.failure("triton", device) is None
    self_check.reset()  # as a new process on the same machine
    base, experts = make_inputs((9, 7), 2, torch.float32, device=device)
    assert tm.merge_tensors("ties", base, experts, backend="triton").shape == base.shape
    assert set(calls.values()) == {1}, "the cached pass is not run again"


def test_a_raising_kernel_disables_triton(device, cache, monkeypatch, caplog):
    _inject(monkeypatch, "ties", _raising)
    why = self_check.failure("triton", device)
    assert why is not None and why.startswith("self-check failed on ")
    assert TIES_CHECK in why and "RuntimeError: injected: PTX assembly failed" in why
    base, experts = make_inputs((9, 7), 2, torch.bfloat16, device=device)
    for method in ("ties", "linear"):  # the backend is off, not only the kernel that raised
        with pytest.raises(BackendUnavailableError, match="self-check failed.*PTX assembly failed"):
            tm.merge_tensors(method, base, experts, backend="triton")
    with pytest.raises(BackendUnavailableError, match="self-check failed"):  # the building blocks too
        backends.run_op("kth_largest", (experts[0].float() - base.float()).abs(), 1, backend="triton")

    _auto_tries_triton(monkeypatch)
    caplog.set_level(logging.WARNING, logger="tritonmerge")
    report = MergeReport()
    out = tm.merge_tensors("ties", base, experts, name="w", report=report)
    assert report.backends["w"] == _fallback_backend()
    assert torch.equal(out, tm.merge_tensors("ties", base, experts, name="w", backend="torch"))
    tm.merge_tensors("ties", base, experts, name="w2")
    (line,) = _warnings(caplog)  # one line per process, not per tensor
    assert "\n" not in line
    assert f"the triton backend failed its self-check on {self_check.describe_device('triton', base.device)}" in line
    assert "PTX assembly failed" in line
    assert f"the merge continues on the {_fallback_backend()} backend" in line
    assert "issue tracker" in line and "`tritonmerge info`" in line


def test_a_wrong_kernel_disables_triton_and_the_failure_is_cached(device, cache, monkeypatch):
    with monkeypatch.context() as patch:
        _inject(patch, "ties", _wrong_values)
        why = self_check.failure("triton", device)
    assert why is not None and TIES_CHECK in why and "exceed the error budget" in why
    base, experts = make_inputs((9, 7), 2, torch.bfloat16, device=device)
    with pytest.raises(BackendUnavailableError, match="exceed the error budget"):
        tm.merge_tensors("ties", base, experts, backend="triton")

    self_check.reset()  # a new process: the real kernel is back, but the cache remembers
    calls = _count_calls(monkeypatch, "triton")
    assert self_check.failure("triton", device) == why
    assert set(calls.values()) == {0}, "a cached failure disables without running anything"
    assert "failed, cached " in self_check.status_line("triton", [torch.device(device)])


@pytest.mark.parametrize("change", ["tritonmerge", "torch", "triton", "kernel sources", "driver"])
def test_the_cache_is_keyed_by_versions_and_sources(device, cache, monkeypatch, change):
    calls = {"n": 0}

    def cheap_check(dev):
        calls["n"] += 1

    monkeypatch.setitem(self_check.CHECKS, "triton", {"cheap": cheap_check})
    assert self_check.failure("triton", device) is None
    self_check.reset()
    assert self_check.failure("triton", device) is None and calls["n"] == 1
    self_check.reset()
    if change == "tritonmerge":
        monkeypatch.setattr(tritonmerge, "__version__", "99.0")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    elif change == "triton":
        monkeypatch.setattr(self_check, "_package_version", lambda name: "0.0.1")
    elif change == "kernel sources":
        self_check._source_hashes["triton"] = "an edited kernel"
    else:
        real = self_check._device_facts
        monkeypatch.setattr(self_check, "_device_facts", lambda b, d: {**real(b, d), "driver": "999.1"})
    assert self_check.failure("triton", device) is None
    assert calls["n"] == 2, f"a changed {change} runs the check again"
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_a_damaged_cache_means_check_again(device, cache, monkeypatch):
    calls = {"n": 0}
    monkeypatch.setitem(self_check.CHECKS, "triton", {"cheap": lambda dev: calls.__setitem__("n", calls["n"] + 1)})
    cache.write_text("{not json")
    assert self_check.failure("triton", device) is None and calls["n"] == 1
    assert json.loads(cache.read_text())["format"] == self_check.CACHE_FORMAT
    assert not [p.name for p in cache.parent.iterdir() if p.name.startswith(".self_check-")], "no temporary left"


def test_switch_zero_skips_the_check(device, cache, monkeypatch):
    monkeypatch.setenv(self_check.SWITCH_ENV, "0")
    calls = _count_calls(monkeypatch, "triton")
    _inject(monkeypatch, "ties", _raising)
    assert self_check.failure("triton", device) is None
    base, experts = make_inputs((9, 7), 2, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="PTX assembly failed"):  # the kernel itself ran, unchecked
        tm.merge_tensors("ties", base, experts, backend="triton")
    assert set(calls.values()) == {0} and not cache.exists()
    assert info.collect()["self_check"]["cpu"] == "skipped (TRITONMERGE_SELF_CHECK=0)"


def test_a_kernel_raising_on_a_real_shape_falls_back_under_auto_only(device, cache, monkeypatch, caplog):
    """The check's small input passes; the real tensor makes the kernel raise (a compile error on
    a new shape): auto redoes the call on the next backend, an explicit request re-raises."""
    real = get_method("ties").impls["triton"].fn

    def fails_on_large(base, experts, params, ctx):
        if base.numel() > 500:
            raise RuntimeError("injected: out of shared memory for this block size")
        return real(base, experts, params, ctx)

    _inject(monkeypatch, "ties", fails_on_large)
    monkeypatch.setitem(self_check.CHECKS, "triton", {TIES_CHECK: self_check.CHECKS["triton"][TIES_CHECK]})
    base, experts = make_inputs((40, 30), 2, torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="out of shared memory"):
        tm.merge_tensors("ties", base, experts, backend="triton")

    _auto_tries_triton(monkeypatch)
    caplog.set_level(logging.WARNING, logger="tritonmerge")
    report = MergeReport()
    out = tm.merge_tensors("ties", base, experts, name="big", report=report)
    assert report.backends["big"] == _fallback_backend()
    assert torch.equal(out, tm.merge_tensors("ties", base, experts, name="big", backend="torch"))
    (line,) = _warnings(caplog)
    assert "the triton backend raised during a merge" in line and "'big'" in line and "out of shared memory" in line
    with pytest.raises(BackendUnavailableError, match="after raising during a merge.*out of shared memory"):
        tm.merge_tensors("ties", base, experts, backend="triton")
    monkeypatch.setenv(self_check.SWITCH_ENV, "0")  # skipping the check does not forget what a merge showed
    assert self_check.failure("triton", device) is not None
    entries = json.loads(cache.read_text())["entries"].values()
    assert all(e["passed"] for e in entries), "run-time failures are not cached"


def test_input_errors_from_a_kernel_are_not_a_fallback(device, cache, monkeypatch):
    def rejects(base, experts, params, ctx):
        raise ParameterError("ties: injected parameter error")

    monkeypatch.setitem(self_check.CHECKS, "triton", {"cheap": lambda dev: None})
    _inject(monkeypatch, "ties", rejects)
    _auto_tries_triton(monkeypatch)
    base, experts = make_inputs((40, 30), 2, torch.float32, device=device)
    with pytest.raises(ParameterError, match="injected parameter error"):
        tm.merge_tensors("ties", base, experts)
    assert not self_check.disabled("triton", device)


def test_wudi_solver_skips_a_disabled_cuda_backend(cache, monkeypatch, caplog):
    """The WUDI solve dispatch consults the same record as backends.choose."""
    from tritonmerge.backends import cuda as cuda_backend

    fake_extension = type("FakeExtension", (), {"wudi_adam_step": staticmethod(lambda *a: None)})()
    monkeypatch.setattr(backends, "extension_status", lambda: (fake_extension, None))
    monkeypatch.setattr(cuda_backend, "extension_status", lambda: (fake_extension, None))
    gpu = torch.device("cuda", 0)

    def wrong_step(device):
        raise AssertionError("cuda wudi_adam_step (torch.float32): 12 of 256 elements exceed the error budget")

    monkeypatch.setitem(self_check.CHECKS, "cuda", {"wudi_adam_step": wrong_step})
    caplog.set_level(logging.WARNING, logger="tritonmerge")
    layers = 0.1 * torch.randn(1, 2, 4, 3)  # solved where they are (the CPU): only the choice is under test
    used, (merged, _) = backends.dispatch("wudi_solve", layers, device=gpu, steps=2)
    assert used == "torch" and merged.shape == (1, 4, 3)
    (line,) = _warnings(caplog)
    assert "the cuda backend failed its self-check on cuda:0" in line
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run wudi_solve on cuda:0: self-check failed on cuda:0"):
        backends.run_op("wudi_solve", layers, device=gpu, backend="cuda", steps=2)


def test_info_shows_each_backends_check(device, cache, monkeypatch):
    if (why := backends.cpu_status(checked=False)) is not None:
        pytest.skip(f"the fused CPU loops are unavailable here: {why}")
    assert info.collect()["self_check"]["cpu"] == "cpu: not run yet (runs on first use)"
    assert backends.cpu_status() is None  # runs the cpu backend's check
    with monkeypatch.context() as patch:
        _inject(patch, "ties", _raising)
        assert self_check.failure("triton", device) is not None
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(tritonmerge.__file__).parents[1]),
        "TRITON_INTERPRET": "1",
        self_check.CACHE_ENV: str(cache),
    }
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "-m", "tritonmerge", "info"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"results cached in {cache}" in r.stdout
    assert "  cpu     cpu: passed, cached " in r.stdout
    if not torch.cuda.is_available():
        assert "  triton  cpu-interpreter: failed, cached " in r.stdout
        assert "PTX assembly failed" in r.stdout


@pytest.mark.gpu
def test_the_real_kernels_pass_on_this_gpu(cache):
    """The checks themselves, on a real device: none of them may fail on a correct kernel."""
    gpu = torch.device("cuda", 0)
    assert backends.triton_status() is None
    assert self_check.run_checks("triton", gpu) is None
    if backends.extension_status()[0] is not None:
        assert self_check.run_checks("cuda", gpu) is None
