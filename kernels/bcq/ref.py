"""Reference (spec) for the binary-coding GEMM: dequantize the bit-planes in fp32, then matmul in x's dtype.

    ŵ[n, j] = Σ_i α'_i[g(j), n] · (2·B_i[n, j] − 1) + β'[g(j), n]           (g(j) = j // group_size)
    y = F.linear(x, Ŵ.to(x.dtype), bias)                                     x: [..., K] -> y: [..., N]

Tensors are the checkpoint layout of ``kernels.bcq_linear`` (planes int32 [k, ceil(K/32), N], alpha fp16
[k, G, N], beta fp16 [G, N]). The sum runs plane by plane in fp32 and β' is added last, the order of
``quant.gptqt.BinaryCodedWeight.dequantize``, so this is bit-identical to ``BCQLinear``'s weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.bitwords import unpack_bit_words
from kernels.packing import normalize_group_size

__all__ = ["bcq_gemm_ref", "dequantize_bcq_packed"]


def dequantize_bcq_packed(
    planes: Tensor,
    alpha: Tensor,
    beta: Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ŵ [N, K] from the packed planes and fp16 α', β', computed in fp32 and cast to ``dtype``."""
    K = in_features
    g = torch.arange(K, device=planes.device) // normalize_group_size(group_size, K)
    signs = unpack_bit_words(planes, K).to(torch.float32) * 2 - 1  # [k, N, K]
    a = alpha.to(torch.float32)[:, g, :].transpose(1, 2)  # [k, N, K]
    W = (a * signs).sum(0) + beta.to(torch.float32)[g].t()
    return W.to(dtype).contiguous()


def bcq_gemm_ref(
    x: Tensor,
    planes: Tensor,
    alpha: Tensor,
    beta: Tensor,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y [..., N] = F.linear(x [..., K], Ŵ, bias), in x's dtype."""
    W = dequantize_bcq_packed(planes, alpha, beta, group_size, in_features, dtype=x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))
