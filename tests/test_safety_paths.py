"""Paths stay where they belong and headers are what they say: an index whose ``weight_map``
climbs out of its model folder or names an absolute path is refused (naming the model and the
entry) before anything is opened, and a safetensors header is validated as the safetensors
library validates it: offsets in order, no overlaps, no gaps, nothing after the last tensor.
Through the real CLI, on files written byte by byte."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from _checkpoints import make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli

SHARD = ("--out-shard-size", "20KB", "--quiet")


@pytest.fixture
def world(tmp_path):
    base, experts = make_tiny(tmp_path / "models")
    return tmp_path, base, experts


def _retarget(model: Path, tensor_index: int, new_entry: str) -> str:
    """Point one weight_map entry of ``model``'s index at ``new_entry``; returns the tensor."""
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = sorted(index["weight_map"])[tensor_index]
    index["weight_map"][name] = new_entry
    index_path.write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("kind", ["climbs_out", "absolute_valid_shard", "etc_passwd", "nested_climb"])
def test_index_entries_outside_the_model_folder_are_refused(world, kind):
    tmp, base, experts = world
    victim = experts[0]
    index = json.loads((victim / "model.safetensors.index.json").read_text())
    name0 = sorted(index["weight_map"])[0]
    shard = victim / index["weight_map"][name0]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(shard, elsewhere / "x.safetensors")  # a perfectly good file, just not this model's
    entry = {
        "climbs_out": "../../elsewhere/x.safetensors",
        "absolute_valid_shard": str(elsewhere / "x.safetensors"),
        "etc_passwd": "/etc/passwd",
        "nested_climb": "sub/../../../elsewhere/x.safetensors",
    }[kind]
    name = _retarget(victim, 0, entry)
    cfg = write_config(tmp / "c.yml", "task_arithmetic", base, experts)
    out = tmp / "out"
    r = run_cli("merge", cfg, out, *SHARD)
    assert_refused(r, "model 'expert_1'" if "'expert_1'" in r.stderr else str(victim), repr(name), repr(entry),
                   "not a file inside the model folder")
    assert not out.exists() and not leftovers(out)


def _raw_safetensors(path: Path, entries: dict[str, tuple[list[int], tuple[int, int]]], data_bytes: int,
                     header_extra: str = "") -> None:
    """A safetensors file written by hand: F32 tensors with the given shapes and byte ranges."""
    header = {"__metadata__": {"format": "pt"}}
    for name, (shape, (begin, end)) in entries.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}
    text = json.dumps(header)
    if header_extra:
        text = text[:-1] + header_extra + "}"
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))


HEADERS = {
    # name: (entries, data bytes, extra JSON, fragment of the error); the safetensors library
    # refuses all but the duplicate name, which it resolves silently (the last entry wins):
    # tritonmerge refuses that ambiguity too
    "overlap": ({"a": ([4], (0, 16)), "b": ([4], (8, 24))}, 24, "", "overlaps tensor 'a'"),
    "gap": ({"a": ([4], (0, 16)), "b": ([4], (24, 40))}, 40, "", "leaves 8 byte(s) after tensor 'a'"),
    "gap_before_first": ({"a": ([4], (8, 24))}, 24, "", "leaves 8 byte(s) after the header"),
    "trailing_bytes": ({"a": ([4], (0, 16))}, 20, "", "4 byte(s) at the end of the file belong to no tensor"),
    "size_mismatch": ({"a": ([5], (0, 16))}, 16, "", "does not match shape"),
    "duplicate_name": ({"a": ([4], (0, 16))}, 16, ', "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}',
                       "appears twice"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_headers_are_validated_like_the_safetensors_library(world, case):
    tmp, base, experts = world
    entries, data_bytes, extra, fragment = HEADERS[case]
    bad = tmp / "bad_model"
    bad.mkdir()
    path = bad / "model.safetensors"
    _raw_safetensors(path, entries, data_bytes, extra)
    safetensors = pytest.importorskip("safetensors.torch")
    if case != "duplicate_name":
        with pytest.raises(Exception):  # the reference refuses it too
            safetensors.load_file(str(path))
    cfg = write_config(tmp / "c.yml", "task_arithmetic", base, [bad, *experts[1:]])
    out = tmp / "out"
    r = run_cli("merge", cfg, out, *SHARD)
    assert_refused(r, str(path), fragment)
    assert not out.exists() and not leftovers(out)
