"""Driving the real ``tritonmerge`` command line in subprocesses, on real files.

The safety tests (tests/test_safety_*.py) go through these helpers rather than calling the
engine in-process: what they prove (inputs untouched, one writer, kill and resume, refused runs
leaving nothing) is about processes, files and signals.

``run_cli_with`` runs the CLI after a few lines of Python that replace one function of the
engine (the file layer of the writer, say) or kill the process at a chosen point with a real
SIGKILL: the only way to make a disk fill up or a process die at an exact moment, every time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tritonmerge

from tritonmerge.io.lock import lock_path
from tritonmerge.io.writer import partial_dir, replaced_dir

REPO = Path(tritonmerge.__file__).parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("TRITONMERGE_BACKEND", None)
    return env


def run_cli(*args: str | os.PathLike, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """``tritonmerge ARGS`` (as ``python -m tritonmerge``), waited for."""
    return subprocess.run(
        [sys.executable, "-m", "tritonmerge", *map(str, args)],
        capture_output=True, text=True, env=cli_env(**env), timeout=timeout,
    )


def start_cli(*args: str | os.PathLike, **env: str) -> subprocess.Popen:
    """``tritonmerge ARGS`` started, not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "tritonmerge", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(**env),
    )


def cli_script(prelude: str, script_dir: Path) -> Path:
    """A script that runs ``prelude`` and then the CLI's ``main(sys.argv[1:])`` (for a fresh
    interpreter, or for torchrun to start once per rank)."""
    script = script_dir / f"cli_with_{hashlib.sha1(prelude.encode()).hexdigest()[:10]}.py"
    script.write_text(
        textwrap.dedent(prelude) + "\nimport sys\nfrom tritonmerge.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8",
    )
    return script


def die_inside_shard(nth: int, only_if: str = "True") -> str:
    """A prelude that SIGKILLs the process right after the first bytes of the ``nth`` shard file
    it opens (when the expression ``only_if`` holds, e.g. for one rank)."""
    return f"""
import os, signal
if {only_if}:
    import tritonmerge.io.writer as w
    _open = w.open_shard_file
    opened = []
    class DiesAfterFirstWrite:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            self.f.write(data)
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name):
            return getattr(self.f, name)
    def open_shard_file(path):
        opened.append(path)
        f = _open(path)
        return DiesAfterFirstWrite(f) if len(opened) == {nth} else f
    w.open_shard_file = open_shard_file
"""


def run_cli_with(prelude: str, *args: str | os.PathLike, script_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI's ``main(ARGS)`` in a fresh interpreter, after running ``prelude`` there."""
    script = cli_script(prelude, script_dir)
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=cli_env(), timeout=timeout
    )


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or link target) of everything under ``folder``, to prove it unchanged."""
    out: dict[str, str] = {}
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def leftovers(out: Path) -> list[Path]:
    """The engine's working paths beside ``out`` that exist (none should, after a finished or
    refused run)."""
    out = Path(os.path.realpath(out))
    return [p for p in (partial_dir(out), replaced_dir(out), lock_path(out)) if os.path.lexists(p)]


def assert_refused(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, each fragment in that line."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    line = lines[0]
    assert line.startswith("tritonmerge: error: "), line
    for f in fragments:
        assert f in line, f"{f!r} not in: {line}"
    return line
