"""Sharded safetensors output, written asynchronously, resumable, committed atomically.

The whole output layout is planned before the first tensor is computed (``plan_shards``): every
shard's header (names, shapes, dtypes, byte offsets) is known from the input headers, so each
shard file starts with its final header and tensors are appended in planned order as they come.
Nothing is buffered per shard: the writer holds at most ``max_pending_bytes`` of computed tensors
on its queue, whatever the shard size.

Shard files are written with O_DIRECT where the file system takes it (``DirectFile``: no copy
into the page cache, nothing left dirty for the final flush), else buffered. Each finished shard
is made durable (fdatasync in the background while it is written, fsync at its end) and its
checksum recorded in a manifest; ``--resume`` keeps shards whose checksum still
matches and redoes the rest, so an interrupted run finishes with the same bytes as an
uninterrupted one. Everything goes into a hidden folder beside the output (``partial_dir``) that
is renamed into place only when complete (``commit``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import json
import mmap
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import CheckpointError
from .index import TORCH_TO_SAFETENSORS, itemsize

MANIFEST_NAME = "tritonmerge_checksums.json"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass
class ShardPlan:
    """One output file: its name, its tensors in file order and their data offsets."""

    filename: str
    entries: list[OutputEntry]
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def file_bytes(self) -> int:
        return 8 + len(self.header) + self.data_bytes


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / ``1000`` -> bytes. mergekit's counts are read as
    mergekit reads them (``parse_kmb``): ``K``, ``M`` and a bare ``B`` are thousand, million and
    *billion*, so ``--out-shard-size 5B`` (mergekit's default) means 5·10⁹ bytes, not five."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0 or (text == 0 and not allow_zero):
            raise ValueError(f"size {text!r} must be positive")
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("TB", 10**12), ("GB", 10**9),
             ("MB", 10**6), ("KB", 10**3), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3), ("B", 10**9)]
    for suffix, mult in units:
        if s.endswith(suffix):
            number = s[: -len(suffix)]
            break
    else:
        number, mult = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 5GB, 500MB or 2GiB") from None
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * mult)


def plan_shards(entries: Sequence[OutputEntry], max_shard_bytes: int) -> list[ShardPlan]:
    """Split ``entries`` (in processing order) into shards of at most ``max_shard_bytes`` of
    tensor data (a larger tensor gets a shard of its own). Within a shard, tensors are laid out
    by decreasing element size, so every tensor's data is aligned to its element size."""
    groups: list[list[OutputEntry]] = []
    current: list[OutputEntry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        groups.append(current)
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        ordered = sorted(group, key=lambda e: -itemsize(e.dtype))  # stable: keeps order within a size
        shard = ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", ordered)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for e in ordered:
            header[e.name] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            shard.offsets[e.name] = (pos, pos + e.nbytes)
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        shard.header = raw
        shards.append(shard)
    return shards


def write_index(folder: Path, shards: Sequence[ShardPlan], metadata: dict[str, Any] | None = None) -> None:
    """``model.safetensors.index.json`` with ``metadata.total_size`` (bytes of tensor data)."""
    weight_map = {e.name: s.filename for s in shards for e in s.entries}
    meta = {"total_size": sum(s.data_bytes for s in shards), **(metadata or {})}
    data = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# A checksum is a hashlib-like factory (``update``, ``hexdigest``), named by the key its digests
# are recorded under in the manifest. io/ knows SHA-256 only; the engine puts the fused CPU
# library's XXH64 first when it is available (SHA-256 is a quarter of the CPU time of a fast
# merge), and keeps SHA-256 to verify records an earlier run made with it.
Checksum = Callable[[], Any]
DEFAULT_CHECKSUMS: dict[str, Checksum] = {"sha256": hashlib.sha256}


def file_digest(path: Path, new: Checksum, chunk: int = 1 << 24) -> str:
    """Hex digest of a whole file with the checksum ``new``."""
    h = new()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class Manifest:
    """Checksums of finished shards plus the fingerprint of the plan that made them.

    A distributed merge's rank r > 0 records the shards it writes in a file of its own
    (``rank_manifest_name(r)``) beside the main one, so that no two processes write one file;
    rank 0 folds them into the main manifest when the output is finalized. Resuming reads them
    all, so a merge can be resumed with any number of processes."""

    def __init__(self, folder: Path, fingerprint: str, rank: int = 0, checksums: Mapping[str, Checksum] | None = None) -> None:
        self.path = folder / (MANIFEST_NAME if rank == 0 else rank_manifest_name(rank))
        self.fingerprint = fingerprint
        self.shards: dict[str, dict[str, Any]] = {}
        # the first records new shards; every one of them verifies the records it names
        self.checksums: dict[str, Checksum] = dict(checksums or DEFAULT_CHECKSUMS)

    @property
    def checksum(self) -> tuple[str, Checksum]:
        """(name, factory) of the checksum that new shards are recorded with."""
        return next(iter(self.checksums.items()))

    def _matches(self, path: Path, rec: Mapping[str, Any]) -> bool:
        for name, new in self.checksums.items():
            if name in rec:
                return file_digest(path, new) == rec[name]
        return False  # recorded with a checksum this process cannot compute: merge it again

    def save(self) -> None:
        data = {"plan": self.fingerprint, "shards": dict(sorted(self.shards.items()))}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def rank_files(self) -> list[Path]:
        """The manifests of other processes of a distributed merge found beside this one."""
        return sorted(self.path.parent.glob(RANK_MANIFEST_GLOB))

    def verified_shards(self, shards: Sequence[ShardPlan]) -> set[str]:
        """Load the manifests found in the folder (the main one and any rank's) and return the
        shards whose files still match them.

        Raises when the folder was made by a different plan (other inputs, config or options)."""
        files = [p for p in (self.path, *self.rank_files()) if p.is_file()]
        planned = {s.filename: s for s in shards}
        good: set[str] = set()
        for path in files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read the resume manifest {path}: {exc}") from None
            if data.get("plan") != self.fingerprint:
                raise CheckpointError(
                    f"the partial output in {path.parent} was made from a different config, inputs or "
                    f"options; it cannot be resumed (use --overwrite to start over)"
                )
            for fname, rec in data.get("shards", {}).items():
                p = path.parent / fname
                shard = planned.get(fname)
                if fname in good or shard is None or not p.is_file() or p.stat().st_size != shard.file_bytes:
                    continue
                if self._matches(p, rec):
                    good.add(fname)
                    self.shards[fname] = rec
        return good

    def absorb_rank_files(self) -> None:
        """Fold the shards recorded by other processes' manifests (already loaded into
        ``shards``) into this one on disk, and remove their files."""
        self.save()
        for path in self.rank_files():
            path.unlink()


def rank_manifest_name(rank: int) -> str:
    return f"tritonmerge_checksums.rank-{rank}.json"


RANK_MANIFEST_GLOB = "tritonmerge_checksums.rank-*.json"


def open_shard_file(path: Path):
    """The file layer of the writer: every byte of a shard goes through the object returned here
    (the disk-full tests substitute one that fails the way a full disk does). A ``DirectFile``
    where the platform and file system take O_DIRECT and ``TRITONMERGE_DIRECT_WRITES`` is not 0,
    else a buffered file."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag and os.environ.get("TRITONMERGE_DIRECT_WRITES", "1") != "0":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | flag, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (older tmpfs, some FUSE)
                raise
        else:
            return DirectFile(fd)
    return open(path, "wb")


class DirectFile:
    """A file written with O_DIRECT through one block-aligned staging buffer: the bytes go from
    the buffer to the device, not into the page cache. Why: a buffered write copies every output
    byte into page-cache pages the kernel must first find and zero (on a VM whose freed memory
    returns to the host within seconds, their first-touch faults made 300 MB cost 0.58-0.84 s
    against 0.12-0.15 s direct), and the dirty pages then need the write-back that the shard's
    fsync waits for anyway.

    The interface the writer uses of a file: ``write`` (whole writes), ``flush`` (everything
    written so far is in the file: the last partial block goes out zero-padded and the file is
    cut back to its true length; that block stays staged and is rewritten as more comes),
    ``fileno`` and ``close``."""

    ALIGN = 4096  # a multiple of every common logical block size
    STAGE = 8 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stage = mmap.mmap(-1, self.STAGE)  # anonymous mappings are page-aligned
        self._view = memoryview(self._stage)
        self._at = 0  # file offset of the staged bytes (a multiple of ALIGN)
        self._staged = 0
        self._size = 0  # bytes written
        self._dirty = False

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        pos, n = 0, len(data)
        while pos < n:
            take = min(n - pos, self.STAGE - self._staged)
            self._view[self._staged : self._staged + take] = data[pos : pos + take]
            self._staged += take
            pos += take
            if self._staged == self.STAGE:
                self._put(self.STAGE)
                self._at += self.STAGE
                self._staged = 0
        self._size += n
        self._dirty = self._dirty or n > 0
        return n

    def _put(self, length: int) -> None:
        done = 0
        while done < length:
            try:
                wrote = os.pwrite(self._fd, self._view[done:length], self._at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._buffered():
                    raise
                continue  # a file system that opens with O_DIRECT but declines the write: buffered from here
            if wrote <= 0:
                raise OSError(errno.EIO, f"a write stopped after {done} of {length} bytes")
            done += wrote  # a short write's misaligned rest: the next write's EINVAL goes buffered

    def _buffered(self) -> bool:
        """Clear O_DIRECT on the open file (the writes that follow go through the page cache);
        False if it was already clear."""
        import fcntl  # only where O_DIRECT exists, so never on Windows

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def flush(self) -> None:
        if not self._dirty:
            return
        whole = self._staged - self._staged % self.ALIGN
        padded = whole + (self.ALIGN if self._staged > whole else 0)
        self._view[self._staged : padded] = bytes(padded - self._staged)
        self._put(padded)
        os.ftruncate(self._fd, self._size)
        if whole:  # keep only the partial block staged (the two ranges cannot overlap)
            rest = self._staged - whole
            self._view[:rest] = self._view[whole : self._staged]
            self._at += whole
            self._staged = rest
        self._dirty = False

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1
            self._view.release()
            self._stage.close()


# start the write-back of this many bytes as soon as they are written, and make what is written
# so far durable in the background, so that the fsync closing a shard waits for the last of them
# only, not for the whole shard
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2
_libc: list = []


def _start_writeback(f, start: int, length: int) -> None:
    """Ask the kernel to begin writing ``[start, start + length)`` of ``f`` to disk, without
    waiting (Linux ``sync_file_range``). Durability still comes from the fsync at the shard's end;
    this only moves the disk work earlier, where it overlaps the merge. Best effort: nothing
    happens where the call or a file descriptor is not available."""
    if not _libc:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _libc.append(fn)
    fn = _libc[0]
    if fn is None:
        return
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        return
    fn(fd, start, length, _SYNC_FILE_RANGE_WRITE)


class ShardedWriter:
    """Appends tensors to their planned shard files on a background thread.

    ``write(name, tensor)`` must be called in plan order (skipping the shards listed in
    ``skip``); it returns once the tensor is queued, blocking while more than
    ``max_pending_bytes`` are waiting. ``close()`` waits for the queue and re-raises any write
    error; ``abort()`` stops without finishing."""

    def __init__(
        self,
        folder: Path,
        shards: Sequence[ShardPlan],
        manifest: Manifest,
        *,
        skip: set[str] = frozenset(),
        max_pending_bytes: int = 1 << 28,
        on_written: Callable[[int], None] | None = None,
        asynchronous: bool = True,
        shard_extra: Callable[[ShardPlan], dict[str, Any]] | None = None,
    ) -> None:
        self.folder = folder
        self._shard_extra = shard_extra
        self.shards = [s for s in shards if s.filename not in skip]
        self.manifest = manifest
        self._order = [(s, e) for s in self.shards for e in s.entries]
        self._next = 0
        self._written_in_entry = 0
        self._max_pending = max(int(max_pending_bytes), 1)
        self._pending = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._on_written = on_written
        self._async = asynchronous
        self._file = None
        self._hash = None
        self._offset = 0  # bytes written to the open shard
        self._flushed = 0  # bytes of it whose write-back has been started
        # hashes a tensor while the writer thread writes it: with SHA-256 the hash and the copy
        # into the page cache each took about as long, and one thread doing both in turn was the
        # slowest stage
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None
        # fdatasyncs the open shard while the writer goes on: on a virtual disk the flush that
        # makes data durable costs ~0.4 ms per MB however early the write-back started, and one
        # flush at the shard's end was a third of an elementwise merge's time
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None
        self._syncing: concurrent.futures.Future | None = None
        self._thread: threading.Thread | None = None
        if asynchronous:
            self._thread = threading.Thread(target=self._run, name="tritonmerge-writer", daemon=True)
            self._thread.start()

    @property
    def expected(self) -> list[str]:
        """Tensor names still to be written, in order."""
        return [e.name for _, e in self._order[self._next :]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (the whole tensor, or its next rows) for the file; in plan order."""
        self._raise_if_failed()
        if self._next >= len(self._order):
            raise CheckpointError(f"writer: tensor {name!r} is not in the output plan")
        shard, entry = self._order[self._next]
        if name != entry.name:
            raise CheckpointError(f"writer: expected tensor {entry.name!r} next, got {name!r}")
        rows_ok = tensor.dim() == len(entry.shape) and tuple(tensor.shape[1:]) == entry.shape[1:] and tensor.dim() > 0
        if tensor.dtype != entry.dtype or not (tuple(tensor.shape) == entry.shape or rows_ok):
            raise CheckpointError(
                f"writer: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the plan says {entry.shape} {entry.dtype}"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if self._written_in_entry + nbytes > entry.nbytes:
            raise CheckpointError(f"writer: more rows than planned for tensor {name!r}")
        self._written_in_entry += nbytes
        first = self._written_in_entry == nbytes
        last = self._written_in_entry == entry.nbytes
        if last:
            self._next += 1
            self._written_in_entry = 0
        tensor = tensor.detach().to("cpu").contiguous()
        job = (shard, entry, tensor, first, last)
        if not self._async:
            self._write_one(*job)
            return
        with self._cond:
            while self._pending > 0 and self._pending + nbytes > self._max_pending and self._error is None:
                self._cond.wait()
            self._pending += nbytes
        self._raise_if_failed()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            shard, entry, tensor, first, last = job
            nbytes = tensor.numel() * tensor.element_size()
            try:
                if self._error is None:
                    self._write_one(shard, entry, tensor, first, last)
            except BaseException as exc:
                self._error = exc
            finally:
                del tensor, job
                with self._cond:
                    self._pending -= nbytes
                    self._cond.notify_all()

    def _write_one(self, shard: ShardPlan, entry: OutputEntry, tensor: torch.Tensor, first: bool, last: bool) -> None:
        path = self.folder / shard.filename
        try:
            if first and entry is shard.entries[0]:
                self._file = open_shard_file(path)
                self._hash = self.manifest.checksum[1]()
                prefix = len(shard.header).to_bytes(8, "little") + shard.header
                self._file.write(prefix)
                self._hash.update(prefix)
                self._offset, self._flushed = len(prefix), 0
            if tensor.numel():
                data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if len(data) >= 1 << 20:
                    if self._hasher is None:
                        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tritonmerge-hash")
                    hashed = self._hasher.submit(self._hash.update, data)  # hashlib releases the GIL
                    try:
                        self._file.write(data)
                    finally:
                        hashed.result()  # in order: the next update waits for this one
                else:
                    self._file.write(data)
                    self._hash.update(data)
                self._offset += len(data)
                if self._offset - self._flushed >= WRITEBACK_BYTES:
                    self._file.flush()
                    _start_writeback(self._file, self._flushed, self._offset - self._flushed)
                    self._flushed = self._offset
                    self._sync_in_background()
            if last and entry is shard.entries[-1]:
                self._file.flush()
                self._wait_for_sync()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
                rec = {self.manifest.checksum[0]: self._hash.hexdigest(), "bytes": shard.file_bytes}
                if self._shard_extra is not None:
                    rec.update(self._shard_extra(shard))
                self.manifest.shards[shard.filename] = rec
                self.manifest.save()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(f"writing {path} failed: the disk is full ({exc.strerror})") from None
            raise CheckpointError(f"writing {path} failed: {exc}") from None
        if self._on_written is not None:
            self._on_written(tensor.numel() * tensor.element_size())

    def _sync_in_background(self) -> None:
        """Start an fdatasync of the open shard unless one is still running (the next one then
        covers these bytes too). Its error, if any, is raised here or at the shard's end."""
        if self._syncing is not None:
            if not self._syncing.done():
                return
            self._wait_for_sync()
        try:
            fd = self._file.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tritonmerge-sync")
        self._syncing = self._syncer.submit(getattr(os, "fdatasync", os.fsync), fd)  # no fdatasync on macOS

    def _wait_for_sync(self) -> None:
        """Wait for the background fdatasync (the file must stay open while it runs)."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self.abort()
            raise err

    def close(self) -> None:
        """Wait until everything queued is on disk; re-raise a write error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._stop_helpers()
        self._raise_if_failed()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise CheckpointError(f"writer closed before tensor {missing!r} was written")

    def _stop_helpers(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        self._syncing = None

    def abort(self) -> None:
        """Stop the thread, leave finished shards (and the manifest) for --resume."""
        if self._thread is not None:
            with self._cond:
                self._error = self._error or CheckpointError("aborted")
                self._cond.notify_all()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._stop_helpers()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def partial_dir(out_dir: Path) -> Path:
    """The hidden working folder beside ``out_dir`` that becomes ``out_dir`` when complete."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.tritonmerge-partial"


def replaced_dir(out_dir: Path) -> Path:
    """Where ``commit`` moves an output it replaces, for the moment between the two renames."""
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.tritonmerge-old"


def commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``. An existing ``out_dir`` (allowed only
    with ``overwrite``; the engine has checked it is an earlier output) is moved aside first and
    deleted after the rename, so at every moment either the old or the new complete folder is in
    place."""
    out_dir = Path(out_dir).absolute()
    old = None
    if out_dir.exists():
        if not overwrite:
            raise CheckpointError(f"output folder {out_dir} already exists (use --overwrite to replace it)")
        old = replaced_dir(out_dir)
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut must not undo the commit)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
