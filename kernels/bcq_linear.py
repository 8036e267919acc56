"""GPTQT merged binary-coding layout and its torch reference module ``BCQLinear`` (ALGORITHMS.md §7).

Checkpoint tensors of one binary-coded linear [N = out, K = in], k bit-planes (``pack_bcq``)::

    planes   int32 [k, ceil(K/32), N]   bit-plane B_i packed along K: bit j of word w, column n is B_i[n, 32w + j]
                                        (1 ⇔ b = +1); N contiguous, like ``kernels.packing`` INT32_KPACKED
    alpha    fp16  [k, G, N]            α'_i = s·α_i per (row, group)
    beta     fp16  [G, N]               β' = s·(β − z)
    bcqmeta  int32 [4]                  (format version, k, group_size, K)

ŵ[n, j] = Σ_i α'_i[g(j), n] · (2·B_i[n, j] − 1) + β'[g(j), n] — what a LUT-GEMM kernel computes as
Σ_i α'_i ⊙ (B_i x). The quantize stage rounds α', β' to fp16 before it records the layer, so unpacking gives back
the exact ``quant.gptqt.BinaryCodedWeight`` and the module's weight equals the fake-quantized weight bit for bit.

``BCQLinear.forward`` runs the Triton kernel ``kernels.bcq.launch.bcq_gemm`` on CUDA (straight from the planes,
no dequantized weight in memory) and the reference elsewhere (dispatch rules in ``kernels.coded_module``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.coded_module import CodedLinear
from kernels.layout_base import PackedLayout, TransformSeed
from kernels.packing import SCALE_DTYPE
from quant.gptqt import BinaryCodedWeight
from quant.icquant import pack_bits

__all__ = [
    "BCQ_FORMAT_VERSION",
    "BCQ_KEYS",
    "BCQLayer",
    "BCQLayout",
    "BCQLinear",
    "pack_bcq",
    "round_bcq_fp16",
    "unpack_bcq",
]

BCQ_FORMAT_VERSION = 1
BCQ_KEYS = ("planes", "alpha", "beta", "bcqmeta")
_FP16 = ("alpha", "beta")


def round_bcq_fp16(w: BinaryCodedWeight) -> BinaryCodedWeight:
    """α', β' rounded to the fp16 values the checkpoint stores (apply before recording the fake weight)."""
    alpha, beta = w.alpha.to(SCALE_DTYPE), w.beta.to(SCALE_DTYPE)
    if not (bool(torch.isfinite(alpha).all()) and bool(torch.isfinite(beta).all())):
        raise ValueError("binary-coding scales α', β' overflow fp16")
    return BinaryCodedWeight(w.planes, alpha.float(), beta.float(), w.in_features, w.group_size)


def _pack_planes(bits: Tensor) -> Tensor:
    """bool [k, N, K] → int32 [k, ceil(K/32), N]."""
    k, N, K = bits.shape
    Kw = math.ceil(K / 32)
    b = F.pad(bits.to(torch.int64), (0, Kw * 32 - K)).reshape(k, N, Kw, 32)
    words = (b << torch.arange(32, device=bits.device)).sum(-1)  # < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.transpose(1, 2).to(torch.int32).contiguous()


def _unpack_planes(planes: Tensor, K: int) -> Tensor:
    """int32 [k, ceil(K/32), N] → bool [k, N, K]."""
    w = planes.to(torch.int64) & 0xFFFFFFFF  # [k, Kw, N]
    bits = (w.unsqueeze(-1) >> torch.arange(32, device=planes.device)) & 1  # [k, Kw, N, 32]
    return bits.permute(0, 2, 1, 3).reshape(planes.shape[0], planes.shape[2], -1)[:, :, :K].bool()


def pack_bcq(w: BinaryCodedWeight) -> dict[str, Tensor]:
    """Checkpoint tensors (module docstring); α', β' must already be fp16-exact (``round_bcq_fp16``)."""
    alpha, beta = w.alpha.to(SCALE_DTYPE), w.beta.to(SCALE_DTYPE)
    if not (torch.equal(alpha.float(), w.alpha) and torch.equal(beta.float(), w.beta)):
        raise ValueError("α', β' are not fp16-exact; round them with round_bcq_fp16 before recording the layer")
    k = w.planes.shape[0]
    return {
        "planes": _pack_planes(w.bit_planes()),
        "alpha": alpha.permute(2, 1, 0).contiguous(),  # [out, G, k] → [k, G, N]
        "beta": beta.t().contiguous(),
        "bcqmeta": torch.tensor([BCQ_FORMAT_VERSION, k, w.group_size, w.in_features], dtype=torch.int32),
    }


def unpack_bcq(t: dict[str, Tensor]) -> BinaryCodedWeight:
    """Inverse of ``pack_bcq``."""
    version, k, gs, K = (int(v) for v in t["bcqmeta"].tolist())
    if version != BCQ_FORMAT_VERSION:
        raise ValueError(f"unsupported binary-coding format version {version} (this code reads {BCQ_FORMAT_VERSION})")
    bits = _unpack_planes(t["planes"], K)  # [k, N, K]
    if bits.shape[0] != k:
        raise ValueError(f"planes hold {bits.shape[0]} bit-planes, bcqmeta says {k}")
    N = bits.shape[1]
    nb = math.ceil(K / 8)
    planes = pack_bits(F.pad(bits.to(torch.uint8), (0, nb * 8 - K)).reshape(-1), 1).reshape(k, N, nb)
    alpha = t["alpha"].to(torch.float32).permute(2, 1, 0).contiguous()
    beta = t["beta"].to(torch.float32).t().contiguous()
    return BinaryCodedWeight(planes, alpha, beta, K, gs)


class BCQLinear(CodedLinear):
    """y = F.linear(x, Ŵ, bias) with Ŵ = Σ_i α'_i B_i + β' (CUDA: Triton kernel; CPU: dequantize, then matmul)."""

    KEYS = BCQ_KEYS
    FP16_KEYS = _FP16  # keep the fp16 α', β' exact under model.to(dtype)
    LAYOUT = "binary-coded"

    planes: Tensor
    alpha: Tensor
    beta: Tensor
    bcqmeta: Tensor

    _unpack = staticmethod(unpack_bcq)

    @staticmethod
    def _shape(w: BinaryCodedWeight) -> tuple[int, int, int]:
        return int(w.planes.shape[1]), w.in_features, int(w.planes.shape[0])

    def _group_size(self) -> int:
        """Group size from ``bcqmeta``, read on the host once per buffer (no device sync per forward)."""
        return self._cached("group_size", ("bcqmeta",), lambda: int(self.bcqmeta[2]))

    def _kernel_reason(self, x: Tensor) -> str | None:
        from kernels.bcq.launch import kernel_unsupported_reason

        return kernel_unsupported_reason(x, self.planes, self.alpha, self.beta)

    def _kernel_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        from kernels.bcq.launch import bcq_gemm

        return bcq_gemm(x, self.planes, self.alpha, self.beta, self._group_size(), self.in_features, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, binary_bits={self.bits}"


@dataclass(frozen=True, eq=False)
class BCQLayer:
    """A GPTQT layer: the merged binary-coded weight (α', β' fp16-exact) and its deterministic stats."""

    weight: BinaryCodedWeight
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.weight.planes.shape[0])


class BCQLayout(PackedLayout):
    """GPTQT's merged binary coding: no serving format has bit-planes with per-plane scales."""

    name = "bcq"
    module = BCQLinear
    weight_type = BCQLayer
    parts: ClassVar[Mapping[str, str]] = {"planes": "codes", "alpha": "grids", "beta": "grids"}
    no_export = "GPTQT binary coding (bit-planes + α') has no {fmt} representation"

    meta_key, keys = "bcqmeta", BCQ_KEYS

    def pack(self, q: BCQLayer, transform_seed: TransformSeed | None = None) -> dict[str, Tensor]:
        return pack_bcq(q.weight)

    def unpack(self, tensors: Mapping[str, Tensor], stats: dict[str, float] | None = None) -> BCQLayer:
        return BCQLayer(unpack_bcq(dict(tensors)), dict(stats or {}))

    def dequantize(self, q: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        return q.weight.dequantize(torch.float32).to(dtype)  # type: ignore[no-any-return]

    def shape(self, q: BCQLayer) -> tuple[int, int]:
        return int(q.weight.alpha.shape[0]), q.weight.in_features
