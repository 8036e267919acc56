"""ggml block bytes of :class:`quant.kquant.KQuantWeight`: k-quants and the legacy 32-weight types, both ways.

Layouts follow ``ggml-common.h`` (packed little-endian structs, one row = C/block consecutive blocks)::

    block_q2_K   84 B  scales[16] (lo nibble sc, hi nibble m) · qs[64] · d · dmin
    block_q3_K  110 B  hmask[32] · qs[64] · scales[12] (16 × 6 bit) · d
    block_q4_K  144 B  d · dmin · scales[12] (8 sc + 8 m, 6 bit) · qs[128]
    block_q5_K  176 B  d · dmin · scales[12] · qh[32] · qs[128]
    block_q6_K  210 B  ql[128] · qh[64] · scales[16] (int8) · d
    block_q4_0   18 B  d · qs[16];   block_q4_1  20 B  d · m · qs[16]
    block_q5_0   22 B  d · qh[4] · qs[16];   block_q5_1  24 B  d · m · qh[4] · qs[16];   block_q8_0  34 B  d · qs[32]

Code placement inside a super-block (element e of 256):

* 2-bit planes (Q2_K qs, Q3_K low bits, Q6_K high bits): byte ``h·32 + l`` holds e = h·128 + t·32 + l at bits 2t;
* Q3_K hmask / Q5_K qh: byte l holds e = i·32 + l at bit i;
* nibbles (Q4_K/Q5_K qs): byte ``c·32 + l`` holds e = c·64 + l (low) and c·64 + 32 + l (high);
  Q6_K ql: byte ``h·64 + l`` holds e = h·128 + l (low) and h·128 + 64 + l (high);
* legacy blocks of 32: byte j holds e = j (low) and j + 16 (high); qh bit j is e = j's fifth bit;
* 6-bit scales of Q4_K/Q5_K (``get_scale_min_k4``): j < 4: sc = s[j] & 63, m = s[j+4] & 63; j ≥ 4:
  sc = s[j+4] & 15 | (s[j−4] >> 6) << 4, m = s[j+4] >> 4 | (s[j] >> 6) << 4;
* Q3_K scales: sub-block k's low nibble is s[k] (k < 8) or s[k−8] >> 4, its high 2 bits s[8 + k%4] >> 2·(k//4).

The decoder here (:func:`decode_rows`) is the packer's inverse; the independent reader in tests is the ``gguf``
package's ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from quant.kquant import KSPECS, KQuantWeight

__all__ = ["decode_rows", "encode_rows", "row_bytes"]


def row_bytes(qtype: str, cols: int) -> int:
    spec = KSPECS[qtype]
    return cols // spec.block * spec.nbytes


def _h(x: Tensor) -> Tensor:
    """[..., 2] uint8 little-endian fp16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _u8(x: Tensor) -> Tensor:
    return (x.to(torch.int32) & 0xFF).to(torch.uint8)


def _planes2(q: Tensor) -> Tensor:
    """[N, 256] 2-bit values → [N, 64] bytes (byte h·32 + l: e = h·128 + t·32 + l at bits 2t)."""
    n = q.shape[0]
    v = q.to(torch.int32).reshape(n, 2, 4, 32)
    out = v[:, :, 0] | v[:, :, 1] << 2 | v[:, :, 2] << 4 | v[:, :, 3] << 6
    return _u8(out.reshape(n, 64))


def _unplanes2(b: Tensor) -> Tensor:
    n = b.shape[0]
    v = b.to(torch.int32).reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)
    return (v & 3).reshape(n, 256)


def _bits8(q: Tensor) -> Tensor:
    """[N, 256] single bits → [N, 32] bytes (byte l: e = i·32 + l at bit i)."""
    n = q.shape[0]
    v = q.to(torch.int32).reshape(n, 8, 32) << torch.arange(8).reshape(1, 8, 1)
    return _u8(v.sum(1))


def _unbits8(b: Tensor) -> Tensor:
    n = b.shape[0]
    v = b.to(torch.int32).reshape(n, 1, 32) >> torch.arange(8).reshape(1, 8, 1)
    return (v & 1).reshape(n, 256)


def _nib64(q: Tensor, span: int) -> Tensor:
    """[N, E] nibbles → [N, E/2] bytes: byte c·span + l holds e = c·2span + l (low), c·2span + span + l (high)."""
    n, e = q.shape
    v = q.to(torch.int32).reshape(n, e // (2 * span), 2, span)
    return _u8((v[:, :, 0] & 15) | (v[:, :, 1] & 15) << 4).reshape(n, e // 2)


def _unnib64(b: Tensor, span: int) -> Tensor:
    n, half = b.shape
    v = b.to(torch.int32).reshape(n, half // span, 1, span) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)
    return (v & 15).reshape(n, half * 2)


def _k4_scales(sc: Tensor, m: Tensor) -> Tensor:
    """[N, 8] 6-bit scales and mins → [N, 12] bytes (``get_scale_min_k4``'s inverse)."""
    s, mm = sc.to(torch.int32), m.to(torch.int32)
    lo = s[:, :4] | (s[:, 4:] >> 4) << 6
    mid = mm[:, :4] | (mm[:, 4:] >> 4) << 6
    hi = (s[:, 4:] & 15) | (mm[:, 4:] & 15) << 4
    return _u8(torch.cat([lo, mid, hi], 1))


def _k4_unscales(b: Tensor) -> tuple[Tensor, Tensor]:
    v = b.to(torch.int32)
    d, mm, md = v[:, 0:4], v[:, 4:8], v[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | (d >> 6) << 4], 1)
    m = torch.cat([mm & 63, (md >> 4) | (mm >> 6) << 4], 1)
    return sc, m


def _q3_scales(sc: Tensor) -> Tensor:
    """[N, 16] 6-bit → [N, 12] bytes."""
    s = sc.to(torch.int32)
    low = (s[:, :8] & 15) | (s[:, 8:] & 15) << 4
    h = (s >> 4) & 3  # [N, 16], sub-block k → byte 8 + k%4, shift 2·(k//4)
    high = h[:, 0:4] | h[:, 4:8] << 2 | h[:, 8:12] << 4 | h[:, 12:16] << 6
    return _u8(torch.cat([low, high], 1))


def _q3_unscales(b: Tensor) -> Tensor:
    v = b.to(torch.int32)
    low = torch.cat([v[:, :8] & 15, v[:, :8] >> 4], 1)
    high = (v[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6]).reshape(1, 4, 1)) & 3
    return low | high.reshape(-1, 16) << 4


def _check(kw: KQuantWeight) -> None:
    spec = kw.spec
    c = kw.shape[1]
    if c % spec.block:
        raise ValueError(f"{kw.qtype} rows need whole {spec.block}-weight blocks, got {c} columns")
    if kw.codes.numel() and int(kw.codes.max()) > spec.umax:
        raise ValueError(f"{kw.qtype} codes exceed {spec.umax}")
    if spec.scale_bits:
        lo, hi = (-128, 127) if kw.qtype == "Q6_K" else (0, (1 << spec.scale_bits) - 1)
        for name, t in (("sc", kw.sc), ("m", kw.m)):
            if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
                raise ValueError(f"{kw.qtype} {name} outside [{lo}, {hi}]")


def encode_rows(kw: KQuantWeight) -> Tensor:
    """uint8 [R, row_bytes]: the ggml rows of ``kw`` (exactly its fields; nothing is re-quantized)."""
    if sys.byteorder != "little":
        raise ValueError("ggml blocks are written on little-endian hosts only")
    _check(kw)
    spec = kw.spec
    r, c = kw.shape
    nb = c // spec.block
    n = r * nb
    q = kw.codes.reshape(n, spec.block).to(torch.int32)
    d = _h(kw.d.reshape(n))
    dmin = _h(kw.dmin.reshape(n))
    sc = kw.sc.reshape(n, spec.block // spec.sub)
    m = kw.m.reshape(n, spec.block // spec.sub)
    name = kw.qtype
    if name == "Q2_K":
        parts = [_u8((sc.to(torch.int32) & 15) | (m.to(torch.int32) & 15) << 4), _planes2(q), d, dmin]
    elif name == "Q3_K":
        parts = [_bits8(q >> 2), _planes2(q & 3), _q3_scales(sc), d]
    elif name == "Q4_K":
        parts = [d, dmin, _k4_scales(sc, m), _nib64(q, 32)]
    elif name == "Q5_K":
        parts = [d, dmin, _k4_scales(sc, m), _bits8(q >> 4), _nib64(q & 15, 32)]
    elif name == "Q6_K":
        parts = [_nib64(q & 15, 64), _planes2(q >> 4), _u8(sc), d]
    elif name in ("Q4_0", "Q4_1"):
        parts = [d, *([dmin] if name == "Q4_1" else []), _nib64(q, 16)]
    elif name in ("Q5_0", "Q5_1"):
        qh = ((q.to(torch.int64) >> 4) << torch.arange(32)).sum(1)
        qh_b = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], 1)
        parts = [d, *([dmin] if name == "Q5_1" else []), _u8(qh_b), _nib64(q & 15, 16)]
    elif name == "Q8_0":
        parts = [d, _u8(q - 128)]
    else:
        raise ValueError(f"no ggml encoder for {name}")
    blocks = torch.cat(parts, 1)
    if blocks.shape[1] != spec.nbytes:
        raise AssertionError(f"{name} block of {blocks.shape[1]} bytes, expected {spec.nbytes}")
    return blocks.reshape(r, nb * spec.nbytes).contiguous()


def decode_rows(qtype: str, data: Tensor, cols: int) -> KQuantWeight:
    """The fields of ggml rows ``data`` uint8 [R, row_bytes] of ``cols`` weights each (``encode_rows``'s inverse)."""
    spec = KSPECS[qtype]
    r = data.shape[0]
    nb = cols // spec.block
    n = r * nb
    b = data.reshape(n, spec.nbytes)

    def f16(lo: int) -> Tensor:
        return b[:, lo : lo + 2].contiguous().view(torch.float16).reshape(n)

    per = spec.block // spec.sub
    ones = torch.ones(n, per, dtype=torch.int32)
    zeros_h = torch.zeros(n, dtype=torch.float16)
    if qtype == "Q2_K":
        s = b[:, :16].to(torch.int32)
        sc, m, q, d, dmin = s & 15, s >> 4, _unplanes2(b[:, 16:80]), f16(80), f16(82)
    elif qtype == "Q3_K":
        q = _unbits8(b[:, :32]) << 2 | _unplanes2(b[:, 32:96])
        sc, d, dmin = _q3_unscales(b[:, 96:108]), f16(108), zeros_h
        m = torch.zeros_like(sc)
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = f16(0), f16(2)
        sc, m = _k4_unscales(b[:, 4:16])
        if qtype == "Q4_K":
            q = _unnib64(b[:, 16:144], 32)
        else:
            q = _unbits8(b[:, 16:48]) << 4 | _unnib64(b[:, 48:176], 32)
    elif qtype == "Q6_K":
        q = _unnib64(b[:, :128], 64) | _unplanes2(b[:, 128:192]) << 4
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int32)
        m, d, dmin = torch.zeros_like(sc), f16(208), zeros_h
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = f16(0)
        off = 4 if qtype in ("Q4_1", "Q5_1") else 2
        dmin = f16(2) if off == 4 else zeros_h
        if qtype == "Q8_0":
            q = b[:, 2:34].contiguous().view(torch.int8).to(torch.int32) + 128
        elif qtype in ("Q4_0", "Q4_1"):
            q = _unnib64(b[:, off : off + 16], 16)
        else:
            qh = b[:, off : off + 4].to(torch.int64) << torch.tensor([0, 8, 16, 24])
            qh = qh.sum(1)
            high = ((qh[:, None] >> torch.arange(32)) & 1).to(torch.int32)
            q = high << 4 | _unnib64(b[:, off + 4 : off + 20], 16)
        sc, m = ones, torch.zeros_like(ones)
    else:
        raise ValueError(f"no ggml decoder for {qtype}")
    return KQuantWeight(
        qtype,
        q.to(torch.uint8).reshape(r, cols),
        d.reshape(r, nb),
        dmin.reshape(r, nb),
        sc.to(torch.int16).reshape(r, nb * per),
        m.to(torch.int16).reshape(r, nb * per),
    )
