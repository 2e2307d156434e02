"""Command line: ``tritonmerge merge CONFIG.yml OUT_DIR``, ``tritonmerge demo [DIR]``, ``tritonmerge info``,
``tritonmerge mergekit-yaml CONFIG OUT [mergekit options]``.

A ``TritonMergeError`` is printed as one line (``tritonmerge: error: ...``) with exit code 2 and
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from .errors import TritonMergeError

EXIT_USAGE = 2

# The OpenMP runtime that torch loads, and the fused CPU loops share, keeps idle workers spinning
# for about a millisecond after every parallel region; between the per-tensor calls of a merge
# that spinning takes the cores the reader and writer threads need (about 0.2 CPU-seconds of a
# half-second 150M merge on two cores). A CLI process shortens it before torch is loaded, unless
# the user chose a policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT); ranks started by --nproc inherit it.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["GOMP_SPINCOUNT"] = "10000"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="tritonmerge",
        description="Merge a base checkpoint with fine-tuned experts (mergekit-compatible YAML).",
    )
    p.add_argument("--version", action="version", version=f"tritonmerge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge the models named in a YAML config into OUT_DIR")
    m.add_argument("config", metavar="CONFIG.yml", help="merge config (mergekit schema)")
    m.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; must not exist unless --overwrite/--resume)")
    m.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N] (default: cpu)")
    m.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB, or mergekit's counts 5B, 500M (5B = 5·10⁹ bytes) (default: 5GB)")
    m.add_argument("--disk-margin", default="64MiB", help="free space to leave on the output disk after the merge; a merge that would leave less is refused before it starts (default: 64MiB)")
    m.add_argument("--memory-budget", default="256MiB", help="input bytes (all models) per work unit before a tensor is merged in row chunks, where its method allows (default: 256MiB)")
    m.add_argument("--backend", default=None, help="auto | cuda | triton | cpu | torch (default: TRITONMERGE_BACKEND or auto)")
    m.add_argument("--dry-run", action="store_true", help="print the plan (tensors, memory, output size) and exit")
    m.add_argument("--resume", action="store_true", help="continue an interrupted merge, keeping verified shards")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder that is a previous tritonmerge output (or empty); never an input")
    m.add_argument("--force-overwrite", action="store_true", help="with --overwrite: also replace an output folder that is not a tritonmerge output (it still may not be, hold or lie inside an input)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge NaN/Inf inputs and write NaN/Inf results with a warning instead of stopping")
    m.add_argument("--no-prefetch", action="store_true", help="read inputs on the main thread (less memory, slower)")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
    # mergekit-yaml's options (mergekit 0.1.5, MergeOptions); docs/mergekit.md has the table
    m.add_argument("--cuda", action="store_true", help="mergekit's --cuda: the same as --device cuda")
    m.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True, help="copy the base model's tokenizer files to the output (default)")
    m.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="do not copy tokenizer files to the output")
    m.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True, help="write README.md (model card) in the output (default)")
    m.add_argument("--no-write-model-card", dest="write_model_card", action="store_false", help="write no README.md model card")
    m.add_argument("--random-seed", type=int, default=None, metavar="N", help="seed of the random methods (dare_*, della*, breadcrumbs...): their `seed` parameter where the config sets none")
    for flag, why in _UNNEEDED.items():
        m.add_argument(flag, action="store_true", help=f"accepted for mergekit compatibility; unneeded: {why}")
    m.add_argument("--nproc", type=int, default=1, metavar="N", help="merge with N local processes (torch.distributed, started through torch's own launcher; with --device cuda one per GPU); for several machines start `torchrun ... -m tritonmerge merge` yourself (default: 1)")

    d = sub.add_parser("demo", help="build a small Llama-shaped base + 3 experts and merge them with wudi and ties")
    d.add_argument("dir", nargs="?", default="tritonmerge_demo", help="folder for the demo (default: ./tritonmerge_demo)")
    d.add_argument("--device", default="cpu", help="compute device (default: cpu)")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    sub.add_parser("info", help="versions, devices and which backends can run here (and why not)")
    sub.add_parser(
        "mergekit-yaml",
        help="run mergekit's own mergekit-yaml (CONFIG OUT [its options]) with tritonmerge's methods "
        "registered in it, under tritonmerge_<name> and (unless --no-override) in place of mergekit's own; needs "
        "mergekit in this Python",
        add_help=False,
    )
    return p


# mergekit-yaml flags accepted with a one-line note: what they ask for tritonmerge always does
_UNNEEDED = {
    "--allow-crimes": "tritonmerge checks every tensor's name, shape and dtype itself and merges any architectures whose tensors match; mismatches are refused",
    "--lazy-unpickle": "inputs are always read lazily (safetensors mmap; .bin with torch.load(weights_only=True, mmap=True))",
    "--low-cpu-memory": "tensors are streamed one work unit at a time within --memory-budget",
    "--read-to-gpu": "with --device cuda tensors are already read straight to the GPU per work unit",
    "--multi-gpu": "use --nproc N with --device cuda (one process per GPU) instead",
    "--trust-remote-code": "tritonmerge never runs model code; only config.json and tensors are read",
}


def _tune_malloc() -> None:
    """Serve tensor-sized allocations (>= 1 MiB) with mmap, so freed tensors go back to the OS.

    glibc otherwise raises its mmap threshold after the first large free and carves later
    tensors out of the heap, whose freed holes stay resident: a streaming merge's RSS then grows
    to ~2x its working set. Done only here, in the process the CLI owns (MALLOC_MMAP_THRESHOLD_
    set by the user wins)."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tritonmerge`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mergekit-yaml"]:
        # every option after it is mergekit's (click parses them), so argparse never sees them
        return _mergekit_yaml(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="tritonmerge: %(message)s")
    _tune_malloc()
    try:
        if args.command == "merge":
            if args.nproc < 1:
                print(f"tritonmerge: error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
                return EXIT_USAGE
            if args.nproc > 1 and not _under_launcher():
                return _launch_ranks(args.nproc, _without_nproc(argv))
            return _merge(args)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.dir, device=args.device, quiet=args.quiet)
            return 0
        if args.command == "info":
            from .info import info_text

            print(info_text())
            return 0
    except TritonMergeError as exc:
        print(f"tritonmerge: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # the engine has said what it kept of an unfinished merge
        print("tritonmerge: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _mergekit_yaml(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="tritonmerge: %(message)s")
    try:
        from .integrations.mergekit import run_mergekit_yaml

        # --no-override is ours (mergekit has no option of that name): only tritonmerge_<name>
        override = "--no-override" not in argv
        return run_mergekit_yaml([a for a in argv if a != "--no-override"], override=override)
    except TritonMergeError as exc:
        print(f"tritonmerge: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


def one_line(text: str) -> str:
    """Errors are printed on one line, whatever the message (a YAML parser's, say) holds."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _under_launcher() -> bool:
    from .distributed import launched

    return launched()


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _launch_ranks(nproc: int, argv: Sequence[str]) -> int:
    """``--nproc N``: the same command in N processes, started by torch's launcher
    (``torch.distributed.run``, what ``torchrun`` runs) on this machine."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torch's launcher would pin every rank to 1 thread (with a banner); share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the launcher logs every rank's exit at warning/error level; the ranks' own errors and the
    # one line below say what a user needs
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launcher_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "tritonmerge", *argv]
    )
    try:
        run(launcher_args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
        if not failures:
            print(f"tritonmerge: error: the merge on {nproc} processes failed", file=sys.stderr)
            return EXIT_USAGE
        rank, first = failures[0]
        print(
            f"tritonmerge: error: {len(failures)} of {nproc} processes failed (first rank {rank}, exit code "
            f"{first.exitcode}); the reason is above",
            file=sys.stderr,
        )
        return first.exitcode if first.exitcode > 0 else EXIT_USAGE
    return 0


# glibc returns every freed block above its mmap threshold (128 KiB at first, rising to 32 MiB)
# and the top of its heap to the system at once, so each merged tensor's output buffer came from
# fresh pages that the kernel faulted in and zeroed: half of an elementwise merge's system time.
# A merge process frees buffers of the sizes it allocates next; keeping them in the heap reuses
# them. Only the CLI's own process is tuned, never a library caller's; a user's MALLOC_* or
# GLIBC_TUNABLES setting wins.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_buffers() -> None:
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    # the embeddings of a 150M model are 49 MB; glibc before 2.35 refuses more than 32 MiB
    if not mallopt(_M_MMAP_THRESHOLD, 256 << 20):
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _merge(args: argparse.Namespace) -> int:
    from .engine import MergeOptions, run_merge

    _keep_freed_buffers()

    if args.random_seed is not None and args.random_seed < 0:
        raise TritonMergeError(f"--random-seed must be at least 0, got {args.random_seed}")
    if args.cuda:
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda"):
            raise TritonMergeError(f"--cuda conflicts with --device {args.device}")
        if args.device == "cpu":
            args.device = "cuda"
    for flag in _UNNEEDED:
        if getattr(args, flag[2:].replace("-", "_")) and not args.quiet:
            print(f"tritonmerge: note: {flag} is unneeded here: {_UNNEEDED[flag]}", file=sys.stderr)

    options = MergeOptions(
        device=args.device,
        out_shard_size=args.out_shard_size,
        memory_budget=args.memory_budget,
        disk_margin=args.disk_margin,
        backend=args.backend,
        dry_run=args.dry_run,
        resume=args.resume,
        overwrite=args.overwrite,
        force_overwrite=args.force_overwrite,
        allow_nonfinite=args.allow_nonfinite,
        quiet=args.quiet,
        prefetch=not args.no_prefetch,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        random_seed=args.random_seed,
    )
    result = run_merge(args.config, args.out_dir, options)
    from .distributed import launched

    if launched() and os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 speaks for the job
    if not args.dry_run and not args.quiet:
        gbs = result.throughput / 1e9 if result.seconds > 0 else float("nan")
        print(
            f"merged {len(result.plan.names)} tensors into {result.out_dir} in {result.seconds:.2f} s "
            f"({result.bytes_read / 1e9:.3f} GB read, {gbs:.2f} GB/s)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
