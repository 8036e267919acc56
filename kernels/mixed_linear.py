"""Group-wise mixed-precision layout and ``MixedQuantLinear`` (``quant.mixed``, ALGORITHMS.md §8 per group).

Checkpoint tensors of one mixed linear [N = out, K = in] (``pack_mixed``)::

    group_bits   int32 [G]      width of each contiguous group of ``group_size`` input columns
    b{w}_<name>                 for every width w present: the ``kernels.packing.pack_quantized_linear`` tensors
                                (qweight, scales, zeros, qmeta) of the [N, K_w] matrix of the w-bit groups' columns

The columns of width w are the groups with ``group_bits == w`` in ascending order, so each part keeps contiguous
groups and its own packed layout is the plain one: every part runs on the ordinary low-bit GEMM (Triton on CUDA,
torch elsewhere, through ``QuantLinear``) and y = Σ_w Ŵ_w x[..., cols_w] + bias. The gather of x's columns is
the only extra work; each weight byte is still read once.
"""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import Tensor, nn

from kernels.layout_base import PackedLayout
from kernels.packing import pack_quantized_linear, unpack_quantized_linear
from kernels.quant_linear import AFFINE_KEYS, AffineLayout, QuantLinear, check_input
from quant.mixed import MixedWeight, group_columns
from quant.types import QuantizedWeight

__all__ = ["MIXED_KEY", "MixedLayout", "MixedQuantLinear", "is_mixed", "pack_mixed", "part_key", "unpack_mixed"]

MIXED_KEY = "group_bits"
_PART = re.compile(r"^b(\d+)_(.+)$")


def part_key(name: str) -> str:
    """The plain packed-tensor name inside a mixed layout ("b3_qweight" → "qweight"); others unchanged."""
    m = _PART.match(name)
    return m.group(2) if m else name


def is_mixed(tensors: dict[str, Tensor]) -> bool:
    return MIXED_KEY in tensors


def pack_mixed(w: MixedWeight) -> dict[str, Tensor]:
    """Checkpoint tensors (module docstring); scales/zeros round to fp16 as in ``pack_quantized_linear``."""
    out = {MIXED_KEY: w.group_bits.to(torch.int32).cpu().contiguous()}
    for b, p in sorted(w.parts.items()):
        for k, t in pack_quantized_linear(p.codes, p.scales, p.zeros, b, p.group_size).items():
            out[f"b{b}_{k}"] = t
    return out


def _parts(tensors: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    parts: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = _PART.match(name)
        if m:
            parts.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return parts


def unpack_mixed(tensors: dict[str, Tensor]) -> MixedWeight:
    """Inverse of ``pack_mixed`` (exact: the parts' grids are fp16-exact by construction of the quantize stage)."""
    gb = tensors[MIXED_KEY].to(torch.int64)
    parts = {}
    K = 0
    gs = 0
    for b, t in sorted(_parts(tensors).items()):
        u = unpack_quantized_linear(t)
        parts[b] = QuantizedWeight(
            codes=u.codes, scales=u.scales, zeros=u.zeros, bits=u.bits, group_size=u.group_size, g_idx=None
        )
        gs = u.group_size
        K += u.codes.shape[1]
    return MixedWeight(gb, gs, K, parts)


class MixedQuantLinear(nn.Module):
    """A linear whose column groups have different widths: one ``QuantLinear`` per width over its columns."""

    def __init__(self, parts: dict[int, QuantLinear], group_bits: Tensor, group_size: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = sum(p.in_features for p in parts.values())
        self.out_features = next(iter(parts.values())).out_features
        self.group_size = group_size
        self.widths = sorted(parts)
        self.parts = nn.ModuleDict({f"b{b}": parts[b] for b in self.widths})
        self.register_buffer(MIXED_KEY, group_bits.to(torch.int32))
        dev = next(iter(parts.values())).qweight.device
        for b in self.widths:
            cols = group_columns(group_bits.to(torch.int64), group_size, self.in_features, b).to(dev)
            self.register_buffer(f"cols_b{b}", cols, persistent=False)
        self.register_buffer("bias", bias)

    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> MixedQuantLinear:
        b = tensors.get("bias", bias)
        parts = {w: QuantLinear.from_packed(t) for w, t in sorted(_parts(tensors).items())}
        if not parts:
            raise ValueError("a mixed-precision layer needs at least one b<bits>_qweight part")
        gs = next(iter(parts.values())).group_size
        return cls(parts, tensors[MIXED_KEY], gs, b.detach() if b is not None else None)

    def part(self, bits: int) -> QuantLinear:
        return cast(QuantLinear, self.parts[f"b{bits}"])

    def columns(self, bits: int) -> Tensor:
        return cast(Tensor, getattr(self, f"cols_b{bits}"))

    @property
    def bits(self) -> float:
        """Average code bits per weight (what the layer stores, grids aside)."""
        return sum(b * self.part(b).in_features for b in self.widths) / self.in_features

    def packed_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {MIXED_KEY: cast(Tensor, getattr(self, MIXED_KEY))}
        for b in self.widths:
            for k, t in self.part(b).packed_tensors().items():
                if k != "bias":
                    out[f"b{b}_{k}"] = t
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        dev = self.columns(self.widths[0]).device
        W = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=dev)
        for b in self.widths:
            W[:, self.columns(b)] = self.part(b).dequantized_weight(torch.float32)
        return W.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, widths={self.widths}, "
            f"avg_bits={self.bits:.3f}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_features)
        y: Any = None
        for b in self.widths:
            part = self.part(b)(x.index_select(-1, self.columns(b)))
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias.to(y.dtype)


class MixedLayout(PackedLayout):
    """Group-wise mixed precision: one int-packed part per width; a serving format has one width per layer."""

    name = "mixed"
    module = MixedQuantLinear
    weight_type = MixedWeight
    no_export = "mixed per-layer bit-widths have no single {fmt} scheme"

    meta_key = MIXED_KEY
    pack_fn, unpack_fn = staticmethod(pack_mixed), staticmethod(unpack_mixed)

    def owns_key(self, key: str) -> bool:
        return key == MIXED_KEY or (_PART.match(key) is not None and part_key(key) in AFFINE_KEYS)

    def bits(self, q: MixedWeight) -> float:
        return q.avg_bits

    def part(self, key: str) -> str:
        return AffineLayout.parts.get(part_key(key), "other")  # "b3_qweight" counts as codes
