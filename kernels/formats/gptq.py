"""GPTQ checkpoint tensors (``quant_method: gptq``; AutoGPTQ / GPTQModel / vLLM layout) from quantizer codes.

For a linear with weight W [N = out, K = in], b bits, G groups::

    qweight int32 [K·b/32, N]   codes packed along K: code k of column n sits at bits [b·k, b·k + b) of the
                                little-endian bit string formed by that column's words (qweight[0, n] holds
                                bits 0..31, qweight[1, n] bits 32..63, ...). For b = 2/4/8 that is
                                ``qweight[i, n] = Σ_j q[P·i + j, n] << (b·j)``, P = 32/b; for b = 3, 32 codes fill
                                3 words exactly (GPTQ's 3-bit layout, codes straddling word boundaries).
    qzeros  int32 [G, N·b/32]   stored zero points packed the same way along N
    scales  fp16  [G, N]
    g_idx   int32 [K]           group of input column k (k // group_size unless act-order reordered groups)

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n])

Zero-point convention (``checkpoint_format``):

* ``gptq`` (v1, AutoGPTQ): the stored zero is ``z − 1`` (masked to b bits) and readers add 1 back, so z = 0
  cannot be stored. Symmetric grids (z = 2^(b−1) everywhere: 4-bit words 0x77777777) are written in v1, the
  format every GPTQ loader reads (vLLM's Marlin / exllama kernels, AutoGPTQ, GPTQModel, transformers + optimum).
* ``gptq_v2`` (GPTQModel): the stored zero is ``z``. Asymmetric grids are written in v2: v1 cannot hold z = 0,
  GPTQModel converts every v1 checkpoint to v2 internally, optimum documents v1 as symmetric-only, and vLLM's
  ``gptq`` kernels read ``checkpoint_format: gptq_v2`` (its Marlin path is symmetric-only either way).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GPTQ_BITS", "checkpoint_format", "gptq_layer_reason", "pack_dense_int32", "pack_gptq_linear"]

GPTQ_BITS = (2, 3, 4, 8)
_CHUNK = 1 << 20  # codes per packing step (bounds the int64 scratch)


def checkpoint_format(sym: bool) -> str:
    """v1 for symmetric grids, v2 for asymmetric ones (module docstring)."""
    return "gptq" if sym else "gptq_v2"


def pack_dense_int32(values: Tensor, bits: int) -> Tensor:
    """Pack the last dim of ``values`` (ints in 0..2^bits − 1) densely into int32 words, little-endian bit order.

    Element j occupies bits [bits·j, bits·j + bits) of the row's bit string; word w holds bits [32w, 32w + 32).
    The last dim times ``bits`` must be a multiple of 32.
    """
    *lead, n = values.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words")
    flat = values.reshape(-1, n).to(torch.int64)
    if (flat < 0).any() or (flat >= (1 << bits)).any():
        raise ValueError(f"values outside 0..{(1 << bits) - 1}")
    words_per_row = n * bits // 32
    if 32 % bits == 0:  # whole codes per word: word w = Σ_j v[P·w + j] << (bits·j)
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        out = (flat.reshape(flat.shape[0], words_per_row, per_word) << shifts).sum(dim=-1)
    else:  # codes straddle words (3-bit): go through the bit planes, a chunk of rows at a time
        out = torch.empty(flat.shape[0], words_per_row, dtype=torch.int64)
        plane_shifts = torch.arange(bits, dtype=torch.int64)
        word_shifts = torch.arange(32, dtype=torch.int64)
        rows_per_chunk = max(1, _CHUNK // max(n, 1))
        for r0 in range(0, flat.shape[0], rows_per_chunk):
            chunk = flat[r0 : r0 + rows_per_chunk]
            planes = (chunk[..., None] >> plane_shifts) & 1  # [rows, n, bits], least significant bit first
            out[r0 : r0 + rows_per_chunk] = (planes.reshape(chunk.shape[0], words_per_row, 32) << word_shifts).sum(-1)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # two's complement int32
    return out.to(torch.int32).reshape(*lead, words_per_row)


def gptq_layer_reason(
    name: str, out_features: int, in_features: int, bits: int, group_size: int, zeros: Tensor, fmt: str
) -> str | None:
    """None when the layer fits the GPTQ layout exactly, else why not (one line)."""
    if bits not in GPTQ_BITS:
        return f"GPTQ checkpoints hold {GPTQ_BITS}-bit codes, not {bits}-bit"
    per_word = 32 if bits == 3 else 32 // bits  # codes that fill whole words
    if in_features % per_word:
        return f"{name}: {in_features} input columns do not fill whole {bits}-bit GPTQ words ({per_word} codes)"
    if out_features % per_word:
        return f"{name}: {out_features} output rows do not fill whole {bits}-bit qzeros words ({per_word} codes)"
    if in_features % group_size:
        return f"{name}: group {group_size} does not divide {in_features} columns (ragged last group)"
    if fmt == "gptq" and bool((zeros < 1).any()):
        return f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (zero − 1)"
    return None


def pack_gptq_linear(
    codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor | None, bits: int, group_size: int, fmt: str
) -> dict[str, Tensor]:
    """GPTQ tensors of one linear. ``codes`` uint8 [N, K], ``scales``/``zeros`` float32 [N, G] (fp16-exact scales,
    integer zeros), ``g_idx`` int32 [K] or None (contiguous groups)."""
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be gptq or gptq_v2, got {fmt!r}")
    in_f = codes.shape[1]
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.to(torch.float32), scales):
        raise ValueError("GPTQ scales are fp16: the grid's scales must be fp16-exact")
    z = zeros.to(torch.int64)
    if not torch.equal(z.to(torch.float32), zeros):
        raise ValueError("GPTQ zero points are integers")
    stored = (z - 1) & ((1 << bits) - 1) if fmt == "gptq" else z
    if g_idx is None:
        g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
    return {
        "qweight": pack_dense_int32(codes, bits).t().contiguous(),  # [K·b/32, N]: packed along K
        "qzeros": pack_dense_int32(stored.t().contiguous(), bits),  # [G, N·b/32], packed along N
        "scales": scales16.t().contiguous(),  # [G, N]
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
