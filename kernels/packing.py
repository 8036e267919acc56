"""Packing of group-wise quantized Linear weights into int32 words (checkpoint + kernel layout).

Input contract (what the quantizer produces) for a Linear with weight ``W`` of shape [N=out, K=in]::

    codes   uint8   [N, K]   values in 0 .. 2**bits - 1
    scales  float32 [N, G]   G = ceil(K / g); a ragged last group is allowed (K=576, g=128 -> G=5)
    zeros   float32 [N, G]   integer-valued zero points
    g_idx   int32   [K]      optional group of each input column (act-order); None means k // g
    W_hat[n, k] = scales[n, grp(k)] * (codes[n, k] - zeros[n, grp(k)])

Layout ``PackFormat.INT32_KPACKED`` (version 1): codes are packed along K (the reduction dim), and N is the
contiguous dim, so a GEMV/GEMM program that owns a block of output columns reads whole, coalesced rows of
words while it walks K. ``P = 32 // bits`` codes share one int32 word (2-bit: 16, 3-bit: 10, 4-bit: 8,
8-bit: 4); 3-bit leaves the top 2 bits of every word zero. Code ``j`` of a word sits in bits
``[j*bits, (j+1)*bits)``; K is zero-padded up to a multiple of P::

    codes [N, K] (row n)           qweight [Kw = ceil(K / P), N] int32, row-major (N contiguous)

     k:  0   1  ...  P-1  P ...        word w, column n  (4-bit, P = 8):
    n  [c0, c1, ..., cP-1, cP, ...]    bit 31                                               bit 0
                                       +---------+---------+-----+---------+---------+
                                       | c[n,8w+7]| c[n,8w+6]| ... | c[n,8w+1]| c[n,8w+0]|
                                       +---------+---------+-----+---------+---------+
                                       3-bit (P = 10):  | 0 0 | c9 | c8 | ... | c1 | c0 |

    qweight[w, n] = sum_j codes[n, w*P + j] << (j * bits)          (as a two's-complement int32)

Scales and zeros are stored transposed, ``[G, N]`` (N contiguous, same reason) and in **fp16**:

* the quantizer's fp32 scales are **rounded to fp16 at pack time** (``round_scales_fp16``). The fake-quantized
  weight that the pipeline compares against must therefore be built from ``round_scales_fp16(scales)``;
* zero points must be integers exactly representable in fp16 (|z| <= 2048); this is checked.

Because ``scale_fp16 * (code - zero)`` is a product of an 11-bit mantissa and a small integer, it is **exact in
fp32**: ``dequantize_reference`` (and every kernel that dequantizes in fp32) yields bit-identical ``W_hat``.

Checkpoint tensors (``pack_quantized_linear``), also the buffer names of ``kernels.quant_linear.QuantLinear``:

    qweight int32 [ceil(K/P), N]   scales fp16 [G, N]   zeros fp16 [G, N]   g_idx int32 [K] (only if given)
    qmeta   int32 [4] = (format version, bits, group_size, in_features K)
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "PackFormat",
    "UnpackedLinear",
    "codes_per_word",
    "dequantize_reference",
    "group_index",
    "normalize_group_size",
    "num_groups",
    "pack_codes",
    "pack_quantized_linear",
    "packed_nbytes",
    "packed_rows",
    "read_qmeta",
    "round_scales_fp16",
    "unpack_codes",
    "unpack_quantized_linear",
]

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
FP16_MAX_EXACT_INT = 2048
SCALE_DTYPE = torch.float16


class PackFormat(enum.StrEnum):
    """Named packing layouts (see the module docstring for the diagram)."""

    INT32_KPACKED = "int32_kpacked"  # qweight [ceil(K/P), N], P = 32 // bits codes per word, N contiguous


class UnpackedLinear(NamedTuple):
    """The quantizer contract recovered from checkpoint tensors (scales/zeros are fp32 [N, G])."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor | None
    bits: int
    group_size: int


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def codes_per_word(bits: int) -> int:
    """P = 32 // bits codes per int32 word (3-bit: 10, wasting the top 2 bits)."""
    _check_bits(bits)
    return 32 // bits


def packed_rows(in_features: int, bits: int) -> int:
    """Rows of ``qweight``: ceil(K / P)."""
    return -(-in_features // codes_per_word(bits))


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / g)."""
    return -(-in_features // group_size)


def normalize_group_size(group_size: int, in_features: int) -> int:
    """g <= 0 (per-channel in the quantizer's config) means one group spanning all K columns."""
    return in_features if group_size <= 0 else int(group_size)


def group_index(in_features: int, group_size: int, g_idx: Tensor | None = None, device=None) -> Tensor:
    """Group of each input column, int64 [K]: ``g_idx`` if given, else ``k // g`` (g <= 0: one group)."""
    if g_idx is not None:
        return g_idx.to(torch.int64)
    return torch.arange(in_features, device=device) // normalize_group_size(group_size, in_features)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack codes uint8 [N, K] into int32 [ceil(K/P), N] (``PackFormat.INT32_KPACKED``)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (uint8), got {codes.dtype}")
    P = codes_per_word(bits)
    N, K = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range 0..{(1 << bits) - 1} for {bits}-bit")
    Kw = packed_rows(K, bits)
    c = torch.nn.functional.pad(c, (0, Kw * P - K))  # [N, Kw*P]
    shifts = torch.arange(P, device=c.device, dtype=torch.int64) * bits
    words = (c.view(N, Kw, P) << shifts).sum(dim=-1)  # [N, Kw], each < 2**32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement into int32 range
    return words.t().to(torch.int32).contiguous()


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of ``pack_codes``: int32 [ceil(K/P), N] -> uint8 [N, K]."""
    P = codes_per_word(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be int32 [ceil(K/P), N], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packed_rows(in_features, bits):
        raise ValueError(
            f"packed has {packed.shape[0]} rows, expected ceil({in_features}/{P}) = {packed_rows(in_features, bits)}"
        )
    w = packed.to(torch.int64) & 0xFFFFFFFF  # [Kw, N]
    shifts = torch.arange(P, device=w.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(1) >> shifts.view(1, P, 1)) & ((1 << bits) - 1)  # [Kw, P, N]
    c = c.reshape(-1, w.shape[1])[:in_features]  # [K, N]
    return c.t().to(torch.uint8).contiguous()


def round_scales_fp16(scales: Tensor) -> Tensor:
    """The scales a checkpoint actually stores, as fp32: ``scales.half().float()``.

    Build the fake-quantized weight from these so that it equals the unpacked weight exactly.
    """
    return scales.to(SCALE_DTYPE).to(torch.float32)


def dequantize_reference(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    g_idx: Tensor | None = None,
) -> Tensor:
    """W_hat fp32 [N, K] = scales[n, grp(k)] * (codes[n, k] - zeros[n, grp(k)]), computed in fp32.

    ``scales``/``zeros`` are [N, G] (any float dtype; fp16 values are exact in fp32). With fp16-representable
    scales and integer zeros the result is exact and order-independent (see the module docstring).
    """
    K = codes.shape[1]
    g = normalize_group_size(group_size, K)
    grp = group_index(K, g, g_idx, device=codes.device)
    s = scales.to(torch.float32)[:, grp]
    z = zeros.to(torch.float32)[:, grp]
    return s * (codes.to(torch.float32) - z)


def _validate_contract(
    codes: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, g_idx: Tensor | None
) -> int:
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got {tuple(codes.shape)}")
    N, K = codes.shape
    g = normalize_group_size(group_size, K)
    G = num_groups(K, g)
    if g_idx is not None:
        if g_idx.shape != (K,):
            raise ValueError(f"g_idx must have shape [{K}], got {tuple(g_idx.shape)}")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
            raise ValueError(f"g_idx values must lie in 0..{G - 1}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{name} must have shape [N={N}, G={G}] (K={K}, g={g}), got {tuple(t.shape)}")
    return g


def pack_quantized_linear(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    g_idx: Tensor | None = None,
) -> dict[str, Tensor]:
    """Checkpoint tensors for one quantized Linear (names = ``QuantLinear`` buffer names).

    Returns ``{"qweight", "scales", "zeros", "qmeta"}`` (+ ``"g_idx"`` if given); see the module docstring.
    Scales are rounded to fp16 here; raises if a scale overflows fp16 or a zero is not an fp16-exact integer.
    """
    g = _validate_contract(codes, scales, zeros, bits, group_size, g_idx)
    K = codes.shape[1]
    scales16 = scales.to(SCALE_DTYPE)
    if not bool(torch.isfinite(scales16).all()):
        raise ValueError("scales are not finite in fp16 (|scale| > 65504 or NaN)")
    zf = zeros.to(torch.float32)
    if not bool((zf == torch.round(zf)).all()) or bool((zf.abs() > FP16_MAX_EXACT_INT).any()):
        raise ValueError(f"zeros must be integers with |z| <= {FP16_MAX_EXACT_INT} (exact in fp16)")
    out = {
        "qweight": pack_codes(codes, bits),
        "scales": scales16.t().contiguous(),
        "zeros": zf.to(SCALE_DTYPE).t().contiguous(),
        "qmeta": torch.tensor([FORMAT_VERSION, bits, g, K], dtype=torch.int32),
    }
    if g_idx is not None:
        out["g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def read_qmeta(qmeta: Tensor) -> tuple[int, int, int]:
    """(bits, group_size, in_features) from a ``qmeta`` tensor; checks the format version."""
    version, bits, g, K = (int(v) for v in qmeta.tolist())
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported packing format version {version} (this code reads {FORMAT_VERSION})")
    _check_bits(bits)
    return bits, g, K


def unpack_quantized_linear(tensors: dict[str, Tensor]) -> UnpackedLinear:
    """Inverse of ``pack_quantized_linear``: (codes uint8 [N,K], scales fp32 [N,G], zeros fp32 [N,G], g_idx,
    bits, group_size). Scales come back as the fp16-rounded values (``round_scales_fp16``)."""
    bits, g, K = read_qmeta(tensors["qmeta"])
    codes = unpack_codes(tensors["qweight"], bits, K)
    g_idx = tensors.get("g_idx")
    return UnpackedLinear(
        codes=codes,
        scales=tensors["scales"].t().to(torch.float32).contiguous(),
        zeros=tensors["zeros"].t().to(torch.float32).contiguous(),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
        bits=bits,
        group_size=g,
    )


def packed_nbytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of qweight + fp16 scales + fp16 zeros (the roofline's weight traffic)."""
    G = num_groups(in_features, normalize_group_size(group_size, in_features))
    return 4 * packed_rows(in_features, bits) * out_features + 4 * G * out_features
