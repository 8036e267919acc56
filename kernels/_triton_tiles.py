"""``@triton.jit`` device helpers shared by the GEMM kernels (``kernels.wgemm``, ``kernels.bcq``, ``kernels.icq``,
``kernels.actquant``): the output tile and split-K range of a program, the x / packed-code / bit-word tile loads,
the fp32-accumulated product and the epilogue. Triton inlines them into each kernel, so the generated code (and
every kernel's numerics) is what the kernels wrote out before.

Requires triton (imported at module level): only the lazily imported ``kernels.<family>.triton`` modules import
this one, so ``import kernels...`` still works without triton, and these helpers are decorated under the same
``TRITON_INTERPRET`` setting as the kernels that call them.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "dot_acc",
    "gemm_tile",
    "k_slice",
    "load_bits",
    "load_codes",
    "load_x",
    "output_tile",
    "split_k_range",
    "store_tile",
]


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_m, offs_n, mask_m, mask_n) of this program's [BLOCK_M, BLOCK_N] tile of y (program ids 0, 1)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def split_k_range(K, k_per_split):
    """[k_start, k_end) of this program's split-K slice (program id 2)."""
    k_start = tl.program_id(2) * k_per_split
    return k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def load_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk):
    """x tile [BLOCK_M, BLOCK_K], zeros outside the bounds."""
    return tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )


@triton.jit
def gemm_tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where a split-K GEMM program starts: (offs_m, offs_n, mask_m, mask_n) of its output tile, a zero fp32
    [BLOCK_M, BLOCK_N] accumulator and its slice [k_start, k_end) of K."""
    offs_m, offs_n, mask_m, mask_n = output_tile(M, N, BLOCK_M, BLOCK_N)
    k_start, k_end = split_k_range(K, k_per_split)
    return offs_m, offs_n, mask_m, mask_n, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), k_start, k_end


@triton.jit
def k_slice(x_ptr, k0, k_end, offs_m, mask_m, mask_n, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """One step of the K loop from ``k0``: (offs_k, mask_k, mask_kn, x tile [BLOCK_M, BLOCK_K]), masked to the
    program's slice (``k_end``) and to the tile's rows and columns."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_end
    x = load_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk)
    return offs_k, mask_k, mask_k[:, None] & mask_n[None, :], x


@triton.jit
def load_codes(qw_ptr, offs_k, offs_n, mask_kn, stride_qk, stride_qn, BITS: tl.constexpr, PACK: tl.constexpr):
    """int32 codes [BLOCK_K, BLOCK_N] from INT32_KPACKED words: (qweight[k // PACK, n] >> (k % PACK)·BITS) & mask.

    Each word feeds PACK rows of k (the repeated loads hit cache); out-of-bounds codes are 0.
    """
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    words = tl.load(qw_ptr + (offs_k // PACK)[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask_kn, other=0)
    return (words >> ((offs_k % PACK) * BITS)[:, None]) & CODE_MASK


@triton.jit
def load_bits(ptr, offs_k, offs_n, mask_kn, stride_k, stride_n):
    """bool [BLOCK_K, BLOCK_N]: bit k % 32 of words[k // 32, n] (``kernels.bitwords`` layout); False outside."""
    words = tl.load(ptr + (offs_k // 32)[:, None] * stride_k + offs_n[None, :] * stride_n, mask=mask_kn, other=0)
    return ((words >> (offs_k % 32)[:, None]) & 1) != 0


@triton.jit
def dot_acc(acc, x, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + x @ w with fp32 accumulation: ``tl.dot`` if USE_DOT (BLOCK_M >= 16), else multiply + reduce."""
    if USE_DOT:
        if DOT_FP32:  # interpreter only: its tl.dot multiplies bf16 storage as uint16 (triton 3.9)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            acc += tl.dot(x, w, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    else:
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def store_tile(
    acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om, stride_on, HAS_BIAS: tl.constexpr
):
    """Epilogue: (+ bias, in fp32) and store the tile in out's dtype at split slice program id 2 (stride_os)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + tl.program_id(2) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
