"""Synthetic Llama-shaped Hugging Face checkpoints: a base and N "fine-tuned" experts.

Used by ``tritonmerge demo``, the engine tests and the benchmarks. The base is a random init
(N(0, 0.02) matrices, unit RMSNorm weights); each expert is the base plus a structured task
vector — a low-rank update, a sparse set of larger entries and small dense noise, the mix
differing per expert and per layer — so sparsifying and interference-aware methods have
something to find. Everything is deterministic in ``seed``. The files look like a real
checkpoint: config.json (LlamaForCausalLM), generation_config.json, tokenizer config files,
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensor_shapes(hidden_size: int, intermediate_size: int, num_layers: int, vocab_size: int,
                        num_heads: int, num_kv_heads: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM state dict, in the usual order."""
    head_dim = hidden_size // num_heads
    kv = num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden_size, hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (hidden_size, hidden_size)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate_size, hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (intermediate_size, hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (hidden_size, intermediate_size)
        shapes[p + "input_layernorm.weight"] = (hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden_size,)
    shapes["model.norm.weight"] = (hidden_size,)
    shapes["lm_head.weight"] = (vocab_size, hidden_size)
    return shapes


def _gen(seed: int, *parts: int) -> torch.Generator:
    # distinct, reproducible streams per (seed, model, tensor)
    s = seed
    for p in parts:
        s = (s * 1_000_003 + p + 7) % (2**62)
    return torch.Generator().manual_seed(s)


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _task_vector(name: str, shape: tuple[int, ...], expert: int, layer: int, g: torch.Generator) -> torch.Tensor:
    """Low-rank + sparse + dense-noise update; its strength varies with expert and depth."""
    strength = 0.004 * (1.0 + 0.5 * ((expert + layer) % 3))
    if len(shape) == 1:
        return strength * torch.randn(shape, generator=g)
    m, n = shape
    rank = max(1, min(m, n) // 16)
    u = torch.randn(m, rank, generator=g)
    v = torch.randn(rank, n, generator=g)
    tau = (u @ v) * (strength / rank**0.5)
    sparse = (torch.rand(shape, generator=g) < 0.01).float() * torch.randn(shape, generator=g) * strength * 4
    noise = torch.randn(shape, generator=g) * strength * 0.25
    return tau + sparse + noise


def write_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], shard_size_bytes: int | None) -> list[Path]:
    """Write ``tensors`` as HF safetensors: one ``model.safetensors``, or shards of at most
    ``shard_size_bytes`` (a larger tensor gets its own shard) + ``model.safetensors.index.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shard_size_bytes and groups[-1] and size + nb > shard_size_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nb
    if len(groups) == 1:
        path = folder / "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in groups[0]}, str(path), metadata={"format": "pt"})
        return [path]
    paths = []
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / fname), metadata={"format": "pt"})
        paths.append(folder / fname)
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def llama_config(hidden_size: int, intermediate_size: int, num_layers: int, vocab_size: int, num_heads: int,
                 num_kv_heads: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins a byte-level tokenizer uses for the bytes 0..255 (printable
    ASCII and Latin-1 stand for themselves, the rest map to code points from 256 up)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols = {}
    extra = 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer() -> dict:
    """A real, complete tokenizer (``tokenizer.json``): byte-level BPE with the three special
    tokens and one token per byte, no merges. Any text encodes and decodes losslessly, so a
    synthetic model loads and generates end to end with ``AutoTokenizer``; ids 0..258."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [],
        },
    }


def _write_side_files(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    tok_cfg = {
        "model_max_length": 2048,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer(), ensure_ascii=False) + "\n", encoding="utf-8")


def make_llama_checkpoints(
    root: str | os.PathLike,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 344,
    num_layers: int = 4,
    vocab_size: int = 1024,
    num_experts: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_size_bytes: int | None = 1 << 20,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    tensor_dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert_{i}`` (i = 1..num_experts); returns their paths.

    ``dtype`` is the stored dtype; ``tensor_dtypes`` overrides it per name substring (e.g.
    ``{"norm": torch.float32}`` for mixed-dtype tests). ``shard_size_bytes=None`` writes a single
    ``model.safetensors``."""
    root = Path(root)
    heads = num_heads or max(1, hidden_size // 64)
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {heads}")
    kv_heads = num_kv_heads or heads
    shapes = llama_tensor_shapes(hidden_size, intermediate_size, num_layers, vocab_size, heads, kv_heads)
    config = llama_config(hidden_size, intermediate_size, num_layers, vocab_size, heads, kv_heads, dtype)

    def stored(name: str) -> torch.dtype:
        for key, dt in (tensor_dtypes or {}).items():
            if key in name:
                return dt
        return dtype

    base32 = {name: _base_tensor(name, shape, _gen(seed, 0, i)) for i, (name, shape) in enumerate(shapes.items())}
    dirs = []
    for e in range(num_experts + 1):
        folder = root / ("base" if e == 0 else f"expert_{e}")
        tensors = {}
        for i, (name, shape) in enumerate(shapes.items()):
            t = base32[name]
            if e > 0:
                layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
                t = t + _task_vector(name, shape, e, layer, _gen(seed, e, i))
            tensors[name] = t.to(stored(name))
        write_checkpoint(folder, tensors, shard_size_bytes)
        _write_side_files(folder, config)
        dirs.append(folder)
    return dirs[0], dirs[1:]

