"""E8P packed layout and its torch reference module ``E8PLinear`` (QuIP#'s lattice codebook, ``quant.e8p``).

Checkpoint tensors of one E8P linear [N = out, K = in] (``pack_e8p``)::

    qweight  int16 [N, K/8]   one 16-bit codeword index per 8 consecutive input columns (``quant.e8p`` layout:
                              8-bit absolute-vector row, shift bit, 7 sign bits)
    qweight2 uint8 [N, K/8]   3-bit codes only: the residual codeword per 8 columns (``quant.e8p.e8_residual_grid``)
    scales   fp16  [N]        one scale per output row
    e8pmeta  int32 [3]        (format version, K, bits)
    su, sv, kron_u, …         the incoherence transforms (``quant.incoherence.is_transform_key``; sign vectors
                              bit-packed) when the codes hold Ŵ̃ = U W Vᵀ; the module then computes y = Uᵀ Ŵ̃ V x

ŵ̃[n, 8c:8c+8] = scales[n] · (codeword(qweight[n, c]) [+ residual(qweight2[n, c]) / ρ]); 2 (3) bits per weight for
the codes, 16/K for the scales.
The quantizer rounds the scales to fp16 before coding, so unpacking gives back the exact ``E8PWeight`` and the
module's weight equals the fake-quantized weight bit for bit.

``E8PLinear.forward`` on CUDA (M <= ``KERNEL_MAX_M`` rows): the FWHT kernels for the transforms around the Triton
decode-GEMM ``kernels.e8p.launch.e8p_gemm`` (codeword table lookups inside the K loop, no dequantized weight in
memory). Elsewhere: the reference (one gather from the codeword table, then a dense matmul); dispatch and the
one-time fallback warning as ``kernels.coded_module``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from kernels.coded_module import CodedLinear
from kernels.layout_base import PackedLayout, TransformSeed, canonical_transforms
from kernels.packing import SCALE_DTYPE
from kernels.quant_linear import (
    apply_keeping_transforms,
    check_input,
    incoherent_matmul,
    module_transforms,
    register_transforms,
)
from quant.e8p import E8P_DIM, E8PWeight
from quant.incoherence import IncoherenceTransforms, incoherence_postprocess, is_transform_key

__all__ = ["E8P_FORMAT_VERSION", "E8P_KEYS", "E8PLayout", "E8PLinear", "pack_e8p", "unpack_e8p"]

E8P_FORMAT_VERSION = 1
E8P_KEYS = ("qweight", "scales", "e8pmeta")


def pack_e8p(w: E8PWeight) -> dict[str, Tensor]:
    """Checkpoint tensors (see the module docstring); raises if the scales are not fp16-exact."""
    s16 = w.scales.to(SCALE_DTYPE)
    if not torch.equal(s16.to(torch.float32), w.scales):
        raise ValueError("E8P scales are not fp16-exact; quantize with quant.e8p (it rounds them before coding)")
    out = {
        "qweight": w.codes.contiguous(),
        "scales": s16.contiguous(),
        "e8pmeta": torch.tensor([E8P_FORMAT_VERSION, w.in_features, w.bits], dtype=torch.int32),
    }
    if w.codes2 is not None:
        out["qweight2"] = w.codes2.contiguous()
    out.update({k: v.contiguous() for k, v in (w.transforms or {}).items()})
    return out


def unpack_e8p(t: dict[str, Tensor]) -> E8PWeight:
    """Inverse of ``pack_e8p`` (transform tensors, if any, come back in ``transforms``)."""
    meta = [int(v) for v in t["e8pmeta"].tolist()]
    if len(meta) == 2:  # the first 2-bit-only layout had no bits field
        meta.append(2)
    if len(meta) != 3 or meta[0] != E8P_FORMAT_VERSION or meta[2] not in (2, 3):
        raise ValueError(f"unsupported E8P format {meta} (this code reads version {E8P_FORMAT_VERSION}, 2 or 3 bits)")
    codes = t["qweight"]
    if codes.dtype != torch.int16 or codes.dim() != 2 or codes.shape[1] * E8P_DIM != meta[1]:
        raise ValueError(f"E8P qweight must be int16 [N, {meta[1] // E8P_DIM}], got {codes.dtype} {tuple(codes.shape)}")
    codes2 = t.get("qweight2")
    if (codes2 is not None) != (meta[2] == 3):
        raise ValueError(f"E8P {meta[2]}-bit layer {'lacks' if codes2 is None else 'has'} qweight2 (residual codes)")
    transforms = {k: v for k, v in t.items() if is_transform_key(k)} or None
    return E8PWeight(codes, t["scales"].to(torch.float32), transforms=transforms, codes2=codes2)


class E8PLinear(CodedLinear):
    """y = Uᵀ F.linear(V x, Ŵ̃) + bias with Ŵ̃ decoded from the E8P codes (plain F.linear without transforms)."""

    KEYS = E8P_KEYS
    OPTIONAL_KEYS = ("qweight2",)  # 3-bit codes
    FP16_KEYS = ("scales",)
    LAYOUT = "E8P"

    qweight: Tensor
    scales: Tensor
    e8pmeta: Tensor

    def __init__(self, tensors: dict[str, Tensor], bias: Tensor | None = None) -> None:
        super().__init__(tensors, bias)
        register_transforms(self, tensors)

    _unpack = staticmethod(unpack_e8p)

    @staticmethod
    def _shape(w: E8PWeight) -> tuple[int, int, int]:
        return w.out_features, w.in_features, w.bits

    def transforms(self) -> IncoherenceTransforms | None:
        return module_transforms(self)

    def dequantized_weight_original(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uᵀ Ŵ̃ V diag(s)⁻¹ [N, K]: the weight this layer applies, in the original basis."""
        t = self.transforms()
        if t is None:
            return self.dequantized_weight(dtype)
        return incoherence_postprocess(self.dequantized_weight(torch.float64), t).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_features)
        t, b = self.transforms(), self._buffers.get("bias")
        if t is None:
            return self._dispatch(x, b)
        y = incoherent_matmul(t, x, lambda xv: self._dispatch(xv, None), self.use_kernel)
        return y if b is None else y + b.to(y.dtype)

    def _kernel_reason(self, x: Tensor) -> str | None:
        from kernels.e8p.launch import kernel_unsupported_reason

        return kernel_unsupported_reason(x, self.qweight, self.scales)

    def _kernel_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        from kernels.e8p.launch import e8p_gemm

        return e8p_gemm(x, self.qweight, self.scales, bias, qweight2=self._buffers.get("qweight2"))

    def unpacked(self) -> E8PWeight:
        return replace(super().unpacked(), transforms=None)

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        return apply_keeping_transforms(self, lambda: super(E8PLinear, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        rot = ", incoherent" if self.transforms() is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, e8p{rot}"


class E8PLayout(PackedLayout):
    """QuIP#'s E8P lattice codes (+ the incoherence transforms): no serving format has the codebook."""

    name = "e8p"
    module = E8PLinear
    weight_type = E8PWeight
    parts: ClassVar[Mapping[str, str]] = {"qweight": "codes", "qweight2": "codes", "scales": "grids"}
    no_export = "E8P lattice codes (16-bit codeword per 8 weights) have no {fmt} representation"

    meta_key, keys = "e8pmeta", (*E8P_KEYS, *E8PLinear.OPTIONAL_KEYS)
    unpack_fn = staticmethod(unpack_e8p)

    def owns_key(self, key: str) -> bool:
        return key in self.keys or is_transform_key(key)

    def pack(self, q: E8PWeight, transform_seed: TransformSeed | None = None) -> dict[str, Tensor]:
        return pack_e8p(replace(q, transforms=canonical_transforms(q.transforms, transform_seed) or None))

    def dequantize(self, q: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        from quant.incoherence import dequantize_original

        return dequantize_original(q, dtype)
