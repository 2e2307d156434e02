"""Checkpoint indexes: which tensors a checkpoint holds, where, with what shape and dtype.

Reads only headers and index files, never tensor data (``.bin`` files are memory-mapped, which
reads the pickle but not the storages). Accepted layouts:

* a folder with ``model.safetensors``, or ``model-*.safetensors`` + ``model.safetensors.index.json``
  (any ``*.safetensors`` files without an index are read as one model);
* a folder with ``pytorch_model.bin`` or ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``;
* a single ``.safetensors`` or ``.bin`` file.

Every problem (missing file, index entry without a tensor, corrupt or truncated header, tensor
bytes beyond the end of the file) is a ``CheckpointError`` naming the model, the file and the
tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

# safetensors dtype tag -> torch dtype (the tags torch can hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _tag, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_tag] = getattr(torch, _attr)
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# a header larger than this is certainly corrupt (safetensors itself refuses > 100 MB)
MAX_HEADER_BYTES = 100_000_000


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range (safetensors) and its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    # absolute byte offsets in ``file``; -1 for .bin files (read through torch.load)
    start: int = -1
    end: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def is_safetensors(self) -> bool:
        return self.start >= 0


@dataclass
class CheckpointIndex:
    """The tensors of one model, in storage order (by file, then by offset)."""

    label: str
    path: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    format: str = "safetensors"  # or "bin"

    @property
    def folder(self) -> Path | None:
        """The model's folder (config.json, tokenizer files), or None for a lone weights file."""
        return self.path if self.path.is_dir() else None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def config(self) -> dict[str, Any] | None:
        """The model's config.json, or None where there is none."""
        folder = self.folder
        if folder is None or not (folder / "config.json").is_file():
            return None
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.label}: cannot read {folder / 'config.json'}: {exc}") from None


def read_safetensors_header(path: Path, label: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (tensors, __metadata__).

    Checks the header length, the JSON, each entry's dtype, shape and byte range, and that no
    tensor reaches past the end of the file (a truncated download)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{label}: {path} is not a safetensors file: it is {size} bytes long, too short for a header"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{label}: {path} is corrupt or truncated: its header claims {n} bytes but the file has {size}"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read {path}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{label}: {path} is corrupt: its header is not valid JSON ({exc})") from None
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{label}: {path}, tensor {name!r}"
        try:
            tag = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: corrupt header entry {entry!r}") from None
        if tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: dtype {tag!r} is not supported (supported: {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[tag]
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{where}: negative dimension in shape {shape}")
        info = TensorInfo(name, shape, dtype, path, data_start + begin, data_start + end)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                f"{where}: corrupt header: byte range [{begin}, {end}) does not match shape {shape} of {tag}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{where}: the file is truncated: the tensor needs bytes up to {data_start + end} "
                f"but the file has {size}"
            )
        tensors[name] = info
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    _check_layout(ordered, data_start, data_size, path, label)
    return ordered, metadata


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, data_size: int, path: Path, label: str) -> None:
    """The safetensors library's own rule: in offset order, every tensor starts where the previous
    one ended, and the last one ends at the end of the file. Overlapping ranges would let two
    names share bytes, and gaps or trailing bytes hide data no header describes."""
    expected = 0
    previous = None
    for name, info in tensors.items():
        begin, end = info.start - data_start, info.end - data_start
        if begin != expected:
            if begin < expected:
                what = f"overlaps tensor {previous!r} (which ends at {expected})"
            else:
                what = f"leaves {begin - expected} byte(s) after {f'tensor {previous!r}' if previous else 'the header'} that no tensor describes"
            raise CheckpointError(
                f"{label}: {path}, tensor {name!r}: corrupt header: its byte range [{begin}, {end}) {what}"
            )
        expected, previous = end, name
    if expected != data_size:
        raise CheckpointError(
            f"{label}: {path} is corrupt: {data_size - expected} byte(s) at the end of the file belong to no tensor "
            f"of its header"
        )


def _bin_header(path: Path, label: str) -> dict[str, TensorInfo]:
    state = load_bin(path, label)
    out: dict[str, TensorInfo] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{label}: {path}, entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = TensorInfo(name, tuple(t.shape), t.dtype, path)
    return out


def load_bin(path: Path, label: str) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, memory-mapped where the file format allows (no data read)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            # legacy (non-zip) torch.save format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{label}: cannot load {path} with torch.load(weights_only=True): {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{label}: {path} does not hold a state dict (got {type(state).__name__})")
    return state


def _from_index_file(index_path: Path, label: str, reader) -> tuple[dict[str, TensorInfo], list[Path]]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{label}: cannot read the index {index_path}: {exc}") from None
    folder = index_path.parent
    files: list[Path] = []
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        _check_index_entry(name, fname, index_path, label)
        by_file.setdefault(fname, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    for fname, names in by_file.items():
        fpath = folder / fname
        if not fpath.is_file():
            raise CheckpointError(
                f"{label}: file {fname!r} listed in {index_path.name} (for tensor {names[0]!r}"
                f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}) is missing from {folder}"
            )
        files.append(fpath)
        header = reader(fpath, label)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{label}: {index_path.name} says tensor {name!r} is in {fname!r}, but that file has no such tensor"
                )
            tensors[name] = header[name]
    return tensors, files


def _check_index_entry(name: Any, fname: Any, index_path: Path, label: str) -> None:
    """An index may only name files inside its own folder: a ``weight_map`` entry that is
    absolute or climbs out with ``..`` would make the merge read (and mix in) any file on the
    machine. Checked on the text, not on resolved links, so a Hugging Face cache folder (whose
    files are links into a blob store) still opens."""
    if not isinstance(fname, str) or not fname or "\x00" in fname:
        raise CheckpointError(f"{label}: {index_path}: weight_map entry for tensor {name!r} is not a file name: {fname!r}")
    parts = Path(fname).parts
    if os.path.isabs(fname) or fname.startswith("~") or ".." in parts or "\\" in fname:
        raise CheckpointError(
            f"{label}: {index_path}: weight_map entry for tensor {name!r} names {fname!r}, which is not a file "
            f"inside the model folder {index_path.parent}; refusing to read it"
        )


def _safetensors_reader(path: Path, label: str) -> dict[str, TensorInfo]:
    return read_safetensors_header(path, label)[0]


def open_checkpoint(path: str | os.PathLike, label: str | None = None) -> CheckpointIndex:
    """Index one model (a folder or a single weights file) from headers only."""
    p = Path(path)
    label = label or str(p)
    if not p.exists():
        raise CheckpointError(f"{label}: {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            tensors = read_safetensors_header(p, label)[0]
            return _finish(CheckpointIndex(label, p, tensors, [p], "safetensors"))
        if p.suffix in (".bin", ".pt", ".pth"):
            return _finish(CheckpointIndex(label, p, _bin_header(p, label), [p], "bin"))
        raise CheckpointError(f"{label}: {p} is neither a .safetensors nor a .bin file")
    candidates = [
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "bin"),
    ]
    for index_name, fmt in candidates:
        index_path = p / index_name
        if index_path.is_file():
            reader = _safetensors_reader if fmt == "safetensors" else _bin_header
            tensors, files = _from_index_file(index_path, label, reader)
            return _finish(CheckpointIndex(label, p, tensors, files, fmt))
    single = p / "model.safetensors"
    if single.is_file():
        return _finish(CheckpointIndex(label, p, read_safetensors_header(single, label)[0], [single], "safetensors"))
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        return _finish(_merge_files(label, p, shards, _safetensors_reader, "safetensors"))
    bins = sorted(p.glob("pytorch_model*.bin"))
    if bins:
        return _finish(_merge_files(label, p, bins, _bin_header, "bin"))
    raise CheckpointError(
        f"{label}: no weights found in {p} (looked for model.safetensors, model.safetensors.index.json, "
        f"*.safetensors, pytorch_model.bin.index.json, pytorch_model*.bin)"
    )


def _merge_files(label: str, folder: Path, files: list[Path], reader, fmt: str) -> CheckpointIndex:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in reader(f, label).items():
            if name in tensors:
                raise CheckpointError(
                    f"{label}: tensor {name!r} appears in both {tensors[name].file.name} and {f.name} "
                    f"and there is no index file to say which one counts"
                )
            tensors[name] = info
    return CheckpointIndex(label, folder, tensors, files, fmt)


def _finish(index: CheckpointIndex) -> CheckpointIndex:
    # storage order: by file (index order), then by offset, so reads run sequentially
    rank = {f: i for i, f in enumerate(index.files)}
    index.tensors = dict(sorted(index.tensors.items(), key=lambda kv: (rank.get(kv[1].file, 0), kv[1].start, kv[0])))
    if not index.tensors:
        raise CheckpointError(f"{index.label}: {index.path} holds no tensors")
    return index
