"""Torch reference for the E8P decode-GEMM (the specification the Triton kernel is tested against).

    y = e8p_gemm_ref(x, qweight, scales, bias)    x [..., K], qweight int16 [N, K/8], scales fp16 [N] -> [..., N]

Ŵ[n, 8c:8c+8] = scales[n] · codeword(qweight[n, c]) in fp32 (``quant.e8p`` table), cast to x's dtype, then
``F.linear`` — exactly what ``E8PLinear`` computes between its transforms on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quant.e8p import E8PWeight

__all__ = ["e8p_gemm_ref"]


def e8p_gemm_ref(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, qweight2: Tensor | None = None
) -> Tensor:
    W = E8PWeight(qweight, scales.to(torch.float32), codes2=qweight2).dequantize(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))
