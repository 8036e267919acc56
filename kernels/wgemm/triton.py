"""Triton kernel for the weight-only GEMM (``@triton.jit`` code only; see ``launch.py`` for the launcher).

Requires triton (imported at module level): import this module lazily. Whether it runs in the interpreter
is decided when this module is imported (``TRITON_INTERPRET=1`` is read by ``triton.jit`` at decoration time).

Program (pid_m, pid_n, pid_k) computes a [BLOCK_M, BLOCK_N] tile of y over its K range (split-K slice):
  for each K-tile: load x [BLOCK_M, BLOCK_K]; load int32 words qweight[k // P, n] (each word feeds P rows, the
  repeats hit cache); codes = (word >> (k % P) * BITS) & mask; w = (codes - zero) * scale in fp32 (exact),
  cast to x's dtype; acc += x @ w (``tl.dot`` if BLOCK_M >= 16, else multiply + reduce).
  Scales/zeros: one [BLOCK_N] row per K-tile when BLOCK_K | group_size and no g_idx (GROUP_PER_TILE),
  else a per-column gather scales[grp(k), n] with grp from g_idx (act-order, no runtime reordering) or k // g
  (this also covers group sizes that are not a multiple of BLOCK_K and a ragged last group).
  SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N]; the launcher reduces them (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton_tiles import dot_acc, gemm_tile, k_slice, load_codes, store_tile

__all__ = ["wgemm_kernel"]


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def wgemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BITS: tl.constexpr, PACK: tl.constexpr, HAS_GIDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, acc, k_start, k_end = gemm_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k, mask_k, mask_kn, x = k_slice(x_ptr, k0, k_end, offs_m, mask_m, mask_n, stride_xm, stride_xk, BLOCK_K)
        codes = load_codes(qw_ptr, offs_k, offs_n, mask_kn, stride_qk, stride_qn, BITS, PACK)
        if GROUP_PER_TILE:
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
            z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
        else:
            if HAS_GIDX:
                grp = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
            else:
                grp = offs_k // group_size
            sz_off = grp[:, None] * stride_sg + offs_n[None, :] * stride_sn
            s = tl.load(s_ptr + sz_off, mask=mask_kn, other=0.0)
            z = tl.load(z_ptr + sz_off, mask=mask_kn, other=0.0)
        w = ((codes.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc = dot_acc(acc, x, w, USE_DOT, DOT_PRECISION, DOT_FP32)
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_on, HAS_BIAS)
# fmt: on
