"""Compact storage of a symmetric Gram sum: the upper triangle, rows concatenated, in float32.

A full float64 Σxxᵀ costs 8n² bytes (642 MB for a 8960-wide input, 6.6 GB for Llama-70B's 28,672); the upper
triangle in float32 costs 2n(n+1) bytes, ≈ 0.25× (8960: 161 MB). The accumulation stays float64; only the stored
sum is rounded, a relative error of 2⁻²⁴ per entry — far below the 1 % damping every quantizer adds to the
diagonal, and measured to leave GPTQ/E8P perplexity unchanged (benchmarks/RESULTS.md).

Row slices are copied one band at a time, so packing and unpacking never hold more than the full matrix plus one
band (no n²-sized index tensors, unlike ``torch.triu_indices``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["STORED_DTYPE", "pack_upper", "triangle_size", "unpack_upper"]

STORED_DTYPE = torch.float32
_BAND = 256


def triangle_size(n: int) -> int:
    return n * (n + 1) // 2


def _row_offset(i: int, n: int) -> int:
    """Offset of row i's first stored entry (its diagonal) in the packed vector."""
    return i * n - i * (i - 1) // 2


def pack_upper(H: Tensor, dtype: torch.dtype = STORED_DTYPE) -> Tensor:
    """H [n, n] (symmetric) -> its upper triangle as a 1-D ``dtype`` vector, row by row."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"expected a square matrix, got {tuple(H.shape)}")
    n = H.shape[0]
    out = torch.empty(triangle_size(n), dtype=dtype, device=H.device)
    for i in range(n):
        start = _row_offset(i, n)
        out[start : start + n - i] = H[i, i:]
    return out


def unpack_upper(packed: Tensor, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The full symmetric [n, n] ``dtype`` matrix from :func:`pack_upper`'s vector (exactly symmetric)."""
    if packed.dim() != 1 or packed.numel() != triangle_size(n):
        raise ValueError(f"packed triangle of a {n}x{n} matrix needs {triangle_size(n)} entries, got {packed.numel()}")
    H = torch.empty(n, n, dtype=dtype, device=packed.device)
    for i in range(n):
        start = _row_offset(i, n)
        H[i, i:] = packed[start : start + n - i]
    for a in range(0, n, _BAND):  # mirror band by band: H[b:, a:b] = H[a:b, b:]ᵀ
        b = min(a + _BAND, n)
        H[b:, a:b] = H[a:b, b:].T
        block = H[a:b, a:b]
        H[a:b, a:b] = torch.triu(block) + torch.triu(block, 1).T
    return H
