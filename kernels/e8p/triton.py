"""Triton kernel for the E8P decode-GEMM (``@triton.jit`` code only; the launcher is ``launch.py``).

Requires triton (imported at module level): import this module lazily (``TRITON_INTERPRET=1`` is read when the
kernel is decorated, i.e. when this module is first imported).

Program (pid_m, pid_n, pid_k) computes a [BLOCK_M, BLOCK_N] tile of y over its K range (split-K slice), like
``kernels.wgemm``. Per K-tile (BLOCK_K a multiple of 8) it rebuilds the weight tile from the 16-bit codeword
indices: index = qweight[n, k // 8] (one int16 feeds 8 K-rows; the repeats hit cache), value = table[index, k % 8]
from the 65,536 × 8 codeword table (1 MiB in fp16, exact: every entry is a multiple of 1/4 below 3, so it stays
in L2) — plus, for 3-bit codes (HAS_RESID), table2[qweight2[n, k // 8], k % 8] from the 256 × 8 residual table
already divided by ρ (exact in fp16) — cast to x's dtype, acc += x @ w in fp32. The per-row scale is constant
along K, so it multiplies the fp32 accumulator once at the end (before the bias), not every weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton_tiles import dot_acc, gemm_tile, k_slice, store_tile

__all__ = ["e8p_gemm_kernel"]


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def e8p_gemm_kernel(
    x_ptr, codes_ptr, table_ptr, codes2_ptr, table2_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_cn, stride_ck, stride_c2n, stride_c2k, stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_RESID: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, acc, k_start, k_end = gemm_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k, _mask_k, mask_kn, x = k_slice(x_ptr, k0, k_end, offs_m, mask_m, mask_n, stride_xm, stride_xk, BLOCK_K)
        c_ptrs = codes_ptr + offs_n[None, :] * stride_cn + (offs_k // 8)[:, None] * stride_ck
        idx = tl.load(c_ptrs, mask=mask_kn, other=0).to(tl.int32) & 0xFFFF  # [BLOCK_K, BLOCK_N]
        w = tl.load(table_ptr + idx * 8 + (offs_k % 8)[:, None], mask=mask_kn, other=0.0).to(tl.float32)
        if HAS_RESID:
            c2_ptrs = codes2_ptr + offs_n[None, :] * stride_c2n + (offs_k // 8)[:, None] * stride_c2k
            idx2 = tl.load(c2_ptrs, mask=mask_kn, other=0).to(tl.int32)
            w += tl.load(table2_ptr + idx2 * 8 + (offs_k % 8)[:, None], mask=mask_kn, other=0.0).to(tl.float32)
        acc = dot_acc(acc, x, w.to(x.dtype), USE_DOT, DOT_PRECISION, DOT_FP32)
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_on, HAS_BIAS)
# fmt: on
