"""llama.cpp's legacy block types, encoded from quantizer codes and grids as they are (never re-quantized).

A ggml row of K weights is K/32 consecutive blocks (little-endian, packed structs, ``ggml-common.h``)::

    Q4_0  18 bytes  fp16 d, uint8 qs[16]          x[j] = d·(q[j] − 8)
    Q4_1  20 bytes  fp16 d, fp16 m, uint8 qs[16]  x[j] = d·q[j] + m
    Q8_0  34 bytes  fp16 d, int8 qs[32]           x[j] = d·qs[j]

with the 4-bit codes of a block split in halves: ``qs[j] = q[j] | q[j + 16] << 4`` (j < 16).

Our grid is ŵ = s·(q − z), one (s, z) per row and group of 32 input columns, s fp16-exact. It maps:

* W4 g32 symmetric (z = 8) → Q4_0 with d = s, codes as they are;
* W4 g32 asymmetric → Q4_1 with d = s, m = −s·z. Exact iff −s·z is an fp16 number; then ``d·q + m`` equals
  s·(q − z) in fp32 (both products are exact and their difference is representable). ``quant.grid``'s
  ``float16_min`` scales (recipe ``quantize.fp16_min``) guarantee it; other grids are refused, never rounded;
* W8 g32 symmetric (z = 128) → Q8_0 with d = s, qs = q − 128.

Other grids have no llama.cpp legacy type (k-quants use 256-weight super-blocks with 6-bit sub-scales).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["BLOCK", "GGML_TYPES", "encode_rows", "ggml_type_for", "grid_reason", "mapping_text"]

BLOCK = 32
# (bits, sym) at group 32 → ggml type name; the one-line refusal names this table
GGML_TYPES: dict[tuple[int, bool], str] = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def mapping_text() -> str:
    """The grids that map, for one-line refusals."""
    return "W4 g32 asym → Q4_1, W4 g32 sym → Q4_0, W8 g32 sym → Q8_0"


def ggml_type_for(bits: int, group_size: int, sym: bool) -> str | None:
    """The ggml type holding this grid exactly, None if llama.cpp has none."""
    if group_size != BLOCK:
        return None
    return GGML_TYPES.get((bits, sym))


def grid_reason(name: str, qtype: str, scales: Tensor, zeros: Tensor, in_features: int) -> str | None:
    """None when this layer's grids encode exactly as ``qtype``, else why not (one line)."""
    if in_features % BLOCK:
        return f"{name}: {in_features} columns are not whole {BLOCK}-weight blocks"
    if not torch.equal(scales.to(torch.float16).to(torch.float32), scales):
        return f"{name}: scales are not fp16-exact"
    if qtype in ("Q4_0", "Q8_0"):
        mid = 8 if qtype == "Q4_0" else 128
        if not bool((zeros == mid).all()):
            return f"{name}: {qtype} needs the symmetric zero point {mid} in every group"
        return None
    m = -scales * zeros
    inexact = int((m.to(torch.float16).to(torch.float32) != m).sum())
    if inexact:
        return (
            f"{name}: {inexact} of {m.numel()} groups have a minimum −scale·zero that fp16 cannot hold, so Q4_1 "
            "would change the weights; quantize with quantize.fp16_min: true (recipe gptq-w4g32)"
        )
    return None


def _fp16_bytes(x: Tensor) -> Tensor:
    """[..., 2] uint8: little-endian fp16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def encode_rows(qtype: str, codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """uint8 [N, K/32 · block bytes]: the ggml rows of one weight. ``codes`` uint8 [N, K]; ``scales``/``zeros``
    float32 [N, K/32]. Checks exactness (``grid_reason``) and raises ValueError when the grid does not map."""
    if sys.byteorder != "little":
        raise ValueError("ggml blocks are written on little-endian hosts only")
    n, k = codes.shape
    reason = grid_reason("weight", qtype, scales, zeros, k)
    if reason is not None:
        raise ValueError(reason)
    nb = k // BLOCK
    q = codes.reshape(n, nb, BLOCK)
    d = _fp16_bytes(scales)  # [n, nb, 2]
    if qtype == "Q8_0":
        qs = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        blocks = torch.cat([d, qs], dim=-1)
    else:
        nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        parts = [d] if qtype == "Q4_0" else [d, _fp16_bytes(-scales * zeros)]
        blocks = torch.cat([*parts, nibbles], dim=-1)
    if blocks.shape[-1] != _BYTES[qtype]:
        raise AssertionError(f"{qtype} block of {blocks.shape[-1]} bytes")
    return blocks.reshape(n, nb * _BYTES[qtype]).contiguous()
