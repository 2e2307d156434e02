"""``model+lora`` references: a PEFT LoRA adapter applied to a model before the merge, with
mergekit 0.1.5's result (it loads the model with transformers in its stored dtype, applies the
adapter with peft's ``merge_and_unload`` and merges the saved result; docs/mergekit.md).

For every module the adapter targets, the model's ``<module>.weight`` W (shape ``[out, in]``)
becomes ``W + s * (B @ A)`` with A = ``lora_A`` (``[r, in]``), B = ``lora_B`` (``[out, r]``) and
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). As in peft, ``B @ A`` is
computed in float32 (float64 for a float64 W), then multiplied by ``s``, added to W in that
precision and rounded once to W's stored dtype.

Everything is checked from headers before any tensor is read (``LoraAdapter.open``,
``apply``); adapter features whose result would differ (DoRA, ``modules_to_save``, LoRA on
embeddings or convolutions, per-module ranks or alphas, ``fan_in_fan_out``, biases, layer
selections) are refused with one line naming the adapter file and the key.

Engine side: ``apply`` returns a view of the model whose changed tensors point at one safetensors
file in a hidden folder of the partial output folder, and a ``LoraInputs`` whose ``materialise``
writes that file (one tensor at a time) before the merge pass and whose ``cleanup`` removes it
before the output is committed. The other tensors are read from the model's own files; nothing
the user gave is modified.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError, ConfigError
from .io.index import (
    TORCH_TO_SAFETENSORS,
    CheckpointIndex,
    TensorInfo,
    itemsize,
    load_bin,
    read_safetensors_header,
)

LORA_DIR = ".lora-inputs"
PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# adapter_config.json keys whose non-default value changes the result in ways we do not compute
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_dora": (lambda v: bool(v), "DoRA adapters are not supported"),
    "modules_to_save": (lambda v: bool(v), "modules_to_save (fully trained extra modules) is not supported"),
    "fan_in_fan_out": (lambda v: bool(v), "fan_in_fan_out (Conv1D-style weights) is not supported"),
    "alpha_pattern": (lambda v: bool(v), "per-module alphas (alpha_pattern) are not supported"),
    "rank_pattern": (lambda v: bool(v), "per-module ranks (rank_pattern) are not supported"),
    "layers_to_transform": (lambda v: v is not None, "layers_to_transform is not supported"),
    "layers_pattern": (lambda v: bool(v), "layers_pattern is not supported"),
    "exclude_modules": (lambda v: bool(v), "exclude_modules is not supported"),
    "target_parameters": (lambda v: bool(v), "target_parameters (LoRA on bare parameters) is not supported"),
    "lora_bias": (lambda v: bool(v), "lora_bias is not supported"),
    "bias": (lambda v: v not in (None, "none"), "adapters that train biases (bias other than 'none') are not supported"),
    "use_qalora": (lambda v: bool(v), "QALoRA is not supported"),
    "megatron_config": (lambda v: bool(v), "Megatron adapters are not supported"),
    "trainable_token_indices": (lambda v: bool(v), "trainable_token_indices is not supported"),
    "layer_replication": (lambda v: bool(v), "layer_replication is not supported"),
}


@dataclass
class LoraAdapter:
    """A checked adapter folder: its scale and, per target module, the A and B tensors."""

    folder: Path
    config_file: Path
    weights_file: Path
    r: int
    scale: float
    target_modules: Any
    # module -> (A info, B info)
    modules: dict[str, tuple[TensorInfo, TensorInfo]]

    @property
    def files(self) -> list[Path]:
        return [self.config_file, self.weights_file]

    @classmethod
    def open(cls, folder: Path, what: str = "LoRA adapter") -> "LoraAdapter":
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{what}: the LoRA adapter {folder} is not a local folder (tritonmerge reads local adapter folders only)")
        cfile = folder / CONFIG_NAME
        try:
            cfg = json.loads(cfile.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot read {cfile}: {exc}") from None
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise ConfigError(f"{cfile}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
        for key, (bad, why) in _REFUSED.items():
            if key in cfg and bad(cfg[key]):
                raise ConfigError(f"{cfile}: {key}: {why}")
        r = cfg.get("r")
        alpha = cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"{cfile}: r must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise ConfigError(f"{cfile}: lora_alpha must be a number, got {alpha!r}")
        targets = cfg.get("target_modules")
        if not targets or not isinstance(targets, (str, list)):
            raise ConfigError(f"{cfile}: target_modules must name the adapted modules (a list or a regular expression), got {targets!r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        wfile = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if wfile is None:
            raise ConfigError(f"{what}: {folder} has no {' or '.join(WEIGHT_NAMES)}")
        try:
            if wfile.suffix == ".safetensors":
                infos = read_safetensors_header(wfile, str(wfile))[0]
            else:
                infos = {n: TensorInfo(n, tuple(t.shape), t.dtype, wfile) for n, t in load_bin(wfile, str(wfile)).items()}
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        parts: dict[str, dict[str, TensorInfo]] = {}
        for key, info in infos.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
            if m is None:
                raise ConfigError(
                    f"{wfile}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                    f"(expected {PREFIX}<module>.lora_A.weight / .lora_B.weight); only plain LoRA on linear layers is supported"
                )
            if not info.dtype.is_floating_point:
                raise ConfigError(f"{wfile}: tensor {key!r} has dtype {info.dtype}, not a floating-point one")
            parts.setdefault(m.group(1), {})[m.group(2)] = info
        if not parts:
            raise ConfigError(f"{wfile}: the adapter holds no LoRA weights")
        modules: dict[str, tuple[TensorInfo, TensorInfo]] = {}
        for module, ab in parts.items():
            for half in ("lora_A", "lora_B"):
                if half not in ab:
                    raise ConfigError(f"{wfile}: {PREFIX}{module}.{half}.weight is missing")
            a, b = ab["lora_A"], ab["lora_B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
                raise ConfigError(
                    f"{wfile}: {PREFIX}{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                    f"[r, in] and [out, r] with r = {r} (from {CONFIG_NAME})"
                )
            if not targets_module(targets, module):
                raise ConfigError(
                    f"{wfile}: {PREFIX}{module}.lora_A.weight: module {module!r} is not matched by target_modules "
                    f"{targets!r} of {CONFIG_NAME} (peft would not load it)"
                )
            modules[module] = (a, b)
        return cls(folder, cfile, wfile, r, float(scale), targets, modules)


def targets_module(targets: Any, module: str) -> bool:
    """peft's rule: a string is a regular expression the whole module name matches; a list names
    modules by their last name components (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return module.split(".")[-1] != "lm_head"
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def delta_apply(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * (B @ A)``, as peft's merge computes it: in float32 (float64 for a float64
    W), rounded once to W's dtype."""
    ct = torch.promote_types(torch.float32, w.dtype)
    delta = (b.to(ct) @ a.to(ct)) * scale
    return (w.to(ct) + delta).to(w.dtype)


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[tuple[int, int]]]:
    meta: dict[str, Any] = {}
    ranges = []
    pos = 0
    for name, dtype, shape in entries:
        n = itemsize(dtype)
        for s in shape:
            n *= s
        meta[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        ranges.append((pos, pos + n))
        pos += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    return h + b" " * (-len(h) % 8), ranges


@dataclass
class LoraInputs:
    """What ``materialise`` writes: per LoRA model, the changed tensors into one file."""

    folder: Path
    jobs: list[tuple[LoraAdapter, str, Path, list[tuple[TensorInfo, TensorInfo]]]]  # adapter, label, file, (original, target)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for *_, pairs in self.jobs for _, t in pairs)

    def materialise(self, say: Callable[[str], None] | None = None, bar: Any = None) -> None:
        """Write every adapted tensor (``bar``: a progress bar with ``update(bytes)``, or None)."""
        from .vocab_rows import _load  # reads one tensor given its TensorInfo

        self.folder.mkdir(parents=True, exist_ok=True)
        for adapter, label, file, pairs in self.jobs:
            if say is not None:
                say(f"applying LoRA adapter {adapter.folder} to {label}: {len(pairs)} tensor(s)")
            header, _ = _header([(t.name, t.dtype, t.shape) for _, t in pairs])
            tmp = file.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                for orig, target in pairs:
                    a_info, b_info = adapter.modules[orig.name[: -len(".weight")]]
                    out = delta_apply(_load(orig), _load(a_info), _load(b_info), adapter.scale).contiguous()
                    if out.numel():
                        f.write(out.view(torch.uint8).numpy().tobytes())
                    if bar is not None:
                        bar.update(target.nbytes)
            tmp.replace(file)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def apply(
    index: CheckpointIndex, adapter: LoraAdapter, partial: Path, k: int, plan: LoraInputs | None = None, path: Path | None = None
) -> tuple[CheckpointIndex, LoraInputs]:
    """A view of ``index`` with ``adapter`` applied: its targeted tensors point at
    ``partial``/.lora-inputs/<k>.safetensors (written by ``LoraInputs.materialise``). Checks that
    every adapted module is a 2-D weight of the model with matching shapes, and that every
    module target_modules selects has weights in the adapter. ``path``: the view's path (the
    config's ``LoraModelPath``, so that the view is told apart from the bare model)."""
    folder = partial / LORA_DIR
    plan = plan if plan is not None else LoraInputs(folder, [])
    where = f"{adapter.weights_file}"
    for module, (a, b) in adapter.modules.items():
        info = index.tensors.get(module + ".weight")
        key = f"{PREFIX}{module}.lora_A.weight"
        if info is None:
            raise ConfigError(f"{where}: {key}: {index.label} has no tensor {module + '.weight'!r} to apply it to")
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            raise ConfigError(
                f"{where}: {key}: {module + '.weight'} of {index.label} is {list(info.shape)} {info.dtype}; LoRA is "
                f"supported on linear (2-D floating-point) weights only"
            )
        if a.shape[1] != info.shape[1] or b.shape[0] != info.shape[0]:
            raise ConfigError(
                f"{where}: {key}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                f"{module + '.weight'} {list(info.shape)} of {index.label}"
            )
        if any(s in module.split(".")[-1] for s in ("embed", "wte", "wpe")):
            raise ConfigError(f"{where}: {key}: LoRA on embeddings is not supported")
    for name, info in index.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            module = name[: -len(".weight")]
            if module not in adapter.modules and targets_module(adapter.target_modules, module) and not (
                isinstance(adapter.target_modules, str) and adapter.target_modules == "all-linear" and "embed" in module
            ):
                raise ConfigError(
                    f"{adapter.config_file}: target_modules selects {module!r} of {index.label}, but "
                    f"{adapter.weights_file.name} has no {PREFIX}{module}.lora_A.weight"
                )
    names = [n for n in index.tensors if n[: -len(".weight")] in adapter.modules and n.endswith(".weight")]
    file = folder / f"{k}.safetensors"
    header, ranges = _header([(n, index.tensors[n].dtype, index.tensors[n].shape) for n in names])
    start = 8 + len(header)
    pairs = []
    tensors = dict(index.tensors)
    for n, (b0, b1) in zip(names, ranges):
        orig = index.tensors[n]
        target = TensorInfo(n, orig.shape, orig.dtype, file, start + b0, start + b1)
        tensors[n] = target
        pairs.append((orig, target))
    plan.jobs.append((adapter, index.label, file, pairs))
    view = CheckpointIndex(index.label, path if path is not None else index.path, tensors, [*index.files, *adapter.files], index.format)
    return view, plan
