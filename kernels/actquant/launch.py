"""Launchers for W4A4: per-token activation quantization and the integer-activation matmul.

    codes, scales = quantize_per_token(x, bits=4, clip_ratio=1.0, pack=False)   # matches ref.quantize_per_token
    y = int_gemm(codes, scales, qweight, wscales, wzeros, bits, group_size, K, x_packed=False, out_dtype=fp16)

``quantize_per_token`` runs the Triton kernel on CUDA (or on CPU when ``kernels.actquant.triton`` was imported
under TRITON_INTERPRET=1 and ``use_kernel=True``) and the reference otherwise; ``pack=True`` (bits <= 4, even K)
returns two codes per byte in the ``ref.pack_int4`` layout, which ``int_gemm(x_packed=True)`` reads directly.

Tensor cores: ``int_gemm`` feeds ``tl.dot`` with int8 operands and an int32 accumulator, which Triton lowers to
IMMA (sm80) / int8 wgmma (sm90). There is no int4×int4 path: Triton exposes no int4 MMA, and Hopper has no int4
tensor-core instruction at all, so 4-bit activations and weights are sign-extended to int8 in registers; the
memory traffic is still 4-bit. Speed of this path has not been measured in this repository.
Importing this module does not import triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton_util import is_interpreted, triton_available
from kernels.actquant import ref
from kernels.packing import codes_per_word, num_groups, packed_rows

__all__ = [
    "INT_GEMM_BITS",
    "actquant_unsupported_reason",
    "int_gemm",
    "int_gemm_unsupported_reason",
    "quantize_per_token",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_GEMM_BITS = (2, 3, 4, 8)
MAX_BLOCK_N = 2048  # columns per chunk of the two-pass row loop
INT_BLOCK_K = 64


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _kernels():
    from kernels.actquant import triton as tk

    return tk


def _device_ok(x: Tensor) -> str | None:
    if not triton_available():
        return "triton is not installed"
    if x.device.type != "cuda" and not is_interpreted(_kernels().actquant_kernel):
        return f"device {x.device.type} (needs CUDA, or TRITON_INTERPRET=1 when kernels.actquant.triton is imported)"
    return None


def actquant_unsupported_reason(x: Tensor, bits: int, pack: bool) -> str | None:
    """None if the Triton quantizer can run, else why not (bad arguments raise instead)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    return _device_ok(x)


def quantize_per_token(
    x: Tensor, bits: int = 4, clip_ratio: float = 1.0, *, pack: bool = False, use_kernel: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Codes int8 [..., K] (or packed [..., K/2]) and fp32 scales [..., 1], bit-identical to ``ref``.

    ``use_kernel``: None = kernel on CUDA when supported, True = require it, False = reference.
    """
    ref._check(bits, clip_ratio)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    K = x.shape[-1]
    if pack and (bits > 4 or K % 2):
        raise ValueError(f"pack=True needs bits <= 4 and an even last dim, got bits={bits}, K={K}")
    reason = actquant_unsupported_reason(x, bits, pack)
    if use_kernel is False or reason is not None or (use_kernel is None and x.device.type != "cuda"):
        if use_kernel and reason is not None:
            raise RuntimeError(f"actquant Triton kernel unsupported: {reason}")
        codes, scales = ref.quantize_per_token(x, bits=bits, clip_ratio=clip_ratio)
        return (ref.pack_int4(codes) if pack else codes), scales
    x2 = x.reshape(-1, K)
    if K and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    codes = torch.empty(rows, K // 2 if pack else K, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows and K:
        block_n = max(2, min(MAX_BLOCK_N, _next_pow2(K)))
        block_r = max(1, min(16, 4096 // block_n))
        grid = (-(-rows // block_r),)
        _kernels().actquant_kernel[grid](
            x2,
            codes,
            scales,
            rows,
            K,
            x2.stride(0),
            codes.stride(0),
            float(clip_ratio),
            QMAX=2 ** (bits - 1) - 1,
            PACK=pack,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            num_warps=4 if block_n * block_r >= 1024 else 1,
        )
    elif rows:
        scales.fill_(1.0)
    lead = x.shape[:-1]
    return codes.view(*lead, codes.shape[-1]), scales.view(*lead, 1)


def int_gemm_unsupported_reason(
    x_codes: Tensor, qweight: Tensor, zeros: Tensor, bits: int, group_size: int, in_features: int
) -> str | None:
    """None if ``int_gemm``'s kernel can run, else why not (so callers can fall back to ``ref.int_gemm_ref``)."""
    if bits not in INT_GEMM_BITS:
        return f"{bits}-bit weights"
    g = in_features if group_size <= 0 else group_size
    if g % INT_BLOCK_K and g != in_features:
        return f"group size {g} is not a multiple of {INT_BLOCK_K} (one weight scale per K-tile)"
    zf = zeros.float()
    if zf.numel() and (
        bool((zf != torch.round(zf)).any()) or float(zf.max()) > 128 or float(zf.min()) < (1 << bits) - 1 - 127
    ):
        return "zero points do not keep code - zero inside int8"
    return _device_ok(x_codes)


def int_gemm(
    x_codes: Tensor,
    x_scales: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    x_packed: bool = False,
    out_dtype: torch.dtype = torch.float16,
) -> Tensor:
    """y [..., N] = diag(s_x) X_int Ŵᵀ (see the module docstring); weights in ``kernels.packing`` layout, no g_idx."""
    K = in_features
    reason = int_gemm_unsupported_reason(x_codes, qweight, zeros, bits, group_size, K)
    if reason is not None:
        raise RuntimeError(f"int_gemm Triton kernel unsupported: {reason}")
    kx = x_codes.shape[-1] * (2 if x_packed else 1)
    if x_codes.dtype != torch.int8 or kx != K:
        raise ValueError(
            f"x_codes must be int8 [..., {K // 2 if x_packed else K}], got {x_codes.dtype} {x_codes.shape}"
        )
    if qweight.dtype != torch.int32 or tuple(qweight.shape[:1]) != (packed_rows(K, bits),):
        raise ValueError(f"qweight must be int32 [{packed_rows(K, bits)}, N], got {qweight.dtype} {qweight.shape}")
    N = qweight.shape[1]
    g = K if group_size <= 0 else group_size
    G = num_groups(K, g)
    if tuple(scales.shape) != (G, N) or tuple(zeros.shape) != (G, N):
        raise ValueError(f"scales/zeros must be [G={G}, N={N}], got {tuple(scales.shape)}/{tuple(zeros.shape)}")
    lead = x_codes.shape[:-1]
    xc = x_codes.reshape(-1, x_codes.shape[-1])
    xs = x_scales.reshape(-1).to(torch.float32).contiguous()
    M = xc.shape[0]
    if xs.numel() != M:
        raise ValueError(f"x_scales must hold one scale per row ({M}), got {tuple(x_scales.shape)}")
    out = torch.empty(M, N, dtype=out_dtype, device=xc.device)
    if M == 0:
        return out.view(*lead, N)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)  # int8 tl.dot needs tiles of at least 16
    block_n = 64 if N >= 64 else max(16, _next_pow2(N))
    grid = (-(-M // block_m), -(-N // block_n))
    _kernels().int_gemm_kernel[grid](
        xc,
        xs,
        qweight,
        scales,
        zeros,
        out,
        M,
        N,
        K,
        g,
        xc.stride(0),
        xc.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        PACK=codes_per_word(bits),
        X_PACKED=x_packed,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=INT_BLOCK_K,
        num_warps=4,
    )
    return out.view(*lead, N)
