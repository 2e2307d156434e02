"""One writer per output folder: an exclusive ``flock`` on a lock file beside it.

The lock is taken before the hidden partial folder is touched and held until the output is
committed or the run fails. The operating system releases it when the process dies, however it
dies (``kill -9`` included), so a stale lock file never blocks ``--resume``: only a live holder
does. The holder writes its pid into the file so the refusal can say who holds it.

The holder deletes the lock file while it still holds the lock. A process that opened the old
file just before that would then hold a lock on a file no longer in the folder, so after locking
we check that the path still names the file we locked, and start over if it does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(out_dir: Path) -> Path:
    """The lock file of an output folder (beside it, like the partial folder)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.tritonmerge-lock"


class OutputLock:
    """``with OutputLock(out_dir):`` holds the output folder's lock, or raises
    ``OutputLockedError`` at once (it never waits)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = lock_path(self.out_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _wait_for_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise OutputLockedError(
                    f"another tritonmerge ({who}) is writing {self.out_dir}; wait for it to finish or stop it "
                    f"(lock file {self.path})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return

    def holder(self) -> int | None:
        """The pid holding the lock now (0 if unknown), or None when no live process holds it;
        takes nothing."""
        if fcntl is None or not self.path.exists():  # pragma: no cover - Windows
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: see the module docstring
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _wait_for_pid(fd: int, seconds: float = 1.0) -> int | None:
    """The holder's pid. A holder writes it right after taking the lock, so a refusal that comes
    in between reads an empty file: look again for a moment before answering "unknown"."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        pid = _read_pid(fd)
        if pid or time.monotonic() >= deadline:
            return pid
        time.sleep(0.01)
