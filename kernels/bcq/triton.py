"""Triton kernel for the binary-coding GEMM (``@triton.jit`` code only; the launcher is ``launch.py``).

Requires triton (imported at module level): import this module lazily. Whether it runs in the interpreter
is decided when this module is imported (``TRITON_INTERPRET=1`` is read by ``triton.jit`` at decoration time).

Program (pid_m, pid_n, pid_k) computes a [BLOCK_M, BLOCK_N] tile of y over its K range (split-K slice), like
``kernels.wgemm``; per K-tile it rebuilds the weight tile from the planes instead of from codes:
  for each plane i (unrolled, k is a compile-time constant): load words planes[i, k // 32, n] (one coalesced
  row feeds 32 K-rows, the repeats hit cache), bit = (word >> k % 32) & 1, w += bit ? α'_i : −α'_i (a select,
  no multiply); then w += β' and cast to x's dtype; acc += x @ w in fp32 (``tl.dot`` if BLOCK_M >= 16, else
  multiply + reduce). β' is added to the dequantized tile rather than as β'·Σx per group: it costs one add per
  weight, keeps the reference's summation order (planes, then β') and needs no per-group x sums.
  α'/β': one [BLOCK_N] row per K-tile when BLOCK_K | group_size (GROUP_PER_TILE), else a per-column gather at
  g = k // group_size (any group size, ragged last group included).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._triton_tiles import dot_acc, gemm_tile, k_slice, load_bits, store_tile

__all__ = ["bcq_gemm_kernel"]


# parameters grouped by role (pointers; sizes; strides; shared meta-parameters; this kernel's own), not one a line
# fmt: off
@triton.jit
def bcq_gemm_kernel(
    x_ptr, planes_ptr, alpha_ptr, beta_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_pi, stride_pk, stride_pn, stride_ai, stride_ag, stride_an, stride_bg, stride_bn,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NPLANES: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, acc, k_start, k_end = gemm_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k, _mask_k, mask_kn, x = k_slice(x_ptr, k0, k_end, offs_m, mask_m, mask_n, stride_xm, stride_xk, BLOCK_K)
        if GROUP_PER_TILE:
            g = k0 // group_size
            a_off = g * stride_ag + offs_n[None, :] * stride_an  # [1, BLOCK_N]
            a_mask = mask_n[None, :]
            beta = tl.load(beta_ptr + g * stride_bg + offs_n[None, :] * stride_bn, mask=a_mask, other=0.0)
        else:
            grp = offs_k // group_size
            a_off = grp[:, None] * stride_ag + offs_n[None, :] * stride_an  # [BLOCK_K, BLOCK_N]
            a_mask = mask_kn
            beta = tl.load(beta_ptr + grp[:, None] * stride_bg + offs_n[None, :] * stride_bn, mask=a_mask, other=0.0)
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(NPLANES):
            bit = load_bits(planes_ptr + i * stride_pi, offs_k, offs_n, mask_kn, stride_pk, stride_pn)
            a = tl.load(alpha_ptr + i * stride_ai + a_off, mask=a_mask, other=0.0).to(tl.float32)
            w += tl.where(bit, a, -a)
        w = (w + beta.to(tl.float32)).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc = dot_acc(acc, x, w, USE_DOT, DOT_PRECISION, DOT_FP32)
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_on, HAS_BIAS)
# fmt: on
