"""Embedding rows in the output vocabulary's order (mergekit 0.1.5's ``PermutedVocabulary``,
mergekit/tokenizer/embed.py), and how the engine feeds them to the merge unchanged.

For each vocabulary tensor (``embed_tokens``, ``lm_head`` and the other names of
``VOCAB_TENSORS``: the weights mergekit's architectures give a ``vocabulary_axis``, all on axis
0) every merge input gets a tensor with one row per output token: its own row of that token, or,
where it lacks the token (or the token is forced), the default row — a ``tokens:`` source, the
one model that has it, the base model's, the mean over the models that have it, or zeros when
none has it — and, past the vocabulary (``pad_to_multiple_of``), the mean of its rows. The plan
points those inputs at small safetensors files that ``materialise`` writes into a hidden folder
of the partial output folder before the merge pass, so the rest of the engine merges them as any
tensor; ``cleanup`` removes them before the output is committed. Inputs are never modified.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConfigError
from .io.index import TORCH_TO_SAFETENSORS, CheckpointIndex, TensorInfo, itemsize, load_bin
from .tokenizer import VocabPlan

ROWS_DIR = ".tokenizer-rows"
VOCAB_TENSORS = (
    "embed_tokens.weight", "lm_head.weight", "wte.weight", "tok_embeddings.weight", "word_embeddings.weight",
    "embed_out.weight", "output.weight",
)


def is_vocab_tensor(name: str, info: TensorInfo, rows: int) -> bool:
    return any(name == v or name.endswith("." + v) for v in VOCAB_TENSORS) and len(info.shape) >= 1 and info.shape[0] == rows


def permute(
    plan: VocabPlan, tensors: Sequence[torch.Tensor], models: Sequence[Path], base: Path | None
) -> list[torch.Tensor]:
    """One tensor per model (``models``: the merge inputs in config order, their tensors
    vocabulary first), in the output vocabulary's order, filled as mergekit fills them."""
    vocab = plan.vocab
    perms = [plan.perms[m] for m in models]
    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    tshape = tensors[0].shape[1:]
    cfgs = dict(plan.spec.tokens)
    average: set[str] = set()
    for tok, tid in vocab.items():  # mergekit's assign_embedding_sources
        if tok in cfgs:
            continue
        have = [p[tid] >= 0 for p in perms]
        n = sum(have)
        if n == 1:
            cfgs[tok] = (_Donor(models[have.index(True)]), False)
        elif n == 0:
            cfgs[tok] = (_Zero(), False)
        elif base is not None and base in models and plan.perms[base][tid] >= 0:
            cfgs[tok] = (_Donor(base), False)
        else:
            average.add(tok)
    defaults: dict[str, torch.Tensor] = {}
    for tok, tid in vocab.items():
        cfg = cfgs.get(tok)
        forced = bool(cfg and cfg[1])
        if not forced and all(p[tid] >= 0 for p in perms):
            continue
        if tok in average:
            embed = torch.zeros(tshape, dtype=dtype)
            count = 0
            for t, p in zip(tensors, perms):
                if p[tid] >= 0:
                    embed = embed + t[p[tid]]
                    count += 1
            embed /= count
        elif cfg is not None:
            embed = _default(plan, tensors, perms, models, tok, tid, cfg[0])
        else:
            continue
        defaults[tok] = embed
    out = []
    for t, p in zip(tensors, perms):
        new = torch.zeros((plan.n_rows, *tshape), dtype=dtype)
        for tok, tid in vocab.items():
            cfg = cfgs.get(tok)
            forced = bool(plan.spec.tokens.get(tok, (None, False))[1])
            if p[tid] >= 0 and not forced:
                new[tid] = t[p[tid]]
            elif tok in defaults:
                new[tid] = defaults[tok]
        if plan.n_rows > len(vocab):
            new[len(vocab):] = torch.mean(new[: len(vocab)], dim=0)
        out.append(new)
    return out


@dataclass(frozen=True)
class _Donor:
    model: Path
    kind: str = "model"
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class _Zero:
    kind: str = "zero"


def _default(plan: VocabPlan, tensors, perms, models: Sequence[Path], tok: str, tid: int, src) -> torch.Tensor:
    """mergekit's compute_default_embedding."""
    if src.kind == "zero":
        return tensors[0].new_zeros(tensors[0].shape[1:])
    if src.kind == "none":
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: the token needs a default row and its config gives no source")
    i = list(models).index(src.model)
    if src.kind == "model_token":
        sid = src.token_id if src.token_id is not None else plan.original[src.model][src.token]
        if not 0 <= sid < tensors[i].shape[0]:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token id {sid} is out of range for its source model")
        return tensors[i][sid]
    if perms[i][tid] < 0:
        raise ConfigError(f"tokenizer.tokens[{tok!r}]: its source model does not have the token")
    return tensors[i][perms[i][tid]]


# ------------------------------------------------------------------------------------------------
# engine side


def _header(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    nbytes = itemsize(dtype)
    for s in shape:
        nbytes *= s
    h = json.dumps({name: {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    return h + b" " * (-len(h) % 8)


@dataclass
class RowsPlan:
    """What ``materialise`` writes: per vocabulary tensor, the models' original TensorInfos
    (config order, distinct folders) and the file of each one's permuted rows."""

    vocab: VocabPlan
    models: list[Path]
    base: Path | None
    originals: dict[str, list[TensorInfo]]
    targets: dict[str, list[TensorInfo]]
    folder: Path

    def materialise(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, infos in self.originals.items():
            # in the dtype the rows are merged in (the config's ``dtype``, as mergekit casts before
            # it permutes; else the promoted stored dtype, where casting first changes nothing)
            dt = self.targets[name][0].dtype
            tensors = [_load(i).to(dt) for i in infos]
            for info, t in zip(self.targets[name], permute(self.vocab, tensors, self.models, self.base)):
                t = t.to(info.dtype).contiguous()
                with open(info.file, "wb") as f:
                    h = _header(name, info.dtype, info.shape)
                    f.write(len(h).to_bytes(8, "little"))
                    f.write(h)
                    f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _load(info: TensorInfo) -> torch.Tensor:
    if info.is_safetensors:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.end - info.start)
        if not data:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(bytearray(data), dtype=info.dtype).reshape(info.shape).clone()
    return load_bin(info.file, str(info.file))[info.name].clone()


def apply(
    vocab: VocabPlan,
    dtype: torch.dtype | None,
    views: Sequence[CheckpointIndex],
    view_models: Sequence[Path],
    models: Sequence[Path],
    base: Path | None,
    partial: Path,
) -> tuple[list[CheckpointIndex], RowsPlan]:
    """Views of ``views`` (base, experts; ``view_models[k]`` the model view k reads) whose
    vocabulary tensors point at the permuted rows to be materialised in
    ``partial``/.tokenizer-rows; the other tensors are untouched."""
    folder = partial / ROWS_DIR
    by_path = {}
    for v, m in zip(views, view_models):
        by_path.setdefault(m, v)
    first = views[0]
    names = [n for n, i in first.tensors.items() if is_vocab_tensor(n, i, vocab.rows[view_models[0]])]
    if not names:
        raise ConfigError("the base model has no embedding tensor (embed_tokens, lm_head, ...) whose rows match its vocab_size")
    originals: dict[str, list[TensorInfo]] = {}
    targets: dict[str, list[TensorInfo]] = {}
    for name in names:
        infos = []
        for m in models:
            v = by_path[m]
            info = v.tensors.get(name)
            if info is None or not is_vocab_tensor(name, info, vocab.rows[m]):
                raise ConfigError(f"{v.label}: tensor {name!r} is missing or does not have its vocab_size ({vocab.rows[m]}) rows")
            infos.append(info)
        originals[name] = infos
        dt = dtype
        if dt is None:
            dt = infos[0].dtype
            for i in infos:
                dt = torch.promote_types(dt, i.dtype)
        shape = (vocab.n_rows, *infos[0].shape[1:])
        outs = []
        for k, m in enumerate(models):
            f = folder / f"{k}-{name}.safetensors"
            start = 8 + len(_header(name, dt, shape))
            probe = TensorInfo(name, shape, dt, f, start, start)
            outs.append(replace(probe, end=start + probe.nbytes))
        targets[name] = outs
    index = {m: k for k, m in enumerate(models)}
    new_views = []
    for v, m in zip(views, view_models):
        tensors = dict(v.tensors)
        for name in names:
            tensors[name] = targets[name][index[m]]
        new_views.append(CheckpointIndex(v.label, v.path, tensors, list(v.files), v.format))
    return new_views, RowsPlan(vocab, list(models), base, originals, targets, folder)
