"""No input is ever deleted or changed: OUT_DIR may not be, hold or lie inside an input, with or
without --overwrite; --overwrite replaces only an earlier tritonmerge output (or an empty
folder) unless --force-overwrite is given too. Through the real CLI, on real folders."""

from __future__ import annotations

import os
import shutil

import pytest

from _checkpoints import folder_bytes, make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli, tree

SHARD = ("--out-shard-size", "20KB", "--quiet")


@pytest.fixture
def world(tmp_path):
    """tmp/models/{base,expert_1..3}, tmp/cfg/c.yml; returns (tmp, base, experts, config)."""
    base, experts = make_tiny(tmp_path / "models")
    (tmp_path / "cfg").mkdir()
    cfg = write_config(tmp_path / "cfg" / "c.yml", "ties", base, experts, {"density": 0.5})
    return tmp_path, base, experts, cfg


def _out_choices(tmp, base, experts, cfg):
    return {
        "an expert's folder": experts[1],
        "the base's folder": base,
        "a folder holding the inputs": tmp / "models",
        "the folder above everything": tmp,
        "a folder inside the base": base / "merged",
        "a folder inside an expert": experts[0] / "sub" / "merged",
        "the config's folder": cfg.parent,
    }


FLAG_SETS = [("--overwrite", "--force-overwrite"), ("--overwrite",), (), ("--resume",), ("--overwrite", "--resume")]


def test_out_dir_at_an_input_is_refused_and_inputs_stay(world):
    """Each kind of input as OUT_DIR, under each combination of flags in turn (a subprocess per
    case costs seconds; every flag set meets more than one kind of input)."""
    tmp, base, experts, cfg = world
    before = tree(tmp)
    for i, (what, out) in enumerate(_out_choices(tmp, base, experts, cfg).items()):
        flags = FLAG_SETS[i % len(FLAG_SETS)]
        r = run_cli("merge", cfg, out, *SHARD, *flags)
        line = assert_refused(r, "inputs are never overwritten")
        assert any(word in line for word in (" is ", " contains ", " lies inside ")), (what, line)
        assert tree(tmp) == before, f"{what} with {flags}: an input changed"
        assert not leftovers(out), what


def test_out_dir_as_a_link_to_an_input_is_refused(world):
    tmp, base, experts, cfg = world
    link = tmp / "looks_new"
    link.symlink_to(experts[2], target_is_directory=True)
    before = tree(tmp / "models")
    r = run_cli("merge", cfg, link, *SHARD, "--overwrite", "--force-overwrite")
    assert_refused(r, "is the folder of model", str(experts[2]))
    assert tree(tmp / "models") == before and link.is_symlink()


def test_out_dir_holding_a_weights_file_an_index_points_to(world):
    """A model folder whose shards are links elsewhere (as in a Hugging Face cache): the folder
    the links point into is an input too."""
    tmp, base, experts, cfg = world
    blobs = tmp / "blobs"
    blobs.mkdir()
    linked = tmp / "linked_expert"
    linked.mkdir()
    for f in sorted(experts[0].iterdir()):
        if f.suffix == ".safetensors":
            shutil.move(str(f), blobs / f.name)
            (linked / f.name).symlink_to(blobs / f.name)
        else:
            shutil.copy(f, linked / f.name)
    cfg2 = write_config(tmp / "cfg" / "c2.yml", "ties", base, [linked, *experts[1:]], {"density": 0.5})
    before = tree(blobs)
    r = run_cli("merge", cfg2, blobs, *SHARD, "--overwrite", "--force-overwrite")
    assert_refused(r, "contains a weights file of model", str(blobs))
    assert tree(blobs) == before


def test_overwrite_replaces_only_earlier_outputs(world):
    tmp, base, experts, cfg = world
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    r = run_cli("merge", cfg, out, *SHARD, "--overwrite")
    assert_refused(r, "not a tritonmerge output", "notes.txt", "--force-overwrite")
    assert (out / "notes.txt").read_text() == "my notes" and not leftovers(out)
    # the explicit second flag replaces it
    r = run_cli("merge", cfg, out, *SHARD, "--overwrite", "--force-overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "notes.txt").exists() and (out / "tritonmerge_checksums.json").is_file()
    first = folder_bytes(out)
    # an earlier tritonmerge output is replaced with --overwrite alone, and an empty folder too
    r = run_cli("merge", cfg, out, *SHARD, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == first and not leftovers(out)
    empty = tmp / "empty"
    empty.mkdir()
    assert run_cli("merge", cfg, empty, *SHARD, "--overwrite").returncode == 0
    assert folder_bytes(empty) == first


def test_overwrite_through_a_link_replaces_the_folder_it_names(world):
    """A linked OUT_DIR: the folder the link names is replaced, the link still points at it, and
    nothing is left beside either."""
    tmp, base, experts, cfg = world
    real = tmp / "store" / "merged"
    real.parent.mkdir()
    assert run_cli("merge", cfg, real, *SHARD).returncode == 0
    link = tmp / "current"
    link.symlink_to(real, target_is_directory=True)
    ref = folder_bytes(real)
    r = run_cli("merge", cfg, link, *SHARD, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert folder_bytes(link) == ref
    assert not leftovers(real) and not leftovers(link)
    assert sorted(p.name for p in tmp.iterdir()) == ["cfg", "current", "models", "store"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["merged"]
