"""tritonmerge.io: header-only indexes, lazy reads, prefetch, the sharded writer."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tritonmerge.errors import CheckpointError
from tritonmerge.io.index import open_checkpoint, read_safetensors_header
from tritonmerge.io.reader import Prefetcher, TensorReader
from tritonmerge.io import writer as writer_module
from tritonmerge.io.writer import Manifest, OutputEntry, ShardedWriter, parse_size, plan_shards, write_index

from _checkpoints import load_folder, make_tiny


def test_io_imports_no_math():
    import ast

    for path in Path(__file__).resolve().parents[1].joinpath("tritonmerge", "io").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                assert not any(part in mod.split(".") for part in ("methods", "ops", "kernels")), (path, mod)


def test_index_of_sharded_folder_matches_files(tmp_path):
    base, _ = make_tiny(tmp_path)
    ix = open_checkpoint(base, "base")
    data = load_folder(base)
    assert set(ix.tensors) == set(data)
    assert len(ix.files) > 3
    for name, info in ix.tensors.items():
        assert info.shape == tuple(data[name].shape)
        assert info.dtype == data[name].dtype
    assert {t.dtype for t in ix.tensors.values()} == {torch.bfloat16, torch.float32}
    # storage order: file by file, offsets increasing
    files = [ix.files.index(t.file) for t in ix.tensors.values()]
    assert files == sorted(files)


def test_reader_whole_and_row_chunks(tmp_path):
    base, _ = make_tiny(tmp_path)
    ix = open_checkpoint(base)
    data = load_folder(base)
    with TensorReader() as r:
        for name, info in ix.tensors.items():
            assert torch.equal(r.read(info), data[name])
        emb = ix.tensors["model.embed_tokens.weight"]
        assert torch.equal(r.read(emb, (100, 137)), data["model.embed_tokens.weight"][100:137])


def test_single_file_and_bin_checkpoints(tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = {"a.weight": torch.randn(7, 5, generator=gen), "b.bias": torch.randn(5, generator=gen).to(torch.bfloat16)}
    # a lone .safetensors file
    save_file(sd, str(tmp_path / "w.safetensors"))
    ix = open_checkpoint(tmp_path / "w.safetensors")
    with TensorReader() as r:
        assert all(torch.equal(r.read(ix.tensors[k]), v) for k, v in sd.items())
    # pytorch .bin shards with an index
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"a.weight": sd["a.weight"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.bias": sd["b.bias"]}, folder / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {}, "weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin", "b.bias": "pytorch_model-00002-of-00002.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ix = open_checkpoint(folder)
    assert ix.format == "bin" and len(ix.files) == 2
    with TensorReader() as r:
        for k, v in sd.items():
            assert torch.equal(r.read(ix.tensors[k]), v)
        assert torch.equal(r.read(ix.tensors["a.weight"], (2, 4)), sd["a.weight"][2:4])


def test_truncated_file_names_file_and_tensor(tmp_path):
    base, _ = make_tiny(tmp_path)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"truncated") as err:
        open_checkpoint(base, "base model 'x'")
    msg = str(err.value)
    assert shard.name in msg and "tensor '" in msg and "base model 'x'" in msg


def test_corrupt_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors_header(p, "m")
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_safetensors_header(p, "m")
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors_header(p, "m")


def test_missing_shard_and_missing_index_entry(tmp_path):
    base, _ = make_tiny(tmp_path)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00006.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.ghost.weight"):
        open_checkpoint(base)
    del index["weight_map"]["model.ghost.weight"]
    index_path.write_text(json.dumps(index))
    victim = sorted(base.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        open_checkpoint(base)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5B") == 5_000_000_000  # mergekit's parse_kmb: a bare B is a billion (its default "5B")
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5M") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_writer_shards_chunks_and_index(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(10, 8, generator=gen).to(torch.bfloat16),
        "big": torch.randn(100, 8, generator=gen),
        "c": torch.randn(3, generator=gen),
        "d": torch.randn(5, generator=gen).to(torch.float16),
        "scalar": torch.tensor(3.0),
        "ids": torch.arange(6),
    }
    entries = [OutputEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    shards = plan_shards(entries, max_shard_bytes=1000)
    assert any(len(s.entries) == 1 and s.entries[0].name == "big" for s in shards)  # larger than a shard
    manifest = Manifest(tmp_path, "fp")
    writer = ShardedWriter(tmp_path, shards, manifest, max_pending_bytes=64)
    for s in shards:
        for e in s.entries:
            t = tensors[e.name]
            if e.name == "big":  # in three row chunks
                for r0, r1 in ((0, 30), (30, 31), (31, 100)):
                    writer.write("big", t[r0:r1])
            else:
                writer.write(e.name, t)
    writer.close()
    write_index(tmp_path, shards)
    back = load_folder(tmp_path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert set(manifest.shards) == {s.filename for s in shards}
    assert Manifest(tmp_path, "fp").verified_shards(shards) == {s.filename for s in shards}
    with pytest.raises(CheckpointError, match="different config"):
        Manifest(tmp_path, "other").verified_shards(shards)


def test_writer_rejects_out_of_order(tmp_path):
    entries = [OutputEntry("a", (2,), torch.float32), OutputEntry("b", (2,), torch.float32)]
    shards = plan_shards(entries, 10**6)
    w = ShardedWriter(tmp_path, shards, Manifest(tmp_path, "x"), asynchronous=False)
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(2))
    with pytest.raises(CheckpointError, match="more rows than planned"):
        w.write("a", torch.zeros(3))
    with pytest.raises(CheckpointError, match="plan says"):
        w.write("a", torch.zeros(2, dtype=torch.float16))


def test_prefetcher_order_budget_and_errors():
    inflight = []
    current = [0]
    lock = threading.Lock()

    def load(i):
        with lock:
            current[0] += 10
            inflight.append(current[0])
        time.sleep(0.002)
        return i * 2

    pf = Prefetcher(range(20), load=load, cost=lambda i: 10, budget_bytes=25)
    got = []
    for item, value in pf:
        got.append((item, value))
        with lock:
            current[0] -= 10
    assert got == [(i, 2 * i) for i in range(20)]
    assert max(inflight) <= 20  # budget 25 allows two items of 10 at once, never three

    def bad(i):
        if i == 3:
            raise ValueError("boom at 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="boom at 3"):
        for item, _ in Prefetcher(range(10), load=bad, cost=lambda i: 1, budget_bytes=100):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_prefetcher_runs_thread_init_on_its_reading_thread():
    seen = []
    init = lambda: seen.append(("init", threading.current_thread().name))  # noqa: E731
    load = lambda i: seen.append(("load", threading.current_thread().name)) or i  # noqa: E731
    with Prefetcher(range(3), load=load, cost=lambda i: 1, budget_bytes=2, thread_init=init) as p:
        assert [item for item, _ in p] == [0, 1, 2]
    assert seen[0] == ("init", "tritonmerge-prefetch")
    assert {name for _, name in seen} == {"tritonmerge-prefetch"}
    # without a thread (prefetch disabled) the caller's thread is not touched
    seen.clear()
    assert [item for item, _ in Prefetcher(range(2), load=load, cost=lambda i: 1, budget_bytes=2, enabled=False, thread_init=init)] == [0, 1]
    assert all(kind == "load" for kind, _ in seen)


# --- direct writes -------------------------------------------------------------------------------


def _direct_file(path: Path, monkeypatch, stage: int = 4 * 4096):
    """A DirectFile with a small staging buffer (so that writes cross it often), or a skip
    where the file system of ``path`` takes no O_DIRECT."""
    monkeypatch.setattr(writer_module.DirectFile, "STAGE", stage)
    f = writer_module.open_shard_file(path)
    if not isinstance(f, writer_module.DirectFile):
        f.close()
        pytest.skip(f"the file system of {path.parent} takes no O_DIRECT")
    return f


WRITE_SIZES = [1, 4095, 4096, 4097, 10_000, 0, 16_384, 50_000, 3, 70_000, 8191]


def test_direct_file_holds_every_byte_after_each_flush_and_at_close(tmp_path, monkeypatch):
    """Writes of every size (across the staging buffer and block edges, from bytes, numpy and
    torch buffers) with flushes in between: after each flush the file holds exactly what was
    written so far, and after close the same bytes a plain file gets."""
    path = tmp_path / "shard.safetensors"
    f = _direct_file(path, monkeypatch)
    gen, expected = random.Random(3), bytearray()
    for i, n in enumerate(WRITE_SIZES):
        chunk = gen.randbytes(n)
        as_tensor = torch.tensor(list(chunk), dtype=torch.uint8)
        data = [chunk, memoryview(as_tensor.numpy()), memoryview(as_tensor.view(torch.int8).numpy())][i % 3]
        assert f.write(data) == n
        expected += chunk
        if i % 2:
            f.flush()
            assert path.read_bytes() == expected, i
    f.close()
    f.close()  # a second close is a no-op
    assert path.read_bytes() == expected


def test_direct_file_goes_buffered_where_a_write_is_declined(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but declines the write (EINVAL): the file drops
    O_DIRECT and the same bytes arrive."""
    import fcntl  # Linux only, like O_DIRECT

    path = tmp_path / "shard.safetensors"
    f = _direct_file(path, monkeypatch)
    real, declined = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            declined.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    expected = random.Random(4).randbytes(100_000)
    f.write(expected[:30_000])
    f.write(expected[30_000:])
    f.close()
    assert declined == [0] and path.read_bytes() == expected


def test_open_shard_file_is_buffered_without_o_direct_or_when_turned_off(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with writer_module.open_shard_file(tmp_path / "a") as f:  # a plain file object
        assert not isinstance(f, writer_module.DirectFile)
        f.write(b"x")
    monkeypatch.setattr(os, "open", real)
    monkeypatch.setenv("TRITONMERGE_DIRECT_WRITES", "0")
    with writer_module.open_shard_file(tmp_path / "b") as f:
        assert not isinstance(f, writer_module.DirectFile)
        f.write(b"y")
    assert (tmp_path / "a").read_bytes() == b"x" and (tmp_path / "b").read_bytes() == b"y"
