"""Triton kernels for ICQuant (``@triton.jit`` code only; the launchers are in ``launch.py``).

Requires triton (imported at module level): import this module lazily. Whether it runs in the interpreter
is decided when this module is imported (``TRITON_INTERPRET=1`` is read by ``triton.jit`` at decoration time).

``icq_decode_kernel`` — one program per tile (R rows × L columns, ``quant.icquant`` stream layout), all tiles
in parallel, no serial parse. The tile's slice of the escape stream is read BLOCK_U bits at a time; its
zero (stop) bits, in order, belong to the tile's outliers j = 0, 1, … (rank = running count of stops). With
z_j the stop's index inside the tile's escape slice and r_j the B-bit remainder of outlier j (read at the
fixed bit offset (o0 + j)·B of the remainder stream), the position inside the tile is

    p_j = Σ_{i<=j} (gap_i + 1) − 1 = (z_j − j)·2^B + Σ_{i<=j} r_i + j

(z_j − j = escape one-bits up to outlier j): a block cumsum of the stop bits, a gather and a block cumsum of
the remainders, carried across chunks. Each p_j sets bit (row, col) of the packed mask with an atomic OR
(several outliers share a word; tiles whose width is not a multiple of 32 share words with their neighbour).
Writes are bounds-checked against the tile, so a corrupt stream cannot write outside it; the stream's own
consistency is checked by the CPU decoder (``quant.icquant.decode_positions``), not here.

``icq_gemm_kernel`` — ``kernels.wgemm``'s tiling (program = [BLOCK_M, BLOCK_N] tile of y over a split-K
slice) with one more load per K-tile: the mask words mask[k // 32, n] (1 bit/weight, coalesced along N);
bit (k % 32) selects outlier vs inlier scale and zero (a select, both grids loaded per tile) before the
exact fp32 dequantize w = (code − z)·s, cast to x's dtype, and the fp32-accumulated product.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton_tiles import dot_acc, gemm_tile, k_slice, load_bits, load_codes, store_tile

__all__ = ["icq_decode_kernel", "icq_gemm_kernel"]


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def icq_decode_kernel(
    data_ptr, off_ptr, mask_ptr,
    n_bytes, esc_bit0, N, K, L, R, S,
    stride_off, stride_mk, stride_mn,
    BLOCK_U: tl.constexpr,
    INDEX_BITS: tl.constexpr,
):
    t = tl.program_id(0)
    r0 = (t // S) * R
    c0 = (t % S) * L
    width = tl.minimum(L, K - c0)
    area = tl.minimum(R, N - r0) * width
    o0 = tl.load(off_ptr + t)  # outliers before this tile (remainder index)
    e0 = tl.load(off_ptr + stride_off + t)  # escape-stream bits before this tile
    e1 = tl.load(off_ptr + stride_off + t + 1)
    carry_j = o0 * 0  # outliers of this tile seen so far (int32)
    carry_rem = o0 * 0  # their remainder sum
    for u0 in range(e0, e1, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        valid = u < e1
        ebit = esc_bit0 + u.to(tl.int64)
        ebyte = ebit >> 3
        byte = tl.load(data_ptr + ebyte, mask=valid & (ebyte < n_bytes), other=255).to(tl.int32)
        stop = valid & (((byte >> (ebit & 7).to(tl.int32)) & 1) == 0)
        stop_i = stop.to(tl.int32)
        j = carry_j + tl.cumsum(stop_i, axis=0) - 1  # outlier rank inside the tile, at its stop bit
        rbit = (o0 + j).to(tl.int64) * INDEX_BITS
        rbyte = rbit >> 3
        b0 = tl.load(data_ptr + rbyte, mask=stop & (rbyte < n_bytes), other=0).to(tl.int32)
        b1 = tl.load(data_ptr + rbyte + 1, mask=stop & (rbyte + 1 < n_bytes), other=0).to(tl.int32)
        b2 = tl.load(data_ptr + rbyte + 2, mask=stop & (rbyte + 2 < n_bytes), other=0).to(tl.int32)
        rem = ((b0 | (b1 << 8) | (b2 << 16)) >> (rbit & 7).to(tl.int32)) & ((1 << INDEX_BITS) - 1)
        rem = tl.where(stop, rem, 0)
        pos = ((u - e0 - j) << INDEX_BITS) + carry_rem + tl.cumsum(rem, axis=0) + j
        ok = stop & (pos >= 0) & (pos < area)
        row = r0 + pos // width
        col = c0 + pos % width
        tl.atomic_or(mask_ptr + (col // 32) * stride_mk + row * stride_mn, 1 << (col % 32), mask=ok, sem="relaxed")
        carry_j += tl.sum(stop_i, axis=0)
        carry_rem += tl.sum(rem, axis=0)
# fmt: on


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def icq_gemm_kernel(
    x_ptr, qw_ptr, mask_ptr, s_ptr, z_ptr, os_ptr, oz_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_mk, stride_mn, stride_sg, stride_sn, stride_os, stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BITS: tl.constexpr, PACK: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, acc, k_start, k_end = gemm_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k, _mask_k, mask_kn, x = k_slice(x_ptr, k0, k_end, offs_m, mask_m, mask_n, stride_xm, stride_xk, BLOCK_K)
        codes = load_codes(qw_ptr, offs_k, offs_n, mask_kn, stride_qk, stride_qn, BITS, PACK)
        outlier = load_bits(mask_ptr, offs_k, offs_n, mask_kn, stride_mk, stride_mn)
        if GROUP_PER_TILE:
            g_off = (k0 // group_size) * stride_sg + offs_n[None, :] * stride_sn  # [1, BLOCK_N]
            g_mask = mask_n[None, :]
        else:
            g_off = (offs_k // group_size)[:, None] * stride_sg + offs_n[None, :] * stride_sn  # [BLOCK_K, BLOCK_N]
            g_mask = mask_kn
        s_in = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        z_in = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        s_out = tl.load(os_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        z_out = tl.load(oz_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        s = tl.where(outlier, s_out, s_in)
        z = tl.where(outlier, z_out, z_in)
        w = (s * (codes.to(tl.float32) - z)).to(x.dtype)  # [BLOCK_K, BLOCK_N], exact before the cast
        acc = dot_acc(acc, x, w, USE_DOT, DOT_PRECISION, DOT_FP32)
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_on, HAS_BIAS)
# fmt: on
