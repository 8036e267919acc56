"""1-bit maps packed along K into int32 words, N contiguous: the layout of the GPTQT bit-planes and of the
decoded ICQuant outlier mask.

    words int32 [..., ceil(K/32), N]:  bit j of words[..., w, n] is map[..., n, 32·w + j]   (K zero-padded)

Same orientation as ``kernels.packing`` INT32_KPACKED (N contiguous, K walked by the GEMM loop), so a kernel
reads one coalesced row of words per 32 input columns and extracts bit ``k % 32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BITS_PER_WORD", "pack_bit_words", "unpack_bit_words", "word_rows"]

BITS_PER_WORD = 32


def word_rows(in_features: int) -> int:
    """ceil(K / 32): word rows of a K-wide bit map."""
    return -(-in_features // BITS_PER_WORD)


def pack_bit_words(bits: Tensor) -> Tensor:
    """bool [..., N, K] -> int32 [..., ceil(K/32), N] (two's complement words)."""
    *lead, N, K = bits.shape
    Kw = word_rows(K)
    b = F.pad(bits.to(torch.int64), (0, Kw * BITS_PER_WORD - K)).reshape(*lead, N, Kw, BITS_PER_WORD)
    words = (b << torch.arange(BITS_PER_WORD, device=bits.device)).sum(-1)  # < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.transpose(-1, -2).to(torch.int32).contiguous()


def unpack_bit_words(words: Tensor, in_features: int) -> Tensor:
    """int32 [..., ceil(K/32), N] -> bool [..., N, K] (inverse of ``pack_bit_words``)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(BITS_PER_WORD, device=words.device)) & 1  # [..., Kw, N, 32]
    bits = bits.transpose(-2, -3)  # [..., N, Kw, 32]
    return bits.reshape(*bits.shape[:-2], -1)[..., :in_features].bool()
