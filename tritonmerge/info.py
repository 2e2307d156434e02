"""``tritonmerge info`` / ``python -m tritonmerge.info``: versions, devices, and for every method
which backends can run here — and, for each that cannot, why."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__}: {exc})".splitlines()[0]
    return getattr(mod, "__version__", "installed")


def collect() -> dict[str, Any]:
    """The facts ``info_text`` prints, as a dict (for tests and bug reports)."""
    import torch

    from . import __version__, backends
    from .backends import self_check
    from .catalog import get_method, list_methods

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
    ext, ext_why = backends.extension_status()
    cpu_why = backends.cpu_status(checked=False)
    methods = {}
    for name in list_methods():
        spec = get_method(name)
        methods[name] = backends.method_backends(spec)
    return {
        "tritonmerge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "safetensors": _version("safetensors"),
        "transformers": _version("transformers"),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices,
        "backend_env": os.environ.get("TRITONMERGE_BACKEND", "auto"),
        "triton_status": backends.triton_status(),
        "extension_status": ext_why,
        "cpu_status": cpu_why,
        "self_check": _self_check_lines(backends.triton_status(), ext_why, cpu_why),
        "self_check_cache": str(self_check.cache_path()),
        "methods": methods,
        "ops": backends.op_backends(),
    }


def _self_check_lines(triton_why: str | None, ext_why: str | None, cpu_why: str | None) -> dict[str, str]:
    """Per fast backend, its self-check on each device it would run on (info never runs a check)."""
    import torch

    from .backends import self_check

    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    where = {
        "cpu": (cpu_why, [torch.device("cpu")]),
        "triton": (triton_why, [torch.device("cpu")] if interpreter else gpus),
        "cuda": (ext_why, gpus),
    }
    lines = {}
    for backend, (why, devices) in where.items():
        if why is not None or not devices:
            lines[backend] = "not applicable (backend unavailable)"
        else:
            lines[backend] = self_check.status_line(backend, devices)
    return lines


def info_text() -> str:
    """A readable report of versions, devices and backend availability."""
    d = collect()
    ok = lambda why: "available" if why is None else f"unavailable: {why}"  # noqa: E731
    lines = [
        f"tritonmerge   {d['tritonmerge']}",
        f"python        {d['python']} ({d['platform']})",
        f"torch         {d['torch']} (CUDA {d['torch_cuda'] or 'none'}, {d['cpu_threads']} CPU threads)",
        f"triton        {d['triton']}",
        f"safetensors   {d['safetensors']}",
        f"transformers  {d['transformers']}",
        f"devices       {', '.join(d['devices'])}",
        f"TRITONMERGE_BACKEND={d['backend_env']}",
        "",
        "backends:",
        "  torch   available (the reference; always)",
        f"  cpu     {ok(d['cpu_status'])}",
        f"  triton  {ok(d['triton_status'])}",
        f"  cuda    {ok(d['extension_status'])}",
        "",
        f"self-check on first use (TRITONMERGE_SELF_CHECK=0 skips it; results cached in {d['self_check_cache']}):",
        *(f"  {backend:7s} {line}" for backend, line in d["self_check"].items()),
        "",
        "methods (backends that would run here; others with the reason):",
    ]
    for name, per_backend in d["methods"].items():
        usable = [b for b, why in per_backend.items() if why is None]
        missing = {b: why for b, why in per_backend.items() if why is not None and why != "no implementation"}
        lines.append(f"  {name:18s} {', '.join(usable)}")
        for b, why in missing.items():
            lines.append(f"  {'':18s}   {b}: {why}")
    lines += ["", "building blocks of the analyses (backends that could run here, best first):"]
    for op, per_backend in d["ops"].items():
        usable = [b for b, why in per_backend.items() if why is None]
        lines.append(f"  {op:18s} {', '.join(usable)}")
    lines.append("(a merge names the backend that ran each tensor in tritonmerge_report.json, and each analysis op in tritonmerge_decisions.json)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(info_text())
