"""ICQuant packed layout and its torch reference module ``ICQuantLinear`` (ALGORITHMS.md §6).

Checkpoint tensors of one ICQuant linear [N = out, K = in] (``pack_icquant``)::

    qweight      int32 [ceil(K/P), N]  codes, ``kernels.packing`` INT32_KPACKED (P = 32 // bits)
    scales       fp16  [G, N]          inlier grid scale      zeros   fp16 [G, N]  inlier zero (integer)
    oscales      fp16  [G, N]          outlier grid scale     ozeros  fp16 [G, N]  outlier zero (integer)
    pos_data     uint8 [⌈n·B/8⌉ + ⌈U/8⌉]  index-coded outlier positions (``quant.icquant``): n B-bit gap
                                       remainders, then U escape/stop bits, each stream LSB-first
    pos_offsets  int32 [2, T + 1]      per tile of R rows × L columns (T tiles): outliers before it and escape
                                       bits before it, so tiles decode independently (one block per tile)
    icqmeta      int32 [8]             (format version, bits, group_size, K, B, tile width L, sym, tile rows R)

Format version 2 (tiles of R rows, 1-bit escapes); version 1 (per-row-segment offsets, B-bit escape codes)
is refused on read.

ŵ[n, k] = s_sel · (code − z_sel), (s_sel, z_sel) the outlier grid where the decoded bitmap is set, else the
inlier grid. The quantizer's grids are fp16-rounded before coding, so ``unpack_icquant`` gives back the exact
``quant.icquant.ICQuantWeight`` and the module's weight equals the fake-quantized weight bit for bit.

``ICQuantLinear.forward`` on CUDA chains two Triton kernels (``kernels.icq.launch``, why chained is explained
there): the tile-parallel decode of the position stream into a packed 1-bit outlier mask, run once per device
and cached on the module (not a buffer: the checkpoint keeps the compact stream), then the GEMM that selects
the grid per weight from the mask. Elsewhere the reference runs (dispatch rules in ``kernels.coded_module``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from kernels.coded_module import CodedLinear
from kernels.layout_base import PackedLayout
from kernels.packing import SCALE_DTYPE, pack_codes, unpack_codes
from quant.icquant import ICQuantWeight, IndexStream

__all__ = ["ICQ_FORMAT_VERSION", "ICQ_KEYS", "ICQuantLayout", "ICQuantLinear", "pack_icquant", "unpack_icquant"]

ICQ_FORMAT_VERSION = 2  # 2: tiles of R rows, 1-bit escapes, int32 [2, T + 1] table
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
            [ICQ_FORMAT_VERSION, w.bits, w.group_size, p.cols, p.index_bits, p.segment, int(w.sym), p.group_rows],
            dtype=torch.int32,
        ),
    }


def unpack_icquant(t: dict[str, Tensor]) -> ICQuantWeight:
    """Inverse of ``pack_icquant`` (scale width 16 bits)."""
    meta = [int(v) for v in t["icqmeta"].tolist()]
    if meta[0] != ICQ_FORMAT_VERSION or len(meta) != 8:
        raise ValueError(f"unsupported ICQuant format version {meta[0]} (this code reads {ICQ_FORMAT_VERSION})")
    _, bits, gs, K, B, seg, sym, rows_per_tile = meta
    codes = unpack_codes(t["qweight"], bits, K)
    N = codes.shape[0]
    s_in, z_in, s_out, z_out = (t[k].t().to(torch.float32).contiguous() for k in _GRIDS)
    stream = IndexStream(t["pos_data"], t["pos_offsets"], B, N, K, seg, rows_per_tile)
    return ICQuantWeight(codes, s_in, z_in, s_out, z_out, stream, bits, gs, scale_bits=16, sym=bool(sym))


class ICQuantLinear(CodedLinear):
    """y = F.linear(x, Ŵ, bias): CUDA, decode-once mask + Triton GEMM; CPU reference, decode, pick grids, matmul."""

    KEYS = ICQ_KEYS
    FP16_KEYS = _GRIDS
    LAYOUT = "ICQuant"

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    oscales: Tensor
    ozeros: Tensor
    pos_data: Tensor
    pos_offsets: Tensor
    icqmeta: Tensor

    _unpack = staticmethod(unpack_icquant)

    @staticmethod
    def _shape(w: ICQuantWeight) -> tuple[int, int, int]:
        return int(w.codes.shape[0]), int(w.codes.shape[1]), w.bits

    def _meta(self) -> tuple[int, ...]:
        """``icqmeta`` as host ints (version, bits, group_size, K, B, L, sym, R), read once per buffer."""
        return self._cached("meta", ("icqmeta",), lambda: tuple(int(v) for v in self.icqmeta.tolist()))

    def outlier_mask_words(self) -> Tensor:
        """Packed outlier mask int32 [ceil(K/32), N] (``kernels.bitwords``) decoded by the Triton kernel, cached
        until the stream buffers change; needs CUDA (or the interpreter), see ``_kernel_reason``."""
        from kernels.icq.launch import decode_mask

        _, _, _, K, B, L, _, R = self._meta()

        def build() -> Tensor:
            return decode_mask(self.pos_data, self.pos_offsets, B, self.out_features, K, L, R)

        return self._cached("mask", ("pos_data", "pos_offsets", "icqmeta"), build)

    def _kernel_reason(self, x: Tensor) -> str | None:
        from kernels.icq.launch import decode_unsupported_reason, gemm_unsupported_reason

        _, bits, _, _, B, _, _, _ = self._meta()
        grids = (self.scales, self.zeros, self.oscales, self.ozeros)
        return decode_unsupported_reason(self.pos_data, self.pos_offsets, B) or gemm_unsupported_reason(
            x, self.qweight, grids, self.pos_data, bits
        )

    def _kernel_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        from kernels.icq.launch import icq_gemm

        _, bits, gs, K, _, _, _, _ = self._meta()
        grids = (self.scales, self.zeros, self.oscales, self.ozeros)
        return icq_gemm(x, self.qweight, *grids, self.outlier_mask_words(), bits, gs, K, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, icquant"


class ICQuantLayout(PackedLayout):
    """ICQuant (icquant-rtn, icquant-gptq): no serving format has outlier grids or index-coded positions."""

    name = "icquant"
    module = ICQuantLinear
    weight_type = ICQuantWeight
    parts: ClassVar[Mapping[str, str]] = {
        "qweight": "codes",
        "pos_data": "positions",
        "pos_offsets": "offsets",
        **dict.fromkeys(_GRIDS, "grids"),
    }
    no_export = "ICQuant outlier grids and index-coded positions have no {fmt} representation"
    meta_key, keys = "icqmeta", ICQ_KEYS
    pack_fn, unpack_fn = staticmethod(pack_icquant), staticmethod(unpack_icquant)

    def shape(self, q: ICQuantWeight) -> tuple[int, int]:
        return int(q.codes.shape[0]), int(q.codes.shape[1])
