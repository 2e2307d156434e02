"""``tritonmerge demo [DIR]``: a real merge end to end, in seconds, on any machine.

Builds a small Llama-shaped base and three experts in DIR/models (synthetic.py), writes two
example configs (``wudi.yml`` and ``ties.yml``, the latter in plain mergekit syntax), merges both
through the disk-to-disk engine and prints where the results are and how fast it went.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .engine import MergeOptions, run_merge
from .errors import ConfigError
from .catalog import list_methods
from .synthetic import make_llama_checkpoints

WUDI_YAML = """\
# WUDI-Merging (arXiv 2503.08099) with the official recipe: 300 Adam steps per linear weight
merge_method: wudi
base_model: models/base
models:
  - model: models/expert_1
  - model: models/expert_2
  - model: models/expert_3
parameters:
  steps: 300
  lr: 1.0e-5
  solver: adam
dtype: float32
out_dtype: bfloat16
"""

TIES_YAML = """\
# TIES exactly as mergekit runs it (per-tensor top-k, sign election, normalize: true)
merge_method: ties
base_model: models/base
models:
  - model: models/expert_1
    parameters:
      weight: 1.0
      density: 0.5
  - model: models/expert_2
    parameters:
      weight: [0.5, 1.0]        # a layer gradient: 0.5 at the first layer, 1.0 at the last
      density: 0.5
  - model: models/expert_3
    parameters:
      weight:
        - filter: mlp           # first matching filter wins
          value: 0.8
        - value: 1.0
      density: 0.3
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
"""


def run_demo(directory: str = "tritonmerge_demo", *, device: str = "cpu", quiet: bool = False) -> dict[str, Path]:
    """Build the demo models and merge them with ``wudi`` and ``ties``; returns the output folders."""
    root = Path(directory).absolute()
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    if "wudi" not in list_methods():
        raise ConfigError("the demo merges with 'wudi', but no method of that name is registered in this installation")
    models = root / "models"
    t0 = time.perf_counter()
    if not (models / "base" / "config.json").is_file():
        make_llama_checkpoints(
            models,
            hidden_size=128,
            intermediate_size=344,
            num_layers=4,
            vocab_size=2048,
            num_experts=3,
            dtype=torch.bfloat16,
            seed=0,
            shard_size_bytes=1 << 20,
        )
        say(f"built a Llama-shaped base and 3 experts in {models} ({time.perf_counter() - t0:.1f} s)")
    else:
        say(f"using the models already in {models}")
    outputs: dict[str, Path] = {}
    lines = []
    for name, text in (("wudi", WUDI_YAML), ("ties", TIES_YAML)):
        cfg_path = root / f"{name}.yml"
        cfg_path.write_text(text, encoding="utf-8")
        out = root / f"merged_{name}"
        opts = MergeOptions(device=device, overwrite=True, quiet=quiet, out_shard_size="2MB")
        say(f"merging with {name}: tritonmerge merge {cfg_path} {out} --overwrite")
        result = run_merge(str(cfg_path), out, opts, echo=say)
        outputs[name] = result.out_dir
        lines.append(
            f"  {name:5s} -> {result.out_dir}  ({len(result.plan.names)} tensors, {result.seconds:.2f} s, "
            f"{result.throughput / 1e6:.0f} MB/s of input)"
        )
    if not quiet:
        print("tritonmerge demo finished:")
        print("\n".join(lines))
        print(f"configs: {root / 'wudi.yml'}, {root / 'ties.yml'} (rerun with `tritonmerge merge CONFIG OUT_DIR`)")
    return outputs
