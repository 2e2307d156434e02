"""Fine-tuning of one expert per in-distribution task, with task vectors cached as safetensors.

Only the encoder is trained (the token-embedding matrix stays frozen, see encoder.py), by
cross-entropy through the task's frozen zero-shot head. The cache key covers the model file,
the task's data and head, the fine-tuning settings and the seed, so a stale vector is never
reused; delete benchmarks/.cache/quality to retrain everything.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .encoder import (
    Tokens,
    cosine_logits,
    encoder_state,
    load_state,
    mergeable_names,
    model_dir,
    pad_batch,
    sentence_embeddings,
)

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "quality"
# Bump when the training code changes in a way that changes the vectors.
CACHE_VERSION = 1


@dataclass
class Expert:
    task: str
    task_vector: dict[str, torch.Tensor]
    seconds: float  # training time (0 when the vector was read from the cache)
    cached: bool
    steps: int

    def state(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert's mergeable parameters: base + τ."""
        return {k: base[k] + self.task_vector[k] for k in base}


def _model_fingerprint() -> str:
    path = model_dir() / "model.safetensors"
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def cache_key(task_fingerprint: str, head_fingerprint: str, settings: Mapping[str, Any], seed: int) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "model": _model_fingerprint(),
            "task": task_fingerprint,
            "head": head_fingerprint,
            "finetune": settings["finetune"],
            "max_length": settings["max_length"],
            "temperature": settings["temperature"],
            "split_seed": settings["split_seed"],
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def train_expert(
    model: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    tokens: Tokens,
    labels: list[int],
    head: torch.Tensor,
    settings: Mapping[str, Any],
    seed: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Fine-tune from ``base`` on (tokens, labels); returns (task vector, optimizer steps).

    AdamW without weight decay by default (rows and entries without gradient stay exactly at the
    base), linear warm-up then linear decay, dropout on (the model's own 0.1)."""
    ft = settings["finetune"]
    temperature = float(settings["temperature"])
    load_state(model, base)
    names = set(mergeable_names(model))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=float(ft["lr"]), weight_decay=float(ft["weight_decay"]))
    batch_size = int(ft["batch_size"])
    n = len(tokens)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, int(ft["epochs"]) * steps_per_epoch)
    warmup = max(1, int(float(ft.get("warmup_frac", 0.1)) * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    label_t = torch.tensor(labels, dtype=torch.long)
    model.train()
    step = 0
    try:
        for _ in range(int(ft["epochs"])):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                input_ids, mask = pad_batch([tokens.ids[i] for i in idx])
                emb = sentence_embeddings(model, input_ids, mask)
                loss = torch.nn.functional.cross_entropy(cosine_logits(emb, head, temperature), label_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    tuned = encoder_state(model)
    load_state(model, base)
    return {k: (tuned[k] - base[k]).contiguous() for k in base}, step


def get_expert(
    task_name: str,
    key: str,
    train: callable,  # () -> (task vector, steps)
    cache_dir: Path = CACHE_DIR,
    use_cache: bool = True,
) -> Expert:
    """The cached task vector for ``key``, else train it and write the cache."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / "experts" / f"{task_name}-{key}.safetensors"
    if use_cache and path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return Expert(task_name, load_file(str(path)), 0.0, True, int(meta.get("steps", 0)))
    t0 = time.perf_counter()
    vector, steps = train()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(vector, str(tmp), metadata={"task": task_name, "steps": str(steps), "seconds": f"{seconds:.2f}"})
    tmp.replace(path)
    return Expert(task_name, vector, seconds, False, steps)
