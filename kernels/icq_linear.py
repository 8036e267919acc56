"""ICQuant packed layout and its torch reference module ``ICQuantLinear`` (ALGORITHMS.md §6).

Checkpoint tensors of one ICQuant linear [N = out, K = in] (``pack_icquant``)::

    qweight      int32 [ceil(K/P), N]  codes, ``kernels.packing`` INT32_KPACKED (P = 32 // bits)
    scales       fp16  [G, N]          inlier grid scale      zeros   fp16 [G, N]  inlier zero (integer)
    oscales      fp16  [G, N]          outlier grid scale     ozeros  fp16 [G, N]  outlier zero (integer)
    pos_data     uint8 [ceil(C·B/8)]   index-coded outlier positions, B-bit gap/escape codes LSB-first
    pos_offsets  int32 [N·S + 1]       first code of each row segment (S segments per row): rows and
                                       segments decode independently (prefix sum of gaps inside a segment)
    icqmeta      int32 [7]             (format version, bits, group_size, K, B, segment length, sym)

ŵ[n, k] = s_sel · (code − z_sel), (s_sel, z_sel) the outlier grid where the decoded bitmap is set, else the
inlier grid. The quantizer's grids are fp16-rounded before coding, so ``unpack_icquant`` gives back the exact
``quant.icquant.ICQuantWeight`` and the module's weight equals the fake-quantized weight bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.packing import SCALE_DTYPE, pack_codes, unpack_codes
from quant.icquant import ICQuantWeight, IndexStream

__all__ = ["ICQ_FORMAT_VERSION", "ICQ_KEYS", "ICQuantLinear", "pack_icquant", "unpack_icquant"]

ICQ_FORMAT_VERSION = 1
ICQ_KEYS = ("qweight", "scales", "zeros", "oscales", "ozeros", "pos_data", "pos_offsets", "icqmeta")
_GRIDS = ("scales", "zeros", "oscales", "ozeros")


def _fp16_exact(t: Tensor, what: str) -> Tensor:
    h = t.to(SCALE_DTYPE)
    if not torch.equal(h.to(torch.float32), t.to(torch.float32)):
        raise ValueError(f"{what} are not fp16-exact; quantize with fp16 scales so packing is lossless")
    return h.t().contiguous()


def pack_icquant(w: ICQuantWeight) -> dict[str, Tensor]:
    """Checkpoint tensors (see the module docstring); raises if a grid is not exactly representable."""
    p = w.positions
    return {
        "qweight": pack_codes(w.codes, w.bits),
        "scales": _fp16_exact(w.inlier_scales, "inlier scales"),
        "zeros": _fp16_exact(w.inlier_zeros, "inlier zeros"),
        "oscales": _fp16_exact(w.outlier_scales, "outlier scales"),
        "ozeros": _fp16_exact(w.outlier_zeros, "outlier zeros"),
        "pos_data": p.data.to(torch.uint8).contiguous(),
        "pos_offsets": p.offsets.to(torch.int32).contiguous(),
        "icqmeta": torch.tensor(
            [ICQ_FORMAT_VERSION, w.bits, w.group_size, p.cols, p.index_bits, p.segment, int(w.sym)], dtype=torch.int32
        ),
    }


def unpack_icquant(t: dict[str, Tensor]) -> ICQuantWeight:
    """Inverse of ``pack_icquant`` (scale width 16 bits)."""
    version, bits, gs, K, B, seg, sym = (int(v) for v in t["icqmeta"].tolist())
    if version != ICQ_FORMAT_VERSION:
        raise ValueError(f"unsupported ICQuant format version {version} (this code reads {ICQ_FORMAT_VERSION})")
    codes = unpack_codes(t["qweight"], bits, K)
    N = codes.shape[0]
    s_in, z_in, s_out, z_out = (t[k].t().to(torch.float32).contiguous() for k in _GRIDS)
    stream = IndexStream(t["pos_data"], t["pos_offsets"], B, N, K, seg)
    return ICQuantWeight(codes, s_in, z_in, s_out, z_out, stream, bits, gs, scale_bits=16, sym=bool(sym))


class ICQuantLinear(nn.Module):
    """y = F.linear(x, Ŵ, bias), Ŵ dequantized on the fly (CPU reference: decode positions, pick grids, matmul)."""

    def __init__(self, tensors: dict[str, Tensor], bias: Tensor | None = None) -> None:
        super().__init__()
        missing = [k for k in ICQ_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"ICQuant packed tensors missing {missing}")
        for k in ICQ_KEYS:
            self.register_buffer(k, tensors[k].detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        w = self.unpacked()  # validates the layout now, not at the first forward
        self.out_features, self.in_features, self.bits = w.codes.shape[0], w.codes.shape[1], w.bits

    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> ICQuantLinear:
        return cls(tensors, tensors.get("bias", bias))

    def unpacked(self) -> ICQuantWeight:
        return unpack_icquant({k: self._buffers[k] for k in ICQ_KEYS})  # type: ignore[misc]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.unpacked().dequantize(torch.float32).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, icquant"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
        b = self._buffers.get("bias")
        return F.linear(x, self.dequantized_weight(x.dtype), None if b is None else b.to(x.dtype))

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # model.to(dtype) must not round the fp16 grids: an int16 view only moves device (as QuantLinear)
        for name in _GRIDS:
            self._buffers[name] = self._buffers[name].view(torch.int16)  # type: ignore[union-attr]
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in _GRIDS:
                self._buffers[name] = self._buffers[name].view(SCALE_DTYPE)  # type: ignore[union-attr]
