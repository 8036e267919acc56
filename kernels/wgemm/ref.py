"""Reference (spec) for the weight-only GEMM: dequantize the packed weight in fp32, then matmul in x's dtype.

    W_hat[n, k] = scales[grp(k), n] * (codes[n, k] - zeros[grp(k), n])        (exact in fp32)
    y = F.linear(x, W_hat.to(x.dtype), bias)  = x @ W_hat.T (+ bias)            x: [..., K] -> y: [..., N]

``F.linear`` (not ``x @ W.T + b``) so that a QuantLinear is bit-identical to an ``nn.Linear`` holding the
fake-quantized weight W_hat (same op, same dtype), which is how the pipeline checks packed == fake-quantized.

Tensors are in the checkpoint layout of ``kernels.packing`` (qweight [ceil(K/P), N] int32, scales/zeros
fp16 [G, N], g_idx int32 [K] or None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.packing import group_index, unpack_codes

__all__ = ["dequantize_packed", "wgemm_ref"]


def dequantize_packed(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W_hat [N, K] from packed tensors, computed in fp32 (exact) and then cast to ``dtype``."""
    codes = unpack_codes(qweight, bits, in_features)  # [N, K]
    grp = group_index(in_features, group_size, g_idx, device=qweight.device)
    s = scales.to(torch.float32)[grp].t()  # [N, K]
    z = zeros.to(torch.float32)[grp].t()
    return (s * (codes.to(torch.float32) - z)).to(dtype).contiguous()  # row-major [N, K], like nn.Linear


def wgemm_ref(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y [..., N] = F.linear(x [..., K], W_hat, bias), in x's dtype."""
    W_hat = dequantize_packed(qweight, scales, zeros, g_idx, bits, group_size, in_features, dtype=x.dtype)
    return F.linear(x, W_hat, None if bias is None else bias.to(x.dtype))
