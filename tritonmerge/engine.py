"""The disk-to-disk merge: plan -> (analysis pass) -> merge pass -> finalize.

The only module where IO meets math. ``plan_merge`` reads headers and indexes only and checks
everything a merge needs before any tensor data is read: every model's key set, shapes (a
vocabulary-size mismatch is named as such) and dtypes, every tensor's resolved parameters, the
output folder and the free disk. ``run_merge`` then

1. runs the method's whole-model analysis over a streaming source, only when the method asks
   for it (its decisions are saved with the output);
2. streams tensor by tensor (or row chunk by row chunk, for chunkable methods and tensors whose
   working set exceeds the memory budget; or, for methods that batch same-shaped tensors such
   as WUDI, batch by batch within a shard): reads of the next units run on a background thread
   while the current one computes on the chosen device, and the writer appends results to the
   pre-planned shard files on another thread;
3. writes config.json (``torch_dtype`` set), tokenizer and generation files, a model card, the
   resolved config and the decisions, then renames the hidden working folder into place.

Peak memory is about ``prefetch × (N+1) × U + C + W``: U the largest work unit (a tensor or a
row chunk), prefetch 2 (the unit being merged and the next one), C the method's working memory
on one unit (for the task-arithmetic family a few float32 copies of U) and W the writer's queue
(``max(16 MiB, largest output unit)``); it does not grow with the model.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import __version__, distributed
from .api import all_finite, merge_one
from .config import MergeConfig, load_config, model_ref, slice_tensor_map, tensor_t, validate_resolved
from .context import MergeReport, ModelDecisions, TensorContext, TensorDecisions, layer_index
from .distributed import SINGLE, Ranks
from .errors import CheckpointError, ConfigError, NonFiniteInputError, NonFiniteResultError, OutputLockedError, TritonMergeError
from .io import folder as outfolder
from .io.index import CheckpointIndex, dtype_name, itemsize, open_checkpoint
from .io.reader import Prefetcher, TensorReader
from .io.lock import OutputLock
from .io.writer import (
    MANIFEST_NAME,
    Manifest,
    OutputEntry,
    ShardPlan,
    ShardedWriter,
    commit,
    parse_size,
    partial_dir,
    plan_shards,
    replaced_dir,
    write_index,
)
from .backends.cpu.merge import known_nonfinite
from .registry import Composite

log = logging.getLogger("tritonmerge")

# in the partial folder of a distributed merge: each rank's bytes merged so far, for rank 0's bar
PROGRESS_DIR = ".progress"

# a rank whose run rank 0 refused exits with this status and no message of its own
EXIT_REFUSED_ELSEWHERE = 2

VOCAB_NAMES = ("embed_tokens", "lm_head", "wte", "tok_embeddings", "word_embeddings", "embed_out", "output.weight")


@dataclass
class MergeOptions:
    """How to run a merge (what to merge is the ``MergeConfig``)."""

    device: str = "cpu"
    out_shard_size: int | str = "5GB"
    dry_run: bool = False
    resume: bool = False
    overwrite: bool = False
    # with overwrite: also replace an output folder that is not a previous tritonmerge output
    force_overwrite: bool = False
    # skip the NaN/Inf check of inputs, and write NaN/Inf results with a warning
    allow_nonfinite: bool = False
    quiet: bool = False
    backend: str | None = None
    # input working set of one work unit, (N+1) x unit bytes; larger tensors are merged in row
    # chunks when their method allows it
    memory_budget: int | str = "256MiB"
    prefetch: bool = True
    # input bytes held (being merged + read ahead), in units of the largest work unit's inputs
    prefetch_depth: float = 2.0
    async_write: bool = True
    # free bytes left on the output disk after the output is written
    disk_margin: int | str = "64MiB"
    # mergekit's --no-copy-tokenizer / --no-write-model-card
    copy_tokenizer: bool = True
    write_model_card: bool = True
    # mergekit's --random-seed: the `seed` of random methods whose config does not set one
    random_seed: int | None = None


@dataclass
class WorkUnit:
    """One merge step: a whole tensor, or rows [r0, r1) of it."""

    name: str
    rows: tuple[int, int] | None
    in_bytes: int  # bytes read for this unit, all models together
    out_bytes: int

    @property
    def element_offset_rows(self) -> int:
        return self.rows[0] if self.rows else 0


@dataclass
class MergePlan:
    """Everything decided before tensor data is read."""

    config: MergeConfig
    options: MergeOptions
    out_dir: Path
    tmp_dir: Path
    base: CheckpointIndex
    experts: list[CheckpointIndex]
    names: list[str]  # processing order
    params: dict[str, Any]  # tensor -> validated params
    out_entries: dict[str, OutputEntry]
    shards: list[ShardPlan]
    units: list[WorkUnit]
    needs_analysis: bool
    analysis_params: Any
    n_layers: int
    fingerprint: str
    chunked: dict[str, int] = field(default_factory=dict)  # tensor -> number of chunks
    peak_bytes: int = 0
    prefetch_budget: int = 0
    writer_budget: int = 0
    notes: list[str] = field(default_factory=list)
    # the permuted embedding rows of a tokenizer_source/tokenizer config (vocab_rows.RowsPlan)
    rows: Any = None
    # the LoRA-applied tensors of `model+lora` inputs (lora.LoraInputs)
    loras: Any = None

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def output_bytes(self) -> int:
        return sum(s.file_bytes for s in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(u.in_bytes for u in self.units)

    def describe(self) -> str:
        """The human-readable plan printed by ``--dry-run``."""
        cfg = self.config
        gb = lambda b: f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"  # noqa: E731
        lines = [
            f"method:        {cfg.merge_method}" + (f" (runs as {cfg.spec.name})" if cfg.spec.name != cfg.merge_method else ""),
            f"base model:    {model_ref(self.base.path)} ({self.base.format}, {len(self.base.files)} file(s))",
            *[f"model {i}:       {model_ref(e.path)} ({e.format}, {len(e.files)} file(s))" for i, e in enumerate(self.experts)],
            f"parameters:    {json.dumps(_params_json(self.analysis_params) if self.analysis_params is not None else cfg.resolve(), default=str)}",
            f"tensors:       {len(self.names)} ({sum(1 for n in self.names if self.base.tensors[n].dtype.is_floating_point)} floating point), "
            f"{self.n_layers} layers",
            f"work units:    {len(self.units)}" + (f" ({len(self.chunked)} tensor(s) in row chunks)" if self.chunked else ""),
            f"analysis pass: {'yes' if self.needs_analysis else 'no'}",
            f"input read:    {gb(self.input_bytes)}" + (" (twice: analysis + merge)" if self.needs_analysis else ""),
            f"output:        {gb(self.output_bytes)} in {len(self.shards)} shard(s), dtype "
            + (dtype_name(cfg.out_dtype) if cfg.out_dtype else "as stored"),
            f"peak memory:   ~{gb(self.peak_bytes)} (estimated: inputs read ahead {gb(self.prefetch_budget)}, "
            f"write queue {gb(self.writer_budget)})",
            f"device:        {self.options.device}",
            f"output folder: {self.out_dir}",
        ]
        lines += [f"note:          {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class MergeResult:
    """What ``run_merge`` returns: where the output is and how fast it went."""

    out_dir: Path
    plan: MergePlan
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    report: MergeReport | None = None
    resumed_shards: int = 0
    nonfinite: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Input bytes merged per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# plan


def _label(kind: str, name: str) -> str:
    return f"{kind} {name!r}"


def _n_layers(base: CheckpointIndex) -> int:
    cfg = base.config() or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    text_cfg = cfg.get("text_config")
    if isinstance(text_cfg, dict) and isinstance(text_cfg.get("num_hidden_layers"), int):
        return text_cfg["num_hidden_layers"]
    layers = [layer_index(n) for n in base.tensors]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else 1


def _check_compatible(base: CheckpointIndex, experts: Sequence[CheckpointIndex], names: Sequence[str]) -> list[str]:
    notes = []
    base_keys = set(base.tensors)
    for e in experts:
        keys = set(e.tensors)
        missing, extra = sorted(base_keys - keys), sorted(keys - base_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) the base does not, e.g. {extra[:3]}")
            raise CheckpointError(f"{e.label} ({e.path}) does not have the base model's tensors: it {' and '.join(parts)}")
    mixed = set()
    for name in names:
        b = base.tensors[name]
        for e in experts:
            t = e.tensors[name]
            if t.shape != b.shape:
                if (
                    len(t.shape) == len(b.shape) >= 1
                    and t.shape[1:] == b.shape[1:]
                    and any(v in name for v in VOCAB_NAMES)
                ):
                    raise CheckpointError(
                        f"vocabulary size mismatch: tensor {name!r} has {t.shape[0]} rows (tokens) in {e.label} "
                        f"({t.file}) but {b.shape[0]} in {base.label}; the models use different "
                        f"tokenizers or added tokens, and tritonmerge merges only models with the base's vocabulary"
                    )
                raise CheckpointError(
                    f"shape mismatch: tensor {name!r} is {list(t.shape)} in {e.label} ({t.file}) but "
                    f"{list(b.shape)} in {base.label} ({b.file})"
                )
            if t.dtype != b.dtype:
                if t.dtype.is_floating_point and b.dtype.is_floating_point:
                    mixed.add(f"{dtype_name(t.dtype)} in {e.label} vs {dtype_name(b.dtype)} in the base")
                else:
                    raise CheckpointError(
                        f"dtype mismatch: tensor {name!r} is {dtype_name(t.dtype)} in {e.label} ({t.file}) but "
                        f"{dtype_name(b.dtype)} in {base.label}"
                    )
    for m in sorted(mixed):
        notes.append(f"floating-point dtypes differ ({m}); all are merged in float32")
    return notes


def _params_json(p: Any) -> dict[str, Any]:
    if isinstance(p, Composite):
        return p.as_dict()
    return p.model_dump(by_alias=True)


def _params_key(p: Any) -> str:
    return json.dumps(_params_json(p), sort_keys=True, default=str)


def _fingerprint(cfg: MergeConfig, options: MergeOptions, models: Sequence[CheckpointIndex], shards: Sequence[ShardPlan]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{cfg.spec.name}|{__version__}|{options.device}|{options.backend}".encode())
    for m in models:
        for f in m.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    for s in shards:
        h.update(s.filename.encode())
        h.update(s.header)
    return h.hexdigest()


def plan_merge(config: MergeConfig | str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, options: MergeOptions | None = None) -> MergePlan:
    """Read headers and indexes, validate everything, decide the work; reads no tensor data and
    writes nothing."""
    options = options or MergeOptions()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if options is not None and options.random_seed is not None and "seed" in cfg.spec.params.model_fields and "seed" not in cfg.parameters:
        cfg.parameters["seed"] = int(options.random_seed)
    # the real path: a link to a folder is followed, so the folder it names is replaced (the link
    # stays valid) and the input checks compare what will actually be written
    out_dir = Path(os.path.realpath(Path(out_dir).expanduser().absolute()))
    try:
        shard_bytes = parse_size(options.out_shard_size)
        budget = parse_size(options.memory_budget)
        parse_size(options.disk_margin, allow_zero=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    if cfg.slices is None:
        base, experts, notes = _open_models(cfg, out_dir)
        n_layers = _n_layers(base)
        params = _tensor_params(cfg, list(base.tensors), n_layers)
    else:
        base, experts, notes, params, n_layers = _open_slices(cfg, out_dir)
    needs_analysis, analysis_params = _analysis_scope(cfg, params)
    if needs_analysis and cfg.slices is not None:
        raise ConfigError(
            f"{cfg.merge_method} with these parameters runs a whole-model analysis, which is not supported with "
            f"`slices`; list whole models under `models`"
        )
    out_entries = {
        name: OutputEntry(name, info.shape, cfg.output_dtype(info.dtype)) for name, info in base.tensors.items()
    }
    shards = plan_shards(list(out_entries.values()), shard_bytes)
    order = [e.name for s in shards for e in s.entries]
    units, chunked = _work_units(cfg, [base, *experts], order, out_entries, params, budget)
    prefetch_budget, writer_budget, peak = _memory_plan(options, units, base, len(experts))
    return MergePlan(
        config=cfg,
        options=options,
        out_dir=out_dir,
        tmp_dir=partial_dir(out_dir),
        base=base,
        experts=experts,
        names=order,
        params=params,
        out_entries=out_entries,
        shards=shards,
        units=units,
        needs_analysis=needs_analysis,
        analysis_params=analysis_params,
        n_layers=n_layers,
        fingerprint=_fingerprint(cfg, options, [base, *experts], shards)
        + ("" if getattr(base, "_tokenizer_rows", None) is None else "-" + hashlib.sha256(base._tokenizer_rows.vocab.fingerprint().encode()).hexdigest()[:16]),
        chunked=chunked,
        peak_bytes=peak,
        prefetch_budget=prefetch_budget,
        writer_budget=writer_budget,
        notes=notes,
        rows=getattr(base, "_tokenizer_rows", None),
        loras=getattr(base, "_lora_inputs", None),
    )


def _open_models(cfg: MergeConfig, out_dir: Path) -> tuple[CheckpointIndex, list[CheckpointIndex], list[str]]:
    """Every input's headers, checked: none of them lies where the output goes, they hold the
    same tensors, and the method takes this many experts. Returns (base, experts, notes)."""
    base = open_checkpoint(cfg.base.path, _label("base model", cfg.base.name))
    experts = [open_checkpoint(m.path, _label("model", m.name)) for m in cfg.experts]
    (base, *experts), loras = _lora_views([(m.path, i) for m, i in zip([cfg.base, *cfg.experts], [base, *experts])], out_dir)
    _check_inputs_untouched(out_dir, cfg, [base, *experts])
    base, experts = _vocabulary_views(cfg, base, experts, out_dir)
    base._lora_inputs = loras
    notes = _check_compatible(base, experts, list(base.tensors))
    rows = getattr(base, "_tokenizer_rows", None)
    if rows is not None:
        src = rows.vocab.spec.source
        notes.append(
            f"output vocabulary: {len(rows.vocab.vocab)} tokens ({'from ' + str(src) if isinstance(src, Path) else src}), "
            f"{rows.vocab.n_rows} embedding rows; {', '.join(rows.originals)} rebuilt in its order before merging"
        )
    inner, _ = cfg.spec.innermost(validate_resolved(cfg, cfg.resolve("", 0.0), ""))
    if need := inner.experts_wanted(len(experts)):
        raise ConfigError(f"{inner.name} needs {need} model(s) besides the base, the config gives {len(experts)}")
    return base, experts, notes


def _lora_views(models: Sequence[tuple[Path, CheckpointIndex]], out_dir: Path) -> tuple[list[CheckpointIndex], Any]:
    """Views of the `model+lora` inputs (config.LoraModelPath) whose adapted tensors are to be
    written into the partial folder before the merge pass (lora.py), and the plan of those
    writes (None without LoRA inputs). A model+adapter listed twice is applied once."""
    from . import lora

    plan = None
    done: dict[Path, CheckpointIndex] = {}
    out = []
    for path, index in models:
        adapter = getattr(path, "lora", None)
        if adapter is None:
            out.append(index)
            continue
        if path not in done:
            done[path], plan = lora.apply(index, lora.LoraAdapter.open(adapter, index.label), partial_dir(out_dir), len(done), plan, path)
        out.append(done[path])
    return out, plan


def _vocabulary_views(
    cfg: MergeConfig, base: CheckpointIndex, experts: list[CheckpointIndex], out_dir: Path
) -> tuple[CheckpointIndex, list[CheckpointIndex]]:
    """With a tokenizer other than the base's (tritonmerge/tokenizer.py): views whose embedding
    tensors are the models' rows in the output vocabulary's order (vocab_rows.py), to be written
    into the partial folder before the merge pass; the plan of those rows rides on the base view
    as ``_tokenizer_rows``. ``tokenizer_source: base`` over models with the base's vocabulary
    changes nothing (the base's tokenizer files are copied as they are)."""
    spec = cfg.tokenizer
    if spec is None or spec.source is None:
        return base, experts
    from . import tokenizer as tok
    from . import vocab_rows

    inputs = []
    if cfg.base_given:
        inputs.append((cfg.base.name, cfg.base.path))
    inputs += [(m.name, m.path) for m in cfg.experts]
    plain_base = spec.source == "base" and not spec.tokens and not spec.pad_to_multiple_of
    try:
        plan = tok.build_vocab(spec, cfg.base.path, cfg.base.name, inputs)
    except CheckpointError:
        if plain_base:  # a model without tokenizer.json: as without tokenizer_source (same vocabularies only)
            return base, experts
        raise
    models = list(dict.fromkeys(p for _, p in inputs))
    if plain_base:
        # the base's vocabulary everywhere: merged as they are (padding rows past the vocabulary
        # kept, where mergekit would cut them)
        same = all(plan.perms[m] == list(range(len(plan.vocab))) and plan.rows[m] == plan.rows[cfg.base.path] for m in models)
        if same:
            return base, experts
    view_models = [cfg.base.path, *[m.path for m in cfg.experts]]
    views, rows = vocab_rows.apply(
        plan, cfg.dtype, [base, *experts], view_models, models, cfg.base.path if cfg.base_given else None, partial_dir(out_dir)
    )
    views[0]._tokenizer_rows = rows
    return views[0], views[1:]


def _open_slices(cfg: MergeConfig, out_dir: Path) -> tuple[CheckpointIndex, list[CheckpointIndex], list[str], dict[str, Any], int]:
    """A slices config as a merge of whole models: one view per method input (base, then each
    expert) whose tensors carry the output names and point at the input tensors the slices map
    them to, so that the rest of the engine runs unchanged. Returns (base view, expert views,
    notes, tensor -> validated params, number of output layers)."""
    real: dict[Path, CheckpointIndex] = {}
    # every role of a slice (its base too) is one of its sources: config._roles sees to that
    for sl in cfg.slices:
        for m, _ in sl.sources:
            if m.path not in real:
                real[m.path] = open_checkpoint(m.path, _label("model", m.name))
    lora_views, loras = _lora_views(list(real.items()), out_dir)
    real = dict(zip(real, lora_views))
    _check_inputs_untouched(out_dir, cfg, list(real.values()))
    mapping, n_out = slice_tensor_map(cfg, {p: list(i.tensors) for p, i in real.items()}, {p: _n_layers(i) for p, i in real.items()})
    n_roles = 1 + len(cfg.slices[0].experts)
    views = []
    for r in range(n_roles):
        paths = list(dict.fromkeys(src.inputs[r][0] for src in mapping.values()))
        names = ", ".join(real[p].label for p in paths)
        views.append(
            CheckpointIndex(
                label=("base model" if r == 0 else f"model {r - 1}") + f" of the slices ({names})",
                path=paths[0],
                tensors={out: real[src.inputs[r][0]].tensors[src.inputs[r][1]] for out, src in mapping.items()},
                files=[f for p in paths for f in real[p].files],
                format=real[paths[0]].format,
            )
        )
    base, experts = views[0], views[1:]
    base._lora_inputs = loras
    notes = _check_compatible(base, experts, list(base.tensors))
    cache: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name, src in mapping.items():
        resolved = cfg.resolve(name, src.t, slice_index=src.slice_index, input_names=[n for _, n in src.inputs[1:]])
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = validate_resolved(cfg, resolved, name)
        params[name] = cache[key]
    return base, experts, notes, params, n_out


def _tensor_params(cfg: MergeConfig, names: Sequence[str], n_layers: int) -> dict[str, Any]:
    """Each tensor's validated parameters (gradients and filters resolved); equal resolutions
    share one validated object."""
    cache: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name in names:
        resolved = cfg.resolve(name, tensor_t(name, n_layers))
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = validate_resolved(cfg, resolved, name)
        params[name] = cache[key]
    return params


def _analysis_scope(cfg: MergeConfig, params: Mapping[str, Any]) -> tuple[bool, Any]:
    """(whether the method runs a whole-model analysis, the one parameter set it runs with)."""
    needs_analysis = cfg.spec.needs_analysis(next(iter(params.values())))
    distinct = {_params_key(p): p for p in params.values()}
    analysis_params = next(iter(distinct.values())) if len(distinct) == 1 else None
    if needs_analysis and analysis_params is None:
        raise ConfigError(
            f"{cfg.merge_method} runs a whole-model analysis, which needs one set of parameters for the whole "
            f"model; this config varies parameters by tensor (gradients or filters)"
        )
    return needs_analysis, analysis_params


def _work_units(
    cfg: MergeConfig,
    models: Sequence[CheckpointIndex],
    order: Sequence[str],
    out_entries: Mapping[str, OutputEntry],
    params: Mapping[str, Any],
    budget: int,
) -> tuple[list[WorkUnit], dict[str, int]]:
    """The units of work in output order: whole tensors, and row chunks of the tensors larger
    than the memory budget whose method merges rows independently. Returns (units, chunk count
    per chunked tensor)."""
    base = models[0]
    units: list[WorkUnit] = []
    chunked: dict[str, int] = {}
    for name in order:
        b = base.tensors[name]
        in_set = sum(m.tensors[name].nbytes for m in models)
        out_b = out_entries[name].nbytes
        spec_inner, inner_params = cfg.spec.innermost(params[name])
        rows_total = b.shape[0] if b.shape else 0
        can_chunk = (
            b.dtype.is_floating_point
            and len(b.shape) >= 1
            and rows_total > 1
            and in_set > budget
            and bool(spec_inner.chunkable(inner_params))
        )
        if not can_chunk:
            units.append(WorkUnit(name, None, in_set, out_b))
            continue
        rows_per = max(1, budget // max(in_set // rows_total, 1))
        r = count = 0
        while r < rows_total:
            r1 = min(rows_total, r + rows_per)
            frac = (r1 - r) / rows_total
            units.append(WorkUnit(name, (r, r1), int(in_set * frac), int(out_b * frac)))
            r, count = r1, count + 1
        chunked[name] = count
    return units, chunked


def _memory_plan(options: MergeOptions, units: Sequence[WorkUnit], base: CheckpointIndex, n_experts: int) -> tuple[int, int, int]:
    """(bytes read ahead, bytes queued for the writer, estimated peak)."""
    largest_in = max((u.in_bytes for u in units), default=0)
    largest_out = max((u.out_bytes for u in units), default=0)
    prefetch_budget = int(max(options.prefetch_depth, 1.0) * largest_in) if options.prefetch else largest_in
    writer_budget = max(16 << 20, largest_out)
    # the method's working memory: a few float32 copies of one unit (task vectors, masks, output)
    elems = max((u.in_bytes // max(n_experts + 1, 1)) // max(itemsize(base.tensors[u.name].dtype), 1) for u in units) if units else 0
    compute = (n_experts + 2) * elems * 4
    return prefetch_budget, writer_budget, prefetch_budget + compute + writer_budget


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _check_inputs_untouched(out_dir: Path, cfg: MergeConfig, models: Sequence[CheckpointIndex]) -> None:
    """Refuse an output folder that is, holds or lies inside an input (a model folder or file, a
    weights file an index points to, the config file), with or without --overwrite: replacing it
    would delete what the user gave us. Compared on real paths, so links cannot hide a match.
    The partial folder beside the output and the one the old output is moved to count too."""
    protected: list[tuple[str, Path]] = []
    for m in models:
        protected.append((f"the folder of {m.label}" if m.path.is_dir() else m.label, Path(os.path.realpath(m.path))))
        protected += [(f"a weights file of {m.label}", Path(os.path.realpath(f))) for f in m.files]
    if cfg.source_path is not None:
        protected.append(("the config file", Path(os.path.realpath(cfg.source_path))))
    written = [("OUT_DIR", out_dir), ("the partial folder", partial_dir(out_dir)), ("the replaced output", replaced_dir(out_dir))]
    for what_out, target in written:
        for what_in, src in protected:
            if target == src:
                relation = "is"
            elif _inside(src, target):
                relation = "contains"
            elif _inside(target, src):
                relation = "lies inside"
            else:
                continue
            lead = f"output folder {out_dir}" if what_out == "OUT_DIR" else f"{what_out} of output folder {out_dir} ({target})"
            raise CheckpointError(
                f"{lead} {relation} {what_in} ({src}); inputs are never overwritten: choose an output folder outside every input"
            )


def _check_replaceable(folder: Path, force: bool, what: str) -> None:
    """--overwrite deletes only a previous tritonmerge output (it has our manifest) or an empty
    folder, unless --force-overwrite says the user means it."""
    if force or (folder / MANIFEST_NAME).is_file() or not any(folder.iterdir()):
        return
    sample = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{what} {folder} is not a tritonmerge output (it has no {MANIFEST_NAME}) and holds {len(sample)} "
        f"entr{'y' if len(sample) == 1 else 'ies'} (e.g. {', '.join(sample[:3])}); --overwrite replaces only "
        f"earlier tritonmerge outputs: choose another folder, or add --force-overwrite to replace it"
    )


def _check_output(plan: MergePlan) -> str:
    """Refuse an existing output unless --overwrite/--resume; returns 'fresh', 'resume' or
    'complete' (the output folder already holds this very merge). Reads only names and the
    manifest, so it runs again once the lock is held."""
    opts, out, tmp = plan.options, plan.out_dir, plan.tmp_dir
    overwrite = opts.overwrite or opts.force_overwrite
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a folder")
    if opts.resume and out.is_dir() and not tmp.exists():
        try:
            data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if data.get("plan") == plan.fingerprint:
            return "complete"
        if not overwrite:
            raise CheckpointError(
                f"output folder {out} already exists and is not the finished output of this merge; "
                f"use --overwrite to replace it"
            )
    if out.exists() and not (overwrite or opts.resume):
        raise CheckpointError(f"output folder {out} already exists; use --overwrite to replace it or --resume to continue")
    if out.exists() and opts.resume and not overwrite:
        raise CheckpointError(
            f"output folder {out} already exists; --resume continues only an unfinished merge (add --overwrite to replace it)"
        )
    if out.exists():
        _check_replaceable(out, opts.force_overwrite, "output folder")
    old = replaced_dir(out)
    if old.exists():
        _check_replaceable(old, False, "the folder an earlier output was moved to,")
    if tmp.exists():
        if not tmp.is_dir():
            raise CheckpointError(f"{tmp} (where the output is assembled) exists and is not a folder")
        _check_replaceable(tmp, False, "the partial folder")
        if opts.resume:
            return "resume"
        if not overwrite:
            raise CheckpointError(
                f"an unfinished merge into {out} was found in {tmp}; use --resume to continue it or --overwrite to start over"
            )
    return "fresh"


def _size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"


def _check_disk(plan: MergePlan, already: int) -> str:
    """Refuse when the output disk cannot take the rest of the output plus the margin; returns the
    line ``--dry-run`` prints."""
    margin = parse_size(plan.options.disk_margin, allow_zero=True)
    to_write = plan.output_bytes - already
    probe = plan.out_dir.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    done = f" ({_size_text(already)} already finished)" if already else ""
    line = (
        f"writes {_size_text(to_write)}{done} and keeps a margin of {_size_text(margin)} (--disk-margin) free: "
        f"needs {_size_text(to_write + margin)}, {_size_text(free)} free in {probe}"
    )
    if free < to_write + margin:
        raise CheckpointError(f"not enough free disk for the output: the merge {line}")
    return line


def _check_backend(plan: MergePlan, device: torch.device) -> None:
    """An explicit backend that cannot run this merge on this device is refused before anything
    is written (auto always finds one: the torch reference)."""
    from . import backends

    want = backends.requested_backend(plan.options.backend)
    if want in ("auto", "torch"):
        return
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    reason = None
    if want in ("cuda", "triton") and device.type != "cuda" and not (want == "triton" and interpreted):
        reason = f"it runs on CUDA devices and the merge runs on --device {plan.options.device}"
    elif want == "cpu" and device.type != "cpu":
        reason = f"it runs on the CPU and the merge runs on --device {plan.options.device}"
    else:
        status = {"triton": backends.triton_status, "cuda": lambda: backends.extension_status()[1], "cpu": backends.cpu_status}
        reason = status[want]()
    if reason is None:
        inner, _ = plan.config.spec.innermost(next(iter(plan.params.values())))
        if inner.implementation(want) is None:
            reason = f"{inner.name} has no {want} implementation"
    if reason:
        raise ConfigError(f"backend {want!r} cannot run this merge: {reason}; leave --backend unset (auto) to let tritonmerge choose")


# ------------------------------------------------------------------------------------------------
# streaming source for analysis passes


class StreamingSource:
    """``TensorSource`` over checkpoints on disk; reads the next name in ``names`` order on a
    background thread while the caller works on the current one."""

    def __init__(
        self,
        plan: MergePlan,
        reader: TensorReader,
        device: torch.device,
        checked: set[str] | None = None,
        ranks: Ranks = SINGLE,
        local: set[str] | None = None,
    ) -> None:
        self._plan = plan
        self._check = _InputCheck(plan, checked, device)
        self._pending: tuple[WorkUnit, list[torch.Tensor], frozenset[int], Any] | None = None
        self._reader = reader
        self._device = device
        self.names = list(plan.names)
        self.n_experts = plan.n_experts
        # a distributed merge: this rank loads only ``local``, and the analyses combine results
        # through the rank group (source.local_names / gathered / count_combiner)
        self._ranks = ranks
        self._local = local
        if ranks.distributed:
            self.sum_counts = ranks.sum_counts
        # read ahead in the order this process loads: its own tensors in plan order
        order = self.names if local is None else [n for n in self.names if n in local]
        self._next = {a: b for a, b in zip(order, order[1:])}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tritonmerge-analysis")
        self._ahead: tuple[str, concurrent.futures.Future] | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    def local_names(self, names: Sequence[str]) -> list[str]:
        """The names of ``names`` this process loads; the analysis then loads them in this order,
        so the reads ahead follow it (plan order would read the tensors it skips, and read what it
        asks for on its own thread)."""
        mine = list(names) if self._local is None else [n for n in names if n in self._local]
        self._next = dict(zip(mine, mine[1:]))
        return mine

    def gather(self, per_name: Mapping[str, Any]) -> dict[str, Any]:
        if not self._ranks.distributed:
            return dict(per_name)
        merged: dict[str, Any] = {}
        for part in self._ranks.all_gather(dict(per_name)):
            merged.update(part)
        return merged

    def shape(self, name: str) -> tuple[int, ...]:
        return self._plan.base.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._plan.base.tensors[name].dtype

    def _read(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor], frozenset[int]]:
        return _read_unit(self._plan, self._reader, WorkUnit(name, None, 0, 0), self._check)

    def load(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # the analysis has finished with the tensor loaded before: its input check completes now
        self.settle()
        if self._ahead is not None and self._ahead[0] == name:
            base, experts, done = self._ahead[1].result()
        else:
            if self._ahead is not None:
                self._ahead[1].result()  # never leave a read running unobserved
            base, experts, done = self._read(name)
        self._ahead = None
        nxt = self._next.get(name)
        if nxt is not None:
            self._ahead = (nxt, self._pool.submit(self._read, nxt))
        self._pending = (WorkUnit(name, None, 0, 0), [base, *experts], done, self._check.begin(done))
        return _to_device(self._plan, base, experts, self._device, self._plan.out_entries[name].dtype)

    def settle(self, failed: bool = False) -> None:
        """Finish the input check of the tensor loaded last (the analysis computed on it under
        an audit of the fused loops' reads); ``failed``: the analysis raised, check exactly."""
        pending, self._pending = self._pending, None
        if pending is not None:
            unit, tensors, done, audit = pending
            self._check.finish(audit, [(unit, tensors, done)], failed)

    def close(self) -> None:
        if self._pending is not None:
            self._check.abandon(self._pending[3])
            self._pending = None
        if self._ahead is not None:
            try:
                self._ahead[1].result()
            except Exception:
                pass
        self._pool.shutdown(wait=True)


def _single_threaded_kernels() -> None:
    from .backends.cpu import kernels as ck

    ck.limit_threads(1)


def _read_unit(
    plan: MergePlan, reader: TensorReader, unit: WorkUnit, check: "_InputCheck"
) -> tuple[torch.Tensor, list[torch.Tensor], frozenset[int]]:
    """Read one unit of every model. Runs on the prefetch thread (the reader faults mapped
    inputs in there, so the compute thread finds them resident), with the part of the NaN/Inf
    check that ``check`` does ahead, overlapping the merge of the previous unit. Returns the
    tensors and the models whose check is done."""
    base = reader.read(plan.base.tensors[unit.name], unit.rows, plan.base.label)
    experts = [reader.read(e.tensors[unit.name], unit.rows, e.label) for e in plan.experts]
    return base, experts, check.ahead_of_use(unit, [base, *experts])


class _InputCheck:
    """The NaN/Inf check of the inputs, refused where they enter: once merged, a top-k or a sign
    election can hide them, and the output check could no longer say which model holds them.

    It costs no read of its own where the fused CPU loops read an input whole: they count
    NaN/Inf in the same pass (``backends.cpu.kernels.InputAudit``). After the computation, the
    inputs they did not cover are checked exactly, and a nonzero count runs the exact per-model
    check that names model, file and tensor (the count can also come from an overflowed τ). The
    models the previous unit's computation left uncovered (the base of ``linear``, an expert
    LwPTV pruned, every model where no fused loop runs: other devices, other methods) are
    checked on the prefetch thread instead, overlapping the merge. ``checked`` holds the tensors
    checked whole (by the analysis pass), which are not checked twice."""

    def __init__(self, plan: MergePlan, checked: set[str] | None, device: torch.device) -> None:
        from . import backends

        self._models = (plan.base, *plan.experts)
        self._all = self.all = frozenset(range(len(self._models)))
        self._enabled = not plan.options.allow_nonfinite
        self._checked = checked
        self._fused = device.type == "cpu" and backends.cpu_status() is None
        # models the prefetch thread checks; replaced (never mutated) by the compute thread
        self._ahead = frozenset() if self._fused else self._all

    def ahead_of_use(self, unit: WorkUnit, tensors: Sequence[torch.Tensor]) -> frozenset[int]:
        """Prefetch thread: the checks done before the merge; returns the models done."""
        if not self._enabled or (self._checked is not None and unit.rows is None and unit.name in self._checked):
            return self._all
        ahead = self._ahead
        for i in sorted(ahead):
            _check_input_finite(self._models[i], unit, tensors[i])
        return ahead

    def begin(self, done: frozenset[int]) -> Any:
        """Compute thread, before the computation: an audit of the fused loops' reads, or None."""
        if not self._fused or done == self._all:
            return None
        from .backends.cpu import kernels as ck

        return ck.start_audit()

    def abandon(self, audit: Any) -> None:
        if audit is not None:
            from .backends.cpu import kernels as ck

            ck.stop_audit(audit)

    def finish(self, audit: Any, units: Sequence[tuple[WorkUnit, Sequence[torch.Tensor], frozenset[int]]], failed: bool = False) -> None:
        """Compute thread, after the computation on ``units`` (with what each read and had
        done): the checks still due. ``failed``: the computation raised, so its count is
        unknown and every input not done is checked exactly (a NaN/Inf input is then the
        error reported)."""
        self.abandon(audit)
        uncovered: set[int] = set()
        for unit, tensors, done in units:
            if done == self._all:
                continue
            exact = failed or audit is None or audit.nonfinite > 0
            for i, t in enumerate(tensors):
                covered = audit is not None and t.device.type == "cpu" and audit.covers(t)
                if not covered:
                    uncovered.add(i)
                if i not in done and (exact or not covered):
                    _check_input_finite(self._models[i], unit, t)
            if self._checked is not None and unit.rows is None:
                self._checked.add(unit.name)
        if self._fused and not failed and any(done != self._all for _, _, done in units):
            self._ahead = frozenset(uncovered)


def _check_input_finite(model: CheckpointIndex, unit: WorkUnit, t: torch.Tensor) -> None:
    if not t.is_floating_point() or all_finite(t):
        return
    info = model.tensors[unit.name]
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    rows = f" (rows {unit.rows[0]}..{unit.rows[1] - 1})" if unit.rows else ""
    raise NonFiniteInputError(
        f"{model.label} ({model.path}) holds {n_nan} NaN and {n_inf} Inf value(s) in tensor {unit.name!r}{rows}, "
        f"file {info.file.name}; refusing to merge it (pass --allow-nonfinite to merge it as it is)"
    )


def _to_device(
    plan: MergePlan, base: torch.Tensor, experts: list[torch.Tensor], device: torch.device, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    nb = device.type == "cuda"
    output = out_dtype if out_dtype is not None else base.dtype

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device != device:
            t = t.to(device, non_blocking=nb)
        if (dt := plan.config.input_dtype(t.dtype, output)) is not None:
            t = t.to(dt)
        return t

    return move(base), [move(e) for e in experts]


# ------------------------------------------------------------------------------------------------
# run


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch.cuda.is_available() is False on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported")
    return dev


def run_merge(
    config: MergeConfig | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge the checkpoints named by ``config`` into ``out_dir`` (see the module docstring).

    ``config``: a ``MergeConfig``, a YAML path or string, or a dict in mergekit's schema.
    With ``options.dry_run`` the plan is printed and nothing is read or written.

    Every check that needs no tensor data (options, backend, config, headers, inputs against the
    output, the output's state, free disk, the lock) runs before the partial folder is created,
    so a refused run leaves nothing behind and the corrected command simply works."""
    options = options or MergeOptions()
    if distributed.launched():
        return _run_ranks(config, out_dir, options, echo)
    say = echo or (lambda s: None if options.quiet else print(s, file=sys.stderr))
    device = _device(options.device)
    plan = plan_merge(config, out_dir, options)
    _check_backend(plan, device)
    if options.dry_run:
        _dry_run(plan)
        return MergeResult(out_dir=plan.out_dir, plan=plan)

    created = _make_parents(plan.out_dir.parent)
    try:
        # the output's state is read only under the lock: a folder another run is writing is
        # that run's, not an unfinished merge to resume or replace
        with OutputLock(plan.out_dir):
            state = _check_output(plan)
            if state == "complete":
                say(f"{plan.out_dir} already holds this merge's finished output; nothing to do")
                return MergeResult(out_dir=plan.out_dir, plan=plan)
            return _run_locked(plan, state, device, say)
    finally:
        for folder in reversed(created):  # only the ones this run made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break


def _dry_run(plan: MergePlan, *extra_lines: str) -> None:
    """--dry-run: the checks that read no tensor data and take nothing, then the plan."""
    holder = OutputLock(plan.out_dir).holder()
    if holder is not None:
        raise OutputLockedError(f"another tritonmerge (pid {holder or '?'}) is writing {plan.out_dir}")
    _check_output(plan)
    print(plan.describe())
    print(f"disk:          {_check_disk(plan, 0)}")
    for line in extra_lines:
        print(line)


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return list(reversed(missing))


@dataclass
class _Run:
    """One process's share of a merge in progress: what its analysis pass and merge pass read
    and fill in."""

    plan: MergePlan
    device: torch.device
    manifest: Manifest
    say: Callable[[str], None]
    ranks: Ranks = field(default_factory=lambda: SINGLE)
    resumed_shards: int = 0
    reader: TensorReader = field(init=False)
    report: MergeReport = field(init=False)
    result: MergeResult = field(init=False)
    decisions: ModelDecisions = field(default_factory=ModelDecisions)
    checked: set[str] = field(default_factory=set)  # tensors whose NaN/Inf check is done

    def __post_init__(self) -> None:
        self.reader = TensorReader(pin_memory=self.device.type == "cuda")
        self.report = MergeReport(method=self.plan.config.spec.name)
        self.result = MergeResult(
            out_dir=self.plan.out_dir, plan=self.plan, report=self.report, resumed_shards=self.resumed_shards
        )


def _run_locked(plan: MergePlan, state: str, device: torch.device, say: Callable[[str], None]) -> MergeResult:
    options, tmp = plan.options, plan.tmp_dir
    manifest, done_shards = _prepare_partial(plan, state, say)
    run = _Run(plan, device, manifest, say, resumed_shards=len(done_shards))
    result = run.result
    t0 = time.perf_counter()
    try:
        try:
            _analysis_pass(run)
            _merge_pass(run, skip_shards=done_shards)
        finally:
            run.reader.close()
        result.seconds = time.perf_counter() - t0
        _finalize(plan, run.decisions, manifest)
        commit(tmp, plan.out_dir, overwrite=options.overwrite or options.force_overwrite)
    except BaseException as exc:
        note = _keep_or_discard_partial(plan, manifest, exc)
        if isinstance(exc, TritonMergeError):
            raise type(exc)(f"{exc}; {note}") from None
        if isinstance(exc, KeyboardInterrupt) and not options.quiet:
            print(f"tritonmerge: interrupted; {note}", file=sys.stderr)
        raise
    return result


def _checksums() -> dict[str, Any]:
    """The shard checksums, the one new shards get first: XXH64 from the fused CPU library (near
    memory speed) where it loads, else SHA-256 (about 1.3 GB/s: a quarter of the CPU time of a
    fast merge). Both verify on --resume whatever an earlier run recorded."""
    from .backends.cpu import kernels as ck

    if ck.status() is None:
        return {ck.Xxh64.name: ck.Xxh64, "sha256": hashlib.sha256}
    return {"sha256": hashlib.sha256}


def _prepare_partial(plan: MergePlan, state: str, say: Callable[[str], None]) -> tuple[Manifest, set[str]]:
    """Check the disk, then make the partial folder ready: verified shards (of any earlier
    process, on --resume) kept in one manifest, everything else of an earlier run removed.
    Returns the manifest and the finished shards."""
    tmp = plan.tmp_dir
    manifest = Manifest(tmp, plan.fingerprint, checksums=_checksums())
    done_shards: set[str] = set()
    if state == "resume":
        done_shards = manifest.verified_shards(plan.shards)
    already = sum(s.file_bytes for s in plan.shards if s.filename in done_shards)
    _check_disk(plan, already)

    # -- the partial folder is touched from here on ------------------------------------------
    if state == "fresh" and tmp.exists():
        shutil.rmtree(tmp)  # --overwrite: a stale partial folder (ours, checked) is discarded
    tmp.mkdir(exist_ok=True)
    if plan.loras is not None:
        # the LoRA-applied tensors of model+lora inputs (lora.py), with a bar where that takes a while
        bar = _progress(plan.loras.total_bytes, plan.options.quiet) if plan.loras.total_bytes > (256 << 20) else None
        if bar is not None:
            bar.set_description("applying LoRA")
        try:
            plan.loras.materialise(say, bar)
        finally:
            if bar is not None:
                bar.close()
    if plan.rows is not None:
        plan.rows.materialise()  # the embedding rows in the output vocabulary's order
    for s in plan.shards:
        if s.filename not in done_shards and (tmp / s.filename).exists():
            (tmp / s.filename).unlink()
    shutil.rmtree(tmp / PROGRESS_DIR, ignore_errors=True)
    manifest.absorb_rank_files()
    if done_shards:
        say(f"resuming: {len(done_shards)} of {len(plan.shards)} shard(s) verified and kept")
    return manifest, done_shards


def _keep_or_discard_partial(plan: MergePlan, manifest: Manifest, exc: BaseException) -> str:
    """After a failed run: keep the partial folder when it holds finished shards (for --resume),
    remove it when it holds nothing worth resuming. Returns what was done, for the error."""
    kept = len(manifest.shards)
    if kept:
        how = "run again with --resume to continue"
        if isinstance(exc, NonFiniteInputError):
            # a fixed input is a different input: its shards cannot be resumed from these
            how = "run again with --resume --allow-nonfinite to merge it as it is, or fix the input and start over with --overwrite"
        return f"finished shards were kept ({kept} of {len(plan.shards)}) in {plan.tmp_dir}; {how}"
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)
    return "no shard was finished, so nothing was kept"


def _analysis_pass(run: _Run, local: set[str] | None = None) -> None:
    """The method's whole-model analysis over a streaming source (this rank's ``local`` tensors
    in a distributed merge) into ``run.decisions``; tensors it reads whole are added to
    ``run.checked`` (NaN/Inf)."""
    plan, ranks = run.plan, run.ranks
    if not plan.needs_analysis:
        return
    from .api import analyze

    on = f" on {ranks.world} rank(s)" if ranks.distributed else ""
    run.say(f"analysis pass over {len(plan.names)} tensors{on} ...")
    source = StreamingSource(plan, run.reader, run.device, run.checked, ranks=ranks, local=local)
    try:
        try:
            run.decisions = analyze(plan.config.spec, plan.analysis_params, source)
        except BaseException:
            source.settle(failed=True)  # a NaN/Inf input is the error to report
            raise
        source.settle()
        run.report.decisions = run.decisions
    finally:
        source.close()


def _units_left(plan: MergePlan, done_shards: set[str]) -> list[WorkUnit]:
    """The work units of every shard not in ``done_shards``, in plan order."""
    skip_names = {e.name for s in plan.shards if s.filename in done_shards for e in s.entries}
    return [u for u in plan.units if u.name not in skip_names]


def _merge_pass(run: _Run, skip_shards: set[str], progress: Any = None) -> None:
    """Merge and write every shard not in ``skip_shards`` (finished, or another rank's).
    ``progress`` (with update(bytes)) replaces the process's own bar; its caller closes it."""
    plan, device, report, result, decisions = run.plan, run.device, run.report, run.result, run.decisions
    opts = plan.options
    units = _units_left(plan, skip_shards)
    total = sum(u.in_bytes for u in units)
    own_bar = progress is None
    bar = _progress(total, opts.quiet) if own_bar else progress
    writer = ShardedWriter(
        plan.tmp_dir,
        plan.shards,
        run.manifest,
        skip=skip_shards,
        max_pending_bytes=plan.writer_budget,
        asynchronous=opts.async_write,
        shard_extra=lambda shard: {
            "report": {e.name: dict(report.tensors[e.name]) for e in shard.entries if e.name in report.tensors}
        },
    )
    spec = plan.config.spec
    batches = _batches(plan, units, device)
    check = _InputCheck(plan, run.checked, device)
    prefetch = Prefetcher(
        [u for batch in batches for u in batch],
        load=lambda u: _read_unit(plan, run.reader, u, check),
        cost=lambda u: u.in_bytes,
        budget_bytes=plan.prefetch_budget,
        enabled=opts.prefetch,
        # its input checks on one core (an OpenMP team of this thread would slow the BLAS of
        # batched solvers on the compute thread: backends.cpu.kernels.limit_threads)
        thread_init=_single_threaded_kernels,
    )
    # a batch is merged out of plan order; results wait here until the writer's turn comes
    position = {id(u): i for i, u in enumerate(units)}
    finished: dict[int, tuple[WorkUnit, torch.Tensor]] = {}
    next_to_write = 0
    ok = False
    try:
        loaded = iter(prefetch)
        for batch in batches:
            items = []
            # the inputs as read, with the models whose NaN/Inf check is done, until it all is
            reads: list[tuple[WorkUnit, list[torch.Tensor], frozenset[int]]] = []
            for _ in batch:
                unit, (base, experts, done) = next(loaded)
                reads.append((unit, [base, *experts] if done != check.all else [], done))
                base, experts = _to_device(plan, base, experts, device, plan.out_entries[unit.name].dtype)
                row_numel = 1
                for s in plan.base.tensors[unit.name].shape[1:]:
                    row_numel *= s
                ctx = TensorContext(
                    name=unit.name,
                    decisions=decisions.tensors.get(unit.name, TensorDecisions()),
                    report=report,
                    element_offset=unit.element_offset_rows * row_numel,
                )
                items.append((unit, base, experts, ctx))
                del base, experts
            audit = check.begin(frozenset.intersection(*(done for _, _, done in reads)))
            try:
                if len(items) == 1:
                    unit, base, experts, ctx = items[0]
                    outs = [merge_one(spec, plan.params[unit.name], base, experts, ctx, backend=opts.backend)]
                else:
                    method, method_params = spec.innermost(plan.params[batch[0].name])
                    outs = method.merge_group(method_params, [(b, e, c) for _, b, e, c in items], backend=opts.backend)
            except BaseException:
                check.finish(audit, reads, failed=True)  # a NaN/Inf input is the error to report
                raise
            units_done = [item[0] for item in items]
            del items
            check.finish(audit, reads)
            del reads
            for unit, out in zip(units_done, outs):
                finished[position[id(unit)]] = (unit, _checked_result(plan, unit, out, report, result))
            del outs
            while next_to_write in finished:
                unit, out = finished.pop(next_to_write)
                writer.write(unit.name, out)
                del out
                next_to_write += 1
                result.bytes_read += unit.in_bytes
                result.bytes_written += unit.out_bytes
                if bar is not None:
                    bar.update(unit.in_bytes)
        writer.close()
        ok = True
    finally:
        if not ok:
            writer.abort()
        prefetch.close()
        if bar is not None and own_bar:
            bar.close()


def _checked_result(plan: MergePlan, unit: WorkUnit, out: torch.Tensor, report: MergeReport, result: MergeResult) -> torch.Tensor:
    """The merged unit in its output dtype, after the NaN/Inf check of the result (the fused
    CPU merge counts them as it writes: no second read of its output)."""
    counted = known_nonfinite(out)
    if out.is_floating_point() and (counted if counted is not None else not all_finite(out)):
        n_bad = counted if counted else int((~torch.isfinite(out)).sum())
        where = f" (rows {unit.rows[0]}..{unit.rows[1] - 1})" if unit.rows else ""
        msg = f"the merge of tensor {unit.name!r}{where} produced {n_bad} NaN/Inf value(s)"
        if not plan.options.allow_nonfinite:
            raise NonFiniteResultError(f"{msg}; check the parameters, or pass --allow-nonfinite to write it anyway")
        if unit.name not in result.nonfinite:
            result.nonfinite.append(unit.name)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        rec = report.tensors.setdefault(unit.name, {})
        rec["nonfinite_values"] = rec.get("nonfinite_values", 0) + n_bad
    want = plan.out_entries[unit.name].dtype
    return out if out.dtype == want else out.to(want)


def _batches(plan: MergePlan, units: Sequence[WorkUnit], device: torch.device) -> list[list[WorkUnit]]:
    """The order of work: within each output shard, the units its method merges together
    (``group_key``/``merge_group``: WUDI's same-shaped layers), each batch within the method's
    memory budget, then the rest one by one. Batches never span shards, so they are the same
    whichever process (or how many) merges the shard, and a resumed run forms them alike."""
    spec = plan.config.spec
    shard_of = {e.name: i for i, s in enumerate(plan.shards) for e in s.entries}
    batches: list[list[WorkUnit]] = []
    i = 0
    while i < len(units):
        j = i
        while j < len(units) and shard_of[units[j].name] == shard_of[units[i].name]:
            j += 1
        groups: dict[Any, list[WorkUnit]] = {}
        ordered: list[list[WorkUnit]] = []
        for unit in units[i:j]:
            method, method_params = spec.innermost(plan.params[unit.name])
            key = None
            if unit.rows is None and method.group_key is not None and method.merge_group is not None:
                info = plan.base.tensors[unit.name]
                if info.dtype.is_floating_point:
                    key = method.group_key(method_params, unit.name, info.shape, info.dtype)
            if key is None:
                ordered.append([unit])
                continue
            key = (key, _params_key(plan.params[unit.name]))
            if key not in groups:
                groups[key] = []
                ordered.append(groups[key])
            groups[key].append(unit)
        for group in ordered:
            method, method_params = spec.innermost(plan.params[group[0].name])
            size = len(group)
            if size > 1 and method.max_group_size is not None:
                shape = plan.base.tensors[group[0].name].shape
                size = max(1, method.max_group_size(method_params, shape, plan.n_experts, device))
            batches.extend(group[k : k + size] for k in range(0, len(group), size))
        i = j
    return batches


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True, file=sys.stderr)


def _finalize(plan: MergePlan, decisions: ModelDecisions, manifest: Manifest) -> None:
    cfg = plan.config
    out = plan.tmp_dir
    write_index(out, plan.shards, {"tritonmerge_version": __version__})
    float_out = [e.dtype for e in plan.out_entries.values() if e.dtype.is_floating_point]
    torch_dtype = dtype_name(max(set(float_out), key=float_out.count)) if float_out else None
    base_folder = plan.base.folder
    base_config = plan.base.config()
    if cfg.slices is not None and base_config is not None:
        # mergekit sets the layer count of the stacked slices
        base_config = dict(base_config)
        base_config["num_hidden_layers"] = plan.n_layers
    tok_spec = cfg.tokenizer
    if plan.rows is not None and base_config is not None:
        base_config = dict(base_config)
        key = "vocab_size" if "vocab_size" in base_config or not isinstance(base_config.get("text_config"), dict) else None
        if key:
            base_config[key] = plan.rows.vocab.n_rows
        else:
            base_config["text_config"] = {**base_config["text_config"], "vocab_size": plan.rows.vocab.n_rows}
    outfolder.write_config_json(out, base_config, torch_dtype)
    if plan.options.copy_tokenizer:
        outfolder.copy_tokenizer_files(base_folder, out)
    if tok_spec is not None and (plan.rows is not None or tok_spec.chat_template is not None or isinstance(tok_spec.source, Path)):
        from . import tokenizer as tok

        donor = tok_spec.source if isinstance(tok_spec.source, Path) else base_folder
        if donor != base_folder:
            for name in outfolder.TOKENIZER_FILES:
                if name != "generation_config.json" and (out / name).is_file():
                    (out / name).unlink()
            outfolder.copy_tokenizer_files(donor, out)
            if (base_folder is not None) and (base_folder / "generation_config.json").is_file():
                shutil.copyfile(base_folder / "generation_config.json", out / "generation_config.json")
        folders = [cfg.base.path, *[m.path for m in cfg.experts]] if cfg.base_given else [m.path for m in cfg.experts]
        template = tok.resolve_chat_template(tok_spec, list(dict.fromkeys(folders)))
        tok.write_tokenizer(out, donor, plan.rows.vocab if plan.rows is not None else None, template)
    if plan.rows is not None:
        plan.rows.cleanup()
    if plan.loras is not None:
        plan.loras.cleanup()
    params = _params_json(plan.analysis_params) if plan.analysis_params is not None else cfg.resolve()
    if plan.options.write_model_card:
        outfolder.write_model_card(
            out,
            base_model=cfg.base.name,
            models=[m.name for m in cfg.experts],
            method=cfg.merge_method,
            method_doc=cfg.spec.doc,
            parameters=params,
            config_yaml=cfg.to_yaml(),
            version=__version__,
        )
    outfolder.write_text(out, outfolder.CONFIG_NAME, cfg.to_yaml())
    if plan.needs_analysis:
        outfolder.write_json(out, outfolder.DECISIONS_NAME, decisions.to_json())
    # per-tensor numbers (e.g. WUDI losses), kept per shard in the manifest so that a resumed run
    # reports the shards it did not redo; timings stay out so reruns give the same bytes
    tensors: dict[str, Any] = {}
    for rec in manifest.shards.values():
        tensors.update(rec.get("report", {}))
    if tensors:
        outfolder.write_json(out, outfolder.REPORT_NAME, {"tensors": dict(sorted(tensors.items()))})


# ------------------------------------------------------------------------------------------------
# several processes (torchrun): see distributed.py for the design

# a work unit's estimated cost, in bytes moved: its reads and writes plus, for methods that say
# how much arithmetic a tensor takes (MergeMethod.flops: WUDI), that at this many operations per byte
FLOPS_PER_BYTE = 64.0


def _unit_cost(plan: MergePlan, unit: WorkUnit) -> float:
    cost = float(unit.in_bytes + unit.out_bytes)
    method, params = plan.config.spec.innermost(plan.params[unit.name])
    if method.flops is not None:
        info = plan.base.tensors[unit.name]
        cost += method.flops(params, unit.name, info.shape, plan.n_experts) / FLOPS_PER_BYTE
    return cost


def _shard_costs(plan: MergePlan) -> list[float]:
    per_tensor: dict[str, float] = {}
    for u in plan.units:
        per_tensor[u.name] = per_tensor.get(u.name, 0.0) + _unit_cost(plan, u)
    return [sum(per_tensor[e.name] for e in s.entries) for s in plan.shards]


def _rank_device(name: str, ranks: Ranks) -> torch.device:
    """``cuda`` binds each rank to its local GPU (distributed.join checked there is one); an
    explicit ``cuda:N`` or ``cpu`` is kept."""
    dev = _device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ranks.local_rank)
    return dev


class _RankProgress:
    """One bar for the whole job on rank 0: its own bytes plus what the other ranks report in
    small files of the partial folder (polled twice a second); the other ranks write those."""

    def __init__(self, plan: MergePlan, ranks: Ranks, total: int) -> None:
        self._ranks = ranks
        self._folder = plan.tmp_dir / PROGRESS_DIR
        self._mine = 0
        self._last_write = 0.0
        self._stop = threading.Event()
        self._bar = _progress(total, plan.options.quiet) if ranks.leader else None
        self._poller = None
        self._folder.mkdir(exist_ok=True)
        if self._bar is not None:
            self._poller = threading.Thread(target=self._poll, name="tritonmerge-progress", daemon=True)
            self._poller.start()

    def _others(self) -> int:
        done = 0
        for path in self._folder.glob("rank-*"):
            try:
                done += int(path.read_text(encoding="utf-8") or 0)
            except (OSError, ValueError):
                pass  # being replaced right now: counted at the next poll
        return done

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._bar.n = self._mine + self._others()
            self._bar.refresh()

    def update(self, nbytes: int) -> None:
        self._mine += nbytes
        if self._ranks.leader:
            return
        now = time.monotonic()
        if now - self._last_write >= 0.25:
            self._write()
            self._last_write = now

    def _write(self) -> None:
        path = self._folder / f"rank-{self._ranks.rank}"
        tmp = path.with_name(f".{path.name}.tmp")  # hidden: not matched by the poll's rank-*
        try:
            tmp.write_text(str(self._mine), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # only the bar would miss it (the folder is renamed once rank 0 commits)

    def close(self) -> None:
        """Final count (other ranks: before they hand in their records, so the folder is
        still there) or the bar's last update (rank 0)."""
        if not self._ranks.leader:
            if not self._stop.is_set():
                self._stop.set()
                self._write()
            return
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        if self._bar is not None:
            self._bar.n = self._mine + self._others()
            self._bar.close()


def _run_ranks(
    config: MergeConfig | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    options: MergeOptions,
    echo: Callable[[str], None] | None,
) -> MergeResult:
    try:
        ranks = distributed.join(options.device)
    except TritonMergeError as exc:
        raise type(exc)(f"rank {os.environ.get('RANK', '?')}: {exc}") from None
    try:
        return _merge_on_ranks(config, out_dir, options, echo, ranks)
    except TritonMergeError as exc:
        raise type(exc)(f"{ranks.label()}: {exc}") from None
    finally:
        ranks.close()


def _merge_on_ranks(config, out_dir, options: MergeOptions, echo, ranks: Ranks) -> MergeResult:
    leader = ranks.leader
    say = echo or (lambda s: None if options.quiet or not leader else print(s, file=sys.stderr))
    # 1. rank 0 plans and runs every check a single process runs; the others wait for the verdict
    plan = None
    verdict: tuple = ("ok", None)
    if leader:
        try:
            device = _rank_device(options.device, ranks)
            plan = plan_merge(config, out_dir, options)
            _check_backend(plan, device)
            verdict = ("ok", plan.fingerprint)
        except TritonMergeError as exc:
            verdict = ("refused", str(exc))
            ranks.broadcast(verdict)
            raise
    verdict = ranks.broadcast(verdict)
    if verdict[0] == "refused":
        raise SystemExit(EXIT_REFUSED_ELSEWHERE)  # rank 0 says why
    if not leader:
        device = _rank_device(options.device, ranks)
        plan = plan_merge(config, out_dir, options)
        if plan.fingerprint != verdict[1]:
            raise CheckpointError(
                "the plan made here differs from rank 0's: the inputs, config or options do not look the same "
                "from this machine (a distributed merge needs them on a filesystem every rank sees alike)"
            )
        _check_backend(plan, device)
    if options.dry_run:
        if leader:
            _dry_run(plan, f"ranks:         {ranks.world} (whole shards dealt by estimated cost)")
        return MergeResult(out_dir=plan.out_dir, plan=plan)

    # 2. rank 0 takes the lock and readies the partial folder
    lock = OutputLock(plan.out_dir) if leader else None
    created: list[Path] = []
    manifest = None
    status: tuple = ("run", "fresh", [])
    try:
        if leader:
            try:
                created = _make_parents(plan.out_dir.parent)
                lock.acquire()
                state = _check_output(plan)
                if state == "complete":
                    status = ("complete",)
                else:
                    manifest, done = _prepare_partial(plan, state, say)
                    status = ("run", state, sorted(done))
            except TritonMergeError as exc:
                ranks.broadcast(("refused", str(exc)))
                raise
        status = ranks.broadcast(status)
        if status[0] == "refused":
            raise SystemExit(EXIT_REFUSED_ELSEWHERE)
        if status[0] == "complete":
            say(f"{plan.out_dir} already holds this merge's finished output; nothing to do")
            return MergeResult(out_dir=plan.out_dir, plan=plan)
        return _ranks_merge(plan, ranks, device, manifest, set(status[2]), say)
    finally:
        if lock is not None:
            lock.release()
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break


def _ranks_merge(
    plan: MergePlan, ranks: Ranks, device: torch.device, manifest: Manifest | None, done: set[str], say
) -> MergeResult:
    leader, tmp = ranks.leader, plan.tmp_dir
    if manifest is None:
        manifest = Manifest(tmp, plan.fingerprint, rank=ranks.rank, checksums=_checksums())
    costs = _shard_costs(plan)
    # the analysis covers every tensor (also those of finished shards); the merge what is left
    analysis_owner = distributed.deal(costs, ranks.world)
    analysed_here = {e.name for s, r in zip(plan.shards, analysis_owner) if r == ranks.rank for e in s.entries}
    left = [i for i, s in enumerate(plan.shards) if s.filename not in done]
    merge_owner = distributed.deal([costs[i] for i in left], ranks.world)
    written_here = {plan.shards[i].filename for i, r in zip(left, merge_owner) if r == ranks.rank}
    not_here = {s.filename for s in plan.shards} - written_here
    if leader and done:
        say(f"resuming on {ranks.world} rank(s)")

    run = _Run(plan, device, manifest, say, ranks=ranks, resumed_shards=len(done))
    result = run.result
    t0 = time.perf_counter()
    try:
        _analysis_pass(run, local=analysed_here)
        progress = _RankProgress(plan, ranks, sum(u.in_bytes for u in _units_left(plan, done)))
        try:
            _merge_pass(run, skip_shards=not_here, progress=progress)
            if not leader:
                progress.close()
            # 3. finalize: rank 0 collects every rank's shard records (waiting for all of them)
            parts = ranks.all_gather((manifest.shards if not leader else {}, result.bytes_read, result.bytes_written))
        finally:
            progress.close()
    except BaseException as exc:
        if isinstance(exc, TritonMergeError) and not isinstance(exc, OutputLockedError):
            raise type(exc)(f"{exc}; {_ranks_partial_note(plan, exc)}") from None
        raise
    finally:
        run.reader.close()
    result.seconds = time.perf_counter() - t0
    result.bytes_read = sum(p[1] for p in parts)
    result.bytes_written = sum(p[2] for p in parts)
    if leader:
        for shards, _, _ in parts:
            manifest.shards.update(shards)
        manifest.absorb_rank_files()
        shutil.rmtree(tmp / PROGRESS_DIR, ignore_errors=True)
        _finalize(plan, run.decisions, manifest)
        commit(tmp, plan.out_dir, overwrite=plan.options.overwrite or plan.options.force_overwrite)
    return result


def _ranks_partial_note(plan: MergePlan, exc: BaseException) -> str:
    """What a failed rank says of the partial folder: kept as it is (other ranks may have
    finished shards in it), with how to continue."""
    how = "run again with --resume (any number of ranks) to continue"
    if isinstance(exc, NonFiniteInputError):
        how = "run again with --resume --allow-nonfinite to merge it as it is, or fix the input and start over with --overwrite"
    return f"finished shards are kept in {plan.tmp_dir}; {how}"
