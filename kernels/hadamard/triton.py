"""Triton FWHT kernel (``@triton.jit`` only): normalised Walsh–Hadamard transform of rows of length N = 2^k.

Requires triton; import lazily (TRITON_INTERPRET=1 is read when this module is imported).

Constant-geometry (Pease) form: every stage maps a row x to [x_even + x_odd, x_even − x_odd]; log2(N) stages give
x ↦ H_N x in Sylvester (natural) order. In Triton one stage is reshape [R, N/2, 2] → split → join → permute →
reshape, all in registers, fp32 accumulation; the result is scaled by 1/sqrt(N) and cast to the output dtype.
With HAS_SIGNS the row is first multiplied by a ±1 (or any fp32) vector d of length N: the randomized Hadamard
transform H diag(d) x of QuIP#/QuaRot in one pass over x, instead of a separate elementwise kernel (for
n = m·2^k the rows are [m, 2^k] views and M_FAC = m picks each view's slice of d).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fwht_kernel"]


@triton.jit
def fwht_kernel(
    x_ptr,
    out_ptr,
    d_ptr,
    rows,
    stride_x,
    stride_o,
    scale,
    N: tl.constexpr,
    LOG_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_SIGNS: tl.constexpr = False,
    M_FAC: tl.constexpr = 1,
):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, N)
    mask = (offs_r < rows)[:, None]
    x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SIGNS:
        # rows are [..., M_FAC, N] views of length-M_FAC·N vectors: row r uses d[(r % M_FAC)·N : …+N]
        d = tl.load(d_ptr + (offs_r % M_FAC)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        x = x * d.to(tl.float32)
    for _ in tl.static_range(LOG_N):
        a, b = tl.split(tl.reshape(x, (BLOCK_R, N // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_R, N))
    x = x * scale
    tl.store(out_ptr + offs_r[:, None] * stride_o + offs_n[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)
