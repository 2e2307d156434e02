"""Helpers for the engine/IO/CLI tests: tiny sharded checkpoints on disk and ways to read them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from tritonmerge.synthetic import make_llama_checkpoints

# small enough to be instant, sharded enough to matter: shards of 16 KB while the embedding and
# lm_head are 32 KB (a tensor larger than a shard), bf16 matrices with float32 norms
TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    vocab_size=512,
    num_experts=3,
    dtype=torch.bfloat16,
    seed=0,
    shard_size_bytes=16 * 1024,
    tensor_dtypes={"norm": torch.float32},
)


def make_tiny(root: Path, **overrides: Any) -> tuple[Path, list[Path]]:
    """A base and experts under ``root`` (see TINY); keyword arguments override TINY."""
    return make_llama_checkpoints(root, **{**TINY, **overrides})


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_config(path: Path, method: str, base: Path, experts: list[Path], parameters: dict | None = None,
                 model_parameters: list[dict] | None = None, **extra: Any) -> Path:
    """A mergekit-style YAML config file."""
    models = []
    for i, e in enumerate(experts):
        entry: dict[str, Any] = {"model": str(e)}
        if model_parameters is not None and model_parameters[i]:
            entry["parameters"] = model_parameters[i]
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": method, "base_model": str(base), "models": models}
    if parameters:
        cfg["parameters"] = parameters
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """name -> content of every file in a folder (for byte-for-byte comparisons)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def read_index(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "model.safetensors.index.json").read_text())


def disk_and_memory_merges(tmp_path: Path, method: str, parameters: dict[str, Any]):
    """One tiny merge through the disk engine (20 KB budget) and the same config through
    ``merge_state_dicts``: (disk output, in-memory output, saved decisions, in-memory report)."""
    import tritonmerge as tm
    from tritonmerge.config import load_config
    from tritonmerge.engine import MergeOptions, run_merge

    base_dir, expert_dirs = make_tiny(tmp_path / "models")
    cfg = {"merge_method": method, "base_model": str(base_dir), "models": [{"model": str(e)} for e in expert_dirs],
           "parameters": parameters}
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(memory_budget="20KB", quiet=True))
    saved = json.loads((out / "tritonmerge_decisions.json").read_text())
    report = tm.MergeReport()
    expected = tm.merge_state_dicts(
        method, load_folder(base_dir), [load_folder(e) for e in expert_dirs], report=report,
        **load_config(cfg).resolve("", 0.0),
    )
    return load_folder(out), expected, saved, report
