"""Build the synthetic checkpoints of a shape once, into a cache folder (benchmarks/.cache/)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .shapes import Shape

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"
STAMP = "benchmark_stamp.json"


def _stamp(shape: Shape) -> dict:
    return {"shape": shape.describe(), "generator": "tritonmerge.synthetic.make_llama_checkpoints"}


def ensure_checkpoints(shape: Shape, cache_dir: Path | None = None, *, log=print) -> tuple[Path, list[Path]]:
    """Return ``(base_dir, expert_dirs)`` for ``shape``, generating them only when the cached
    copy is missing or was built with different settings (the stamp file records them)."""
    import torch

    from tritonmerge.synthetic import make_llama_checkpoints

    root = Path(cache_dir or CACHE_DIR) / f"ckpt-{shape.name}"
    base = root / "base"
    experts = [root / f"expert_{i + 1}" for i in range(shape.num_experts)]
    stamp = root / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == _stamp(shape) and all(d.is_dir() for d in [base, *experts]):
        return base, experts
    if root.exists():
        shutil.rmtree(root)
    log(f"generating {shape.num_experts + 1} checkpoints of shape {shape.name} ({shape.num_params / 1e6:.1f}M params each) in {root}")
    t0 = time.perf_counter()
    made_base, made_experts = make_llama_checkpoints(
        root,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        vocab_size=shape.vocab_size,
        num_experts=shape.num_experts,
        dtype=getattr(torch, shape.dtype),
        seed=shape.seed,
        shard_size_bytes=shape.shard_size_bytes,
    )
    assert made_base == base and list(made_experts) == experts, (made_base, made_experts)
    stamp.write_text(json.dumps(_stamp(shape), indent=2) + "\n")
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return base, experts


def model_files(folder: Path) -> list[Path]:
    """The safetensors files of one checkpoint folder."""
    return sorted(folder.glob("*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in model_files(folder))
