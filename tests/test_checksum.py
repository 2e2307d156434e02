"""The writer's shard checksum: the fused CPU library's XXH64 against the reference
implementation (the ``xxhash`` package), for any split of the bytes into updates, and the
manifest's verification of records made with either checksum."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
import xxhash

from tritonmerge.backends.cpu import kernels as ck
from tritonmerge.io.writer import DEFAULT_CHECKSUMS, Manifest, OutputEntry, ShardedWriter, plan_shards

pytestmark = pytest.mark.skipif(ck.status() is not None, reason=f"{ck.status()}")


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1000, 1 << 20])
def test_xxh64_equals_reference_for_any_split(n):
    rng = random.Random(n)
    data = bytes(rng.getrandbits(8) for _ in range(min(n, 4096))) * (n // 4096 + 1)
    data = data[:n]
    assert ck.Xxh64(data).hexdigest() == xxhash.xxh64(data).hexdigest()
    h = ck.Xxh64()
    i = 0
    while i < n:
        j = min(n, i + rng.choice([1, 2, 5, 31, 32, 33, 1000, 70000]))
        h.update(bytearray(data[i:j]) if j - i > 8 else data[i:j])  # writable and read-only buffers
        i = j
    assert h.hexdigest() == xxhash.xxh64(data).hexdigest()


def test_xxh64_of_a_tensor_view():
    t = torch.arange(10_000, dtype=torch.float32).to(torch.bfloat16)
    data = t.view(torch.uint8).numpy()
    assert ck.Xxh64(memoryview(data)).hexdigest() == xxhash.xxh64(data.tobytes()).hexdigest()


def _shards(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 8) for i in range(4)}
    entries = [OutputEntry(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    return tensors, plan_shards(entries, max_shard_bytes=2 * 64 * 8 * 4)


@pytest.mark.parametrize("recorded", ["xxh64", "sha256"])
def test_manifest_verifies_records_of_either_checksum(tmp_path, recorded):
    tensors, shards = _shards(tmp_path)
    checksums = {"xxh64": ck.Xxh64, "sha256": hashlib.sha256}
    first = {recorded: checksums[recorded], **checksums}
    manifest = Manifest(tmp_path, "fp", checksums=first)
    writer = ShardedWriter(tmp_path, shards, manifest, asynchronous=False)
    for s in shards:
        for e in s.entries:
            writer.write(e.name, tensors[e.name])
    writer.close()
    manifest.save()
    data = json.loads((tmp_path / manifest.path.name).read_text())
    for fname, rec in data["shards"].items():
        raw = (tmp_path / fname).read_bytes()
        expected = xxhash.xxh64(raw).hexdigest() if recorded == "xxh64" else hashlib.sha256(raw).hexdigest()
        assert set(rec) >= {recorded, "bytes"} and rec[recorded] == expected
    # a later process verifies with both checksums known, whichever it would record with
    assert Manifest(tmp_path, "fp", checksums=checksums).verified_shards(shards) == {s.filename for s in shards}
    # a flipped byte in one shard is caught
    victim = tmp_path / shards[0].filename
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    assert Manifest(tmp_path, "fp", checksums=checksums).verified_shards(shards) == {s.filename for s in shards[1:]}
    if recorded == "xxh64":
        # a process without the fused library cannot check XXH64 records: it merges them again
        assert Manifest(tmp_path, "fp", checksums=DEFAULT_CHECKSUMS).verified_shards(shards) == set()

