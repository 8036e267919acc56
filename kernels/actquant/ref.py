"""Torch reference for per-token symmetric activation quantization (QuaRot W4A4).

This file is the *specification*: the Triton kernel in ``kernels.actquant.triton`` and the QuaRot code in
``quant/`` both match it. Per row (all leading dims flattened), with ``qmax = 2^(bits-1) - 1``:

    scale = clip_ratio * max|x| / qmax        (fp32; rows whose max|x| is 0 get scale 1)
    codes = clamp(round(x / scale), -2^(bits-1), qmax)   (int8)

``round`` is torch's round-half-to-even. The arithmetic is done in fp32 whatever the input dtype, so fp16,
bf16 and fp32 activations give the same codes for the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "dequantize_per_token",
    "fake_quant_per_token",
    "int_gemm_ref",
    "pack_int4",
    "quantize_per_token",
    "unpack_int4",
]


def _check(bits: int, clip_ratio: float) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] (int8 codes), got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")


def quantize_per_token(x: Tensor, bits: int = 4, clip_ratio: float = 1.0, group_size: int = 0) -> tuple[Tensor, Tensor]:
    """Quantize each row (last dim) of ``x`` symmetrically to ``bits``-bit signed integer codes.

    Returns ``(codes, scales)``: ``codes`` int8 with ``x``'s shape, values in ``[-2^(bits-1), 2^(bits-1)-1]``;
    ``scales`` fp32 of shape ``x.shape[:-1] + (1,)``. ``clip_ratio < 1`` clips outliers (QuaRot's activation
    clipping); values beyond the clipped range saturate. ``group_size > 0`` (QuaRot's ``a_groupsize``): one scale
    per token and group of ``group_size`` consecutive channels, ``scales`` then ``x.shape[:-1] + (K / group_size,)``.
    """
    _check(bits, clip_ratio)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    K = x.shape[-1]
    if group_size < 0 or (group_size and K % group_size):
        raise ValueError(f"activation group_size {group_size} must be 0 (per token) or divide {K} channels")
    gs = group_size or K
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    xf = x.float().reshape(*x.shape[:-1], K // gs, gs)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scales = amax * clip_ratio / qmax
    scales = torch.where(amax == 0, torch.ones_like(scales), scales)
    codes = torch.clamp(torch.round(xf / scales), qmin, qmax).to(torch.int8)
    return codes.reshape(x.shape), scales.squeeze(-1) if group_size else scales.reshape(*x.shape[:-1], 1)


def dequantize_per_token(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float16) -> Tensor:
    """Inverse of :func:`quantize_per_token`: ``codes * scales`` in fp32, cast to ``dtype`` (per-group scales
    [..., K / g] broadcast over their groups)."""
    K, G = codes.shape[-1], scales.shape[-1]
    if G == 1:
        return (codes.float() * scales.float()).to(dtype)
    grouped = codes.float().reshape(*codes.shape[:-1], G, K // G) * scales.float().unsqueeze(-1)
    return grouped.reshape(codes.shape).to(dtype)


def fake_quant_per_token(x: Tensor, bits: int = 4, clip_ratio: float = 1.0, group_size: int = 0) -> Tensor:
    """Quantize then dequantize (same dtype and shape as ``x``): the simulated-quantization forward of QuaRot."""
    codes, scales = quantize_per_token(x, bits=bits, clip_ratio=clip_ratio, group_size=group_size)
    return dequantize_per_token(codes, scales, dtype=x.dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """Two signed 4-bit codes per int8 byte along the last dim (even length): byte j = (c[2j] & 0xF) | c[2j+1] << 4.

    Layout (little nibble first, the order int4 tensor-core fragments use)::

        codes [..., K] int8 in [-8, 7]  ->  packed [..., K/2] int8
        packed[..., j]:  bit 7 .. 4 = c[2j+1] (two's complement nibble),  bit 3 .. 0 = c[2j]
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("pack_int4 needs codes in [-8, 7]")
    lo, hi = c[..., 0::2], c[..., 1::2]
    b = (lo & 0xF) | ((hi & 0xF) << 4)  # 0 .. 255
    return torch.where(b >= 128, b - 256, b).to(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 [..., K/2] -> int8 codes [..., K] in [-8, 7] (sign-extended nibbles)."""
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)


def int_gemm_ref(
    x_codes: Tensor,
    x_scales: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype = torch.float16,
) -> Tensor:
    """Spec of the W4A4 matmul: y [M, N] = diag(s_x) · X_int · Ŵᵀ in fp64, cast to ``out_dtype``.

    ``x_codes`` int8 [M, K] and ``x_scales`` fp32 [M, 1] from :func:`quantize_per_token`; the weight is the
    ``kernels.packing`` INT32_KPACKED layout (qweight [ceil(K/P), N], fp16 scales/zeros [G, N], no g_idx), so
    Ŵ[n, k] = scales[grp(k), n] · (code[n, k] − zeros[grp(k), n]). fp64 makes this an exact-enough yardstick for
    the kernel's int32 tile sums times fp32 scales.
    """
    from kernels.wgemm.ref import dequantize_packed

    W = dequantize_packed(qweight, scales, zeros, None, bits, group_size, in_features, dtype=torch.float64)
    y = (x_codes.to(torch.float64) * x_scales.to(torch.float64)) @ W.t()
    return y.to(out_dtype)
