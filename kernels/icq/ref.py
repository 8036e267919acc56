"""Reference (spec) for the ICQuant kernels: position decode into a packed outlier mask, and the GEMM.

    mask  = pack_bit_words(quant.icquant.decode_positions(stream))     int32 [ceil(K/32), N] (``kernels.bitwords``)
    ŵ[n, k] = s_sel · (code[n, k] − z_sel),  (s_sel, z_sel) = outlier grid where the mask bit is set, else inlier
    y = F.linear(x, Ŵ.to(x.dtype), bias)

Tensors are the checkpoint layout of ``kernels.icq_linear`` (qweight INT32_KPACKED, grids fp16 [G, N], the
uint8 position stream and its int32 [2, T + 1] tile table). Ŵ is exact in fp32 and bit-identical to
``ICQuantLinear``'s weight (same product, same operand order as ``quant.grid.dequantize_codes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.bitwords import pack_bit_words, unpack_bit_words
from kernels.packing import normalize_group_size, unpack_codes
from quant.icquant import IndexStream, decode_positions

__all__ = ["decode_mask_ref", "dequantize_icq_packed", "icq_gemm_ref"]


def decode_mask_ref(
    pos_data: Tensor, pos_offsets: Tensor, index_bits: int, rows: int, cols: int, segment: int, group_rows: int
) -> Tensor:
    """Packed outlier mask int32 [ceil(cols/32), rows] decoded by ``quant.icquant.decode_positions``."""
    stream = IndexStream(pos_data, pos_offsets, index_bits, rows, cols, segment, group_rows)
    return pack_bit_words(decode_positions(stream))


def dequantize_icq_packed(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    oscales: Tensor,
    ozeros: Tensor,
    mask: Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ŵ [N, K] from codes, both fp16 grids [G, N] and the packed outlier mask; exact in fp32, cast to ``dtype``."""
    K = in_features
    codes = unpack_codes(qweight, bits, K).to(torch.float32)  # [N, K]
    outlier = unpack_bit_words(mask, K)  # [N, K]
    g = torch.arange(K, device=qweight.device) // normalize_group_size(group_size, K)

    def per_column(t: Tensor) -> Tensor:
        return t.to(torch.float32)[g].t()

    s = torch.where(outlier, per_column(oscales), per_column(scales))
    z = torch.where(outlier, per_column(ozeros), per_column(zeros))
    return (s * (codes - z)).to(dtype).contiguous()


def icq_gemm_ref(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    oscales: Tensor,
    ozeros: Tensor,
    mask: Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y [..., N] = F.linear(x [..., K], Ŵ, bias), in x's dtype."""
    W = dequantize_icq_packed(qweight, scales, zeros, oscales, ozeros, mask, bits, group_size, in_features, x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))
