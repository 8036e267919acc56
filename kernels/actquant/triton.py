"""Triton kernels for W4A4 (``@triton.jit`` only; launchers in ``kernels.actquant.launch``).

Requires triton; import lazily (TRITON_INTERPRET=1 is read when this module is imported).

``actquant_kernel``: one program per BLOCK_R rows; pass 1 walks the row in BLOCK_N chunks for max|x|, pass 2
divides by the scale, rounds half-to-even (built from floor, as torch.round does), clamps and stores int8 codes,
or, with PACK, two 4-bit codes per byte (``kernels.actquant.ref.pack_int4`` layout). The arithmetic order matches
the reference (``amax * clip / qmax``, then a true division), so codes are bit-identical to ``ref.py``.

``int_gemm_kernel``: y = diag(s_x) X_int Ŵᵀ with int8 activation codes and INT32_KPACKED weights. Per K-tile:
unpack weight codes, subtract the integer zero point -> int8 in [-2^b, 2^b] (b <= 4 so it fits), one
``tl.dot(int8, int8) -> int32`` (tensor-core IMMA on sm80+/wgmma on sm90 when compiled), then acc_fp32 +=
tile_int32 · s_w[group]; finally acc · s_x[row]. BLOCK_K must divide the group size (one scale row per tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton_tiles import load_codes, output_tile

__all__ = ["actquant_kernel", "int_gemm_kernel"]


@triton.jit
def _round_half_even(q):
    r = tl.floor(q + 0.5)
    tie = (r - q) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def actquant_kernel(
    x_ptr, codes_ptr, scales_ptr,
    rows, ncols, stride_x, stride_c, clip_ratio,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, ncols, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        m = mask_r[:, None] & (offs_c < ncols)[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = amax * clip_ratio / QMAX
    scale = tl.where(amax == 0.0, 1.0, scale)
    tl.store(scales_ptr + offs_r, scale, mask=mask_r)
    for c0 in range(0, ncols, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        m = mask_r[:, None] & (offs_c < ncols)[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
        q = _round_half_even(x / scale[:, None])
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
        if PACK:
            lo, hi = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_N // 2, 2)))
            byte = (lo & 0xF) | ((hi & 0xF) << 4)
            byte = tl.where(byte >= 128, byte - 256, byte).to(tl.int8)
            offs_p = c0 // 2 + tl.arange(0, BLOCK_N // 2)
            pm = mask_r[:, None] & (offs_p < ncols // 2)[None, :]
            tl.store(codes_ptr + offs_r[:, None] * stride_c + offs_p[None, :], byte, mask=pm)
        else:
            tl.store(codes_ptr + offs_r[:, None] * stride_c + offs_c[None, :], q.to(tl.int8), mask=m)
# fmt: on


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def int_gemm_kernel(
    xc_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BITS: tl.constexpr, PACK: tl.constexpr, X_PACKED: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if X_PACKED:  # two int4 per byte along K: load bytes once, sign-extend both nibbles
            offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(
                xc_ptr + offs_m[:, None] * stride_xm + offs_kb[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_kb < (K + 1) // 2)[None, :],
                other=0,
            ).to(tl.int32)
            lo = ((b & 0xF) ^ 8) - 8
            hi = (((b >> 4) & 0xF) ^ 8) - 8
            xq = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K)).to(tl.int8)
        else:
            xq = tl.load(
                xc_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            )
        codes = load_codes(qw_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :], stride_qk, stride_qn, BITS, PACK)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.int32)
        w = tl.where(mask_k[:, None], codes - z[None, :], 0).to(tl.int8)  # [BLOCK_K, BLOCK_N]
        part = tl.dot(xq, w, out_dtype=tl.int32)
        acc += part.to(tl.float32) * s[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    acc = acc * xs[:, None]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# fmt: on
