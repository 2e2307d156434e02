"""One timed run in a fresh process: ``python -m benchmarks.e2e.child TOOL ... --result FILE``.

The parent measures wall time and peak RSS of this whole process (``os.wait4``); this side adds
the split into import time and run time and, on CUDA, the peak device memory. It must run
under the mergekit virtualenv too, so it imports only the standard library at module level
(never ``tritonmerge`` unless asked to run it).

Tools:
  tritonmerge CONFIG OUT [--device D] [--nproc N]
                                        the ``tritonmerge merge`` command, in process (with
                                        N > 1 it starts N ranks through torch's launcher)
  mergekit CONFIG OUT [--device D]      the ``mergekit-yaml`` command with its default options
  floor OUT --inputs DIR...             the I/O floor: read every input with safetensors, write one
                                        output the size of the first input (the base)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _run_tritonmerge(config: str, out: str, device: str, nproc: int = 1) -> dict:
    from tritonmerge import __version__
    from tritonmerge.cli import main
    import tritonmerge.engine  # noqa: F401  (the CLI imports it lazily; torch comes with it)

    # torch is imported before the clock starts, as for the floor (safetensors.torch) and
    # mergekit: "merge s" compares the work, not whose import of torch falls inside it
    imported = time.perf_counter()
    argv = ["merge", config, out, "--quiet"]
    if device != "cpu":
        argv += ["--device", device]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    rc = main(argv)
    return {"rc": rc, "imported_at": imported, "tool_version": __version__, "source_hash": _source_hash()}


def _source_hash() -> str:
    """Hash of tritonmerge's Python and C sources as imported: the tree may change between
    runs while it is being worked on, and samples from different code must not be pooled."""
    import hashlib

    import tritonmerge

    pkg = Path(tritonmerge.__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted([*pkg.rglob("*.py"), *(pkg.parent / "csrc").rglob("*.c*")]):
        h.update(f.as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _run_mergekit(config: str, out: str, device: str) -> dict:
    import importlib.metadata

    from mergekit.scripts.run_yaml import main

    imported = time.perf_counter()
    # mergekit-yaml with its default options (no --lazy-unpickle: irrelevant for safetensors);
    # --quiet only silences the progress bar
    args = [config, out, "--quiet"]
    if device != "cpu":
        args += ["--cuda"]
    try:
        main.main(args=args, standalone_mode=False)
        rc = 0
    except SystemExit as exc:  # click may still exit on errors
        rc = int(exc.code or 0)
    return {"rc": rc, "imported_at": imported, "tool_version": importlib.metadata.version("mergekit")}


def _run_floor(out: str, inputs: list[str]) -> dict:
    """Read every input tensor into memory and write one output of the base's size, shard by
    shard, holding one base shard at a time. Nothing is computed: this is the least any
    disk-to-disk merge of these inputs must do with safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    imported = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=False)
    folders = [Path(p) for p in inputs]
    shard_lists = [sorted(f.glob("*.safetensors")) for f in folders]
    read = written = 0
    for i, base_file in enumerate(shard_lists[0]):
        kept = {}
        for m, files in enumerate(shard_lists):
            with safe_open(str(files[i]), framework="pt") as f:
                for key in f.keys():
                    # get_tensor maps the file lazily (safetensors >= 0.6): copy, so that
                    # every input byte is really read, as any merge must
                    t = f.get_tensor(key).clone()
                    read += t.numel() * t.element_size()
                    if m == 0:
                        kept[key] = t
                    del t
        save_file(kept, str(out_dir / base_file.name), metadata={"format": "pt"})
        written += sum(t.numel() * t.element_size() for t in kept.values())
        del kept
    return {"rc": 0, "imported_at": imported, "tool_version": "", "bytes_read": read, "bytes_written": written}


def _peak_rss() -> int | None:
    """VmHWM: this process's peak resident set. Unlike the parent's ru_maxrss from wait4, it
    starts afresh at exec, so the parent's own memory (inherited through fork) is not counted."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.e2e.child")
    p.add_argument("tool", choices=["tritonmerge", "mergekit", "floor"])
    p.add_argument("paths", nargs="+", help="CONFIG OUT (tools) or OUT (floor)")
    p.add_argument("--inputs", nargs="*", default=[])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.tool == "tritonmerge":
        info = _run_tritonmerge(args.paths[0], args.paths[1], args.device, args.nproc)
    elif args.tool == "mergekit":
        info = _run_mergekit(args.paths[0], args.paths[1], args.device)
    else:
        info = _run_floor(args.paths[0], args.inputs)
    finished = time.perf_counter()

    import torch

    info["import_s"] = info.pop("imported_at") - started
    info["run_s"] = finished - started - info["import_s"]
    info["peak_rss_bytes"] = _peak_rss()
    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        info["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    Path(args.result).write_text(json.dumps(info))
    return int(info["rc"])


if __name__ == "__main__":
    sys.exit(main())
