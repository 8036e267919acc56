"""Launchers for ICQuant: tile-parallel position decode into a packed mask, and the mask-select GEMM; plus the
``quantpipe::icq_gemm`` op.

    mask = decode_mask(pos_data, pos_offsets, index_bits, rows=N, cols=K, segment=L, group_rows=R)
    y    = icq_gemm(x, qweight, scales, zeros, oscales, ozeros, mask, bits, group_size, in_features, bias=None)

Design: a two-kernel chain, not one fused kernel. (a) ``decode_mask`` turns the index stream into a 1-bit
outlier mask int32 [ceil(K/32), N] (``kernels.bitwords`` layout), one program per tile of R rows × L columns,
all tiles in parallel; (b) ``icq_gemm`` is the weight-only GEMM with one more coalesced word load per K-tile
that selects the grid. Why not fused: a GEMM program owns BLOCK_N output rows × a K-slice, but inside a tile
the gaps run row-major across all of the tile's columns, so the outliers of one K-tile are only known after
decoding the tile's stream prefix up to it; a fused kernel would either re-decode that prefix on every K step
(work quadratic in the tile length) or scatter decoded positions into a per-program bitmap, which Triton
cannot do (no indexed register/shared-memory writes; only global memory, with no grid-wide barrier). The mask
depends only on the weights, so ``ICQuantLinear`` decodes it once per device and caches it: the GEMM then
reads bits + 1 bits/weight (2-bit: 3) instead of bits + ~0.3 — the price of decoding only once.

Supported: code widths of ``kernels.packing`` (2/3/4/8), any group size (per-column gather unless BLOCK_K | g),
index bits 1..16, any tile shape; fp16/bf16/fp32 activations, any M (tuned for M <= 256). Numerics as
``kernels.wgemm``: Ŵ exact in fp32, cast to x's dtype, fp32 accumulation, one rounding (measured max relative
error vs the reference in the interpreter: fp32 4.2e-7, fp16 7.6e-5, bf16 1.4e-2). The decode is bit-exact.
Unsupported combinations make ``*_unsupported_reason`` non-None; ``ICQuantLinear`` then uses the reference
with a one-time warning. Importing this module does not import triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._gemm_launch import (
    SUPPORTED_DTYPES,
    cdiv,
    check_bias,
    check_qweight,
    check_x,
    device_reason,
    finish,
    plan_gemm,
)
from kernels._triton_util import triton_available
from kernels.bitwords import word_rows
from kernels.packing import SUPPORTED_BITS, codes_per_word, normalize_group_size, num_groups
from kernels.wgemm.configs import WGemmConfig

__all__ = [
    "MAX_INDEX_BITS",
    "SUPPORTED_DTYPES",
    "decode_mask",
    "decode_unsupported_reason",
    "gemm_unsupported_reason",
    "icq_gemm",
    "icq_gemm_op",
]

MAX_INDEX_BITS = 16  # the decode reads a remainder from 3 bytes: B + 7 <= 24 bits
MAX_BLOCK_U = 1024  # escape bits per decode step (a tile of 16 × 4096 at γ = 5 % holds ~3.4k)


def _kernels():
    from kernels.icq.triton import icq_decode_kernel, icq_gemm_kernel

    return icq_decode_kernel, icq_gemm_kernel


def _device_reason(tensors: tuple[Tensor, ...]) -> str | None:
    return device_reason(tensors, lambda: _kernels()[0], "kernels.icq.triton")


def decode_unsupported_reason(pos_data: Tensor, pos_offsets: Tensor, index_bits: int) -> str | None:
    """None if the decode kernel can run, else a short reason."""
    if not triton_available():
        return "triton is not installed"
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        return f"index bits {index_bits}"
    return _device_reason((pos_data, pos_offsets))


def _tiling(rows: int, cols: int, segment: int, group_rows: int) -> tuple[int, int, int, int]:
    """(L, R, S, G) as ``quant.icquant``: tile width/height and the column-segment/row-group counts."""
    L = cols if segment <= 0 else min(segment, cols)
    R = min(max(group_rows, 1), rows)
    L, R = max(L, 1), max(R, 1)
    return L, R, cdiv(cols, L), cdiv(rows, R)


def decode_mask(
    pos_data: Tensor,
    pos_offsets: Tensor,
    index_bits: int,
    rows: int,
    cols: int,
    segment: int,
    group_rows: int,
    *,
    block_u: int | None = None,
) -> Tensor:
    """Packed outlier mask int32 [ceil(cols/32), rows] decoded by the Triton kernel, one program per tile.

    Reads two ints of the tile table on the host (outlier total, longest tile) to place the escape stream and
    size the step: call it at load time, not per forward. ``block_u`` (power of two) overrides the step.
    """
    reason = decode_unsupported_reason(pos_data, pos_offsets, index_bits)
    if reason is not None:
        raise RuntimeError(f"ICQuant decode Triton kernel unsupported: {reason}")
    L, R, S, G = _tiling(rows, cols, segment, group_rows)
    T = S * G
    if pos_data.dtype != torch.uint8 or pos_data.dim() != 1:
        raise ValueError(f"pos_data must be a 1-D uint8 stream, got {pos_data.dtype} {tuple(pos_data.shape)}")
    if pos_offsets.dtype != torch.int32 or tuple(pos_offsets.shape) != (2, T + 1):
        raise ValueError(
            f"pos_offsets must be int32 [2, {T + 1}] for {rows}x{cols} in tiles of {R}x{L}, "
            f"got {pos_offsets.dtype} {tuple(pos_offsets.shape)}"
        )
    mask = torch.zeros(word_rows(cols), rows, dtype=torch.int32, device=pos_data.device)
    if T == 0 or pos_data.numel() == 0:
        return mask
    offsets = pos_offsets.contiguous()
    n_outliers = int(offsets[0, -1])
    if block_u is None:
        longest = int(offsets[1].diff().max())
        block_u = min(MAX_BLOCK_U, max(16, 1 << max(0, longest - 1).bit_length()))
    elif block_u < 1 or block_u & (block_u - 1):
        raise ValueError(f"block_u must be a power of two, got {block_u}")
    decode_kernel, _ = _kernels()
    decode_kernel[(T,)](
        pos_data,
        offsets,
        mask,
        pos_data.numel(),
        8 * math.ceil(n_outliers * index_bits / 8),  # the escape stream starts on the byte after the remainders
        rows,
        cols,
        L,
        R,
        S,
        offsets.stride(0),
        mask.stride(0),
        mask.stride(1),
        INDEX_BITS=index_bits,
        BLOCK_U=block_u,
        num_warps=4,
    )
    return mask


def gemm_unsupported_reason(
    x: Tensor, qweight: Tensor, grids: tuple[Tensor, Tensor, Tensor, Tensor], mask: Tensor, bits: int
) -> str | None:
    """None if the GEMM kernel can run this call (``grids`` = scales, zeros, oscales, ozeros), else a reason."""
    if not triton_available():
        return "triton is not installed"
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit codes"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype}"
    if any(t.dtype not in SUPPORTED_DTYPES for t in grids):
        return f"grid dtypes {[str(t.dtype) for t in grids]}"
    return _device_reason((x, qweight, mask, *grids))


def _validate(x, qweight, grids, mask, bits, group_size, K, bias) -> int:
    check_x(x, K)
    N = check_qweight(qweight, K, bits)
    if mask.dtype != torch.int32 or tuple(mask.shape) != (word_rows(K), N):
        raise ValueError(f"mask must be int32 [ceil(K/32)={word_rows(K)}, N={N}], got {mask.dtype} {tuple(mask.shape)}")
    G = num_groups(K, group_size)
    for name, t in zip(("scales", "zeros", "oscales", "ozeros"), grids, strict=True):
        if tuple(t.shape) != (G, N):
            raise ValueError(f"{name} must be [G={G}, N={N}], got {tuple(t.shape)}")
    check_bias(bias, N)
    return N


def icq_gemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    oscales: Tensor,
    ozeros: Tensor,
    mask: Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    *,
    config: WGemmConfig | None = None,
) -> Tensor:
    """y [..., N] = x [..., K] @ Ŵᵀ (+ bias), Ŵ from codes, both grids and the packed outlier ``mask``."""
    grids = (scales, zeros, oscales, ozeros)
    reason = gemm_unsupported_reason(x, qweight, grids, mask, bits)
    if reason is not None:
        raise RuntimeError(f"icq_gemm Triton kernel unsupported: {reason}")
    K = in_features
    group_size = normalize_group_size(group_size, K)
    N = _validate(x, qweight, grids, mask, bits, group_size, K, bias)
    plan = plan_gemm(x, N, K, group_size, bits, bias is not None, config)
    if plan.M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    s, z, so, zo = (t.contiguous() for t in grids)  # one stride pair for all four (no copy when packed)
    x2 = plan.x2
    _, kernel = _kernels()
    kernel[plan.grid](
        x2,
        qweight,
        mask,
        s,
        z,
        so,
        zo,
        *plan.io_args(bias, qweight, K, group_size),  # qweight: dummy bias pointer when unused
        qweight.stride(0),
        qweight.stride(1),
        mask.stride(0),
        mask.stride(1),
        s.stride(0),
        s.stride(1),
        *plan.out_strides,
        BITS=bits,
        PACK=codes_per_word(bits),
        GROUP_PER_TILE=group_size % plan.cfg.block_k == 0,
        **plan.launch_meta(kernel),
    )
    return finish(plan, x, bias)


@torch.library.custom_op(
    "quantpipe::icq_gemm",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor oscales, Tensor ozeros, Tensor mask, "
    "Tensor? bias, int bits, int group_size, int in_features) -> Tensor",
)
def icq_gemm_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    oscales: Tensor,
    ozeros: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``torch.ops.quantpipe.icq_gemm``: the kernel when supported, else the reference (opaque to compile)."""
    args = (x, qweight, scales, zeros, oscales, ozeros, mask, bits, group_size, in_features)
    if gemm_unsupported_reason(x, qweight, (scales, zeros, oscales, ozeros), mask, bits) is None:
        return icq_gemm(*args, bias=bias)
    from kernels.icq.ref import icq_gemm_ref

    return icq_gemm_ref(*args, bias=bias)


@icq_gemm_op.register_fake
def _icq_gemm_fake(x, qweight, scales, zeros, oscales, ozeros, mask, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])
