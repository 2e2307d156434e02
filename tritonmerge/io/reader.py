"""Lazy per-tensor reads and a background prefetcher.

On the CPU a safetensors tensor is a zero-copy view of the file: each read maps the tensor's
byte range privately (``mmap``, copy-on-write, so nothing can reach the file) and wraps it with
``torch.frombuffer``. The merge's fused loops then read the page cache directly, with no
intermediate buffer, no copy and no fresh anonymous pages to fault in and free again. The
mapping lives exactly as long as the tensor (the tensor holds it), so the resident set stays at
the units in flight, as with copied reads. The read faults the range in with
``MADV_POPULATE_READ``, reading it from disk if it is not cached; the engine reads on its
prefetch thread, so neither page faults nor disk reads land on the compute thread. A file
truncated after planning is reported there (the kernel refuses to populate past the end)
instead of faulting later.

For CUDA (``pin_memory``), and for a tensor whose data is not aligned to its element size, the
bytes are read with ``os.preadv`` into a fresh (pinned) buffer instead: one system call, then
one host-to-device copy. A row range of a tensor is a contiguous byte range, so row-chunk reads
cost no more than the rows they return. ``.bin`` files are memory-mapped once through
``torch.load(weights_only=True, mmap=True)`` and the requested rows are copied out.

``Prefetcher`` runs the reads of the next work items on a thread while the caller computes on
the current one, holding at most ``budget_bytes`` of data read ahead.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from ..errors import CheckpointError
from .index import TensorInfo, load_bin


_PAGE = mmap.ALLOCATIONGRANULARITY
# Linux >= 5.14; older kernels answer EINVAL and get MADV_WILLNEED (read-ahead only)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class TensorReader:
    """Reads tensors described by ``TensorInfo``; keeps one descriptor per file open (and its
    size, for the bounds check of mapped reads). Thread-safe (``os.preadv`` carries its own
    offset; each mapping is private to its tensor). ``mapped=False`` copies every read."""

    def __init__(self, pin_memory: bool = False, mapped: bool | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._sizes: dict[Path, int] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._pin = pin_memory
        self._mapped = (not pin_memory) if mapped is None else mapped
        self._populate_ok = True

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                        self._sizes[path] = os.fstat(fd).st_size
                    except OSError as exc:
                        raise CheckpointError(f"cannot open {path}: {exc}") from None
                    self._fds[path] = fd
        return fd

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None, label: str = "") -> torch.Tensor:
        """The tensor (or rows ``[r0, r1)`` of its first dimension) in its stored dtype, on the CPU."""
        shape = info.shape
        if rows is not None:
            r0, r1 = rows
            shape = (r1 - r0, *info.shape[1:])
        if not info.is_safetensors:
            return self._read_bin(info, rows, label)
        numel = 1
        for s in shape:
            numel *= s
        itemsize = info.dtype.itemsize
        nbytes = numel * itemsize
        offset = info.start
        if rows is not None and info.shape:
            offset += rows[0] * (info.nbytes // max(info.shape[0], 1))
        if self._mapped and nbytes and offset % itemsize == 0:
            return self._map(info, offset, nbytes, label).view(info.dtype).view(shape)
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        if nbytes:
            view = memoryview(buf.numpy())
            fd = self._fd(info.file)
            done = 0
            while done < nbytes:
                try:
                    got = os.preadv(fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise CheckpointError(f"{label}: reading tensor {info.name!r} from {info.file} failed: {exc}") from None
                if got <= 0:
                    raise CheckpointError(
                        f"{label}: {info.file} ended while reading tensor {info.name!r} (truncated after planning?)"
                    )
                done += got
        return buf.view(info.dtype).view(shape)

    def _truncated(self, info: TensorInfo, label: str) -> CheckpointError:
        return CheckpointError(f"{label}: {info.file} ended while reading tensor {info.name!r} (truncated after planning?)")

    def _map(self, info: TensorInfo, offset: int, nbytes: int, label: str) -> torch.Tensor:
        """``nbytes`` at ``offset`` of the file as a uint8 tensor over a private mapping of just
        that range (page-aligned around it), faulted in on the calling thread; the tensor keeps
        the mapping alive."""
        fd = self._fd(info.file)
        if offset + nbytes > self._sizes[info.file]:
            raise self._truncated(info, label)
        start = offset - offset % _PAGE
        try:
            m = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{label}: reading tensor {info.name!r} from {info.file} failed: {exc}") from None
        self._populate(m, info, label)
        return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def _populate(self, m: mmap.mmap, info: TensorInfo, label: str) -> None:
        """Fault the mapping in now, reading from disk what is not cached; raises the truncation
        error if the file no longer covers it (instead of a SIGBUS on first use)."""
        if self._populate_ok:
            try:
                m.madvise(_MADV_POPULATE_READ)
                return
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # populating would have raised SIGBUS
                    raise self._truncated(info, label) from None
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                    raise CheckpointError(f"{label}: reading tensor {info.name!r} from {info.file} failed: {exc}") from None
                self._populate_ok = False
        if os.fstat(self._fd(info.file)).st_size < self._sizes[info.file]:
            raise self._truncated(info, label)
        m.madvise(mmap.MADV_WILLNEED)

    def _read_bin(self, info: TensorInfo, rows: tuple[int, int] | None, label: str) -> torch.Tensor:
        state = self._bins.get(info.file)
        if state is None:
            with self._lock:
                state = self._bins.get(info.file)
                if state is None:
                    state = load_bin(info.file, label or str(info.file))
                    self._bins[info.file] = state
        t = state[info.name]
        if rows is not None:
            t = t[rows[0] : rows[1]]
        return t.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        """Close the descriptors. Mapped tensors stay valid (a mapping outlives its descriptor)
        and are unmapped when the last of them goes."""
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            self._sizes.clear()
            self._bins.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Item = TypeVar("Item")


class Prefetcher(Generic[Item]):
    """Iterate ``(item, load(item))`` with the loads running ahead on a background thread.

    At most ``budget_bytes`` (as counted by ``cost(item)``) are held read-ahead, counting the item
    the caller is working on: its bytes are released when the caller asks for the next one. An
    item larger than the budget is still loaded, alone. Errors raised by ``load`` surface in the
    caller at that item. ``close()`` (or leaving a ``with`` block) stops the thread."""

    _DONE = object()

    def __init__(
        self,
        items: Iterable[Item],
        load: Callable[[Item], Any],
        cost: Callable[[Item], int],
        budget_bytes: int,
        enabled: bool = True,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._items = list(items)
        self._thread_init = thread_init  # run first on the reading thread (when it is not the caller's)
        self._load = load
        self._cost = cost
        self._budget = max(int(budget_bytes), 1)
        self._enabled = enabled
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._inflight = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            if self._thread_init is not None:
                self._thread_init()
            for item in self._items:
                c = self._cost(item)
                with self._cond:
                    while not self._stop and self._inflight > 0 and self._inflight + c > self._budget:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._inflight += c
                self._queue.put((item, self._load(item), c))
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._queue.put((None, exc, 0))
            return
        self._queue.put((None, self._DONE, 0))

    def _release(self, c: int) -> None:
        with self._cond:
            self._inflight -= c
            self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[Item, Any]]:
        if not self._enabled:
            for item in self._items:
                yield item, self._load(item)
            return
        self._thread = threading.Thread(target=self._run, name="tritonmerge-prefetch", daemon=True)
        self._thread.start()
        held = 0
        try:
            while True:
                self._release(held)  # the caller is done with the previous item
                held = 0
                item, data, c = self._queue.get()
                held = c
                if data is self._DONE:
                    return
                if isinstance(data, BaseException) and item is None:
                    raise data
                yield item, data
                data = None  # drop our reference before waiting for the next item
        finally:
            self.close()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            # drain so a producer blocked on nothing can finish its current load and exit
            t.join(timeout=60)

    def __enter__(self) -> "Prefetcher[Item]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
