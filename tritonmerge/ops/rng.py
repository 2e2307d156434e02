"""Counter-based random numbers for DARE/DELLA masks.

Each element's uniform number is a hash of (seed, tensor name, expert index, flat element
index), so a mask does not depend on the order tensors are processed in, on row chunking, or
on the backend: the Triton kernel computes the same 32-bit hash and gets bit-identical masks.

Hash: two rounds of MurmurHash3's 32-bit finaliser (fmix32). Keys come from BLAKE2b of the
seed, name and expert. Uniforms are the top 24 bits scaled to [0, 1), exact in float32.
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B1
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def stream_keys(seed: int, name: str, expert: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, tensor, expert) stream."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2**32 without int64 overflow: split a into 16-bit halves.
    lo = (a & 0xFFFF) * c
    hi = (((a >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def hash_indices(index: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """32-bit hashes (held in int64) of int64 element indices."""
    lo = index & MASK32
    hi = index >> 32
    h = fmix32((_mul32(lo, GOLDEN32) + key0) & MASK32)
    return fmix32(h ^ ((_mul32(hi, FMIX_C1) + key1) & MASK32))


def uniform(numel: int, seed: int, name: str, expert: int, *, offset: int = 0, device=None) -> torch.Tensor:
    """float32 uniforms in [0, 1) for elements offset .. offset+numel-1 of one stream."""
    key0, key1 = stream_keys(seed, name, expert)
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (hash_indices(index, key0, key1) >> 8).to(torch.float32) * (1.0 / (1 << 24))
