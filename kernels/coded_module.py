"""``CodedLinear``: the torch reference module shared by the non-affine packed layouts (ICQuant, binary coding).

A subclass names its checkpoint tensors (``KEYS``), the fp16 ones that must stay bit-exact under
``model.to(dtype)`` (``FP16_KEYS``) and how to turn the tensors back into its weight (``_unpack``, an object
with ``dequantize(dtype)``); forward is ``F.linear`` on the weight dequantized on the fly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.packing import SCALE_DTYPE

__all__ = ["CodedLinear"]


class CodedLinear(nn.Module):
    """y = F.linear(x, Ŵ, bias) with Ŵ = ``unpacked().dequantize()`` (CPU reference: dequantize, then matmul)."""

    KEYS: ClassVar[tuple[str, ...]] = ()
    FP16_KEYS: ClassVar[tuple[str, ...]] = ()
    LAYOUT: ClassVar[str] = "coded"  # for error messages

    in_features: int
    out_features: int
    bits: int

    def __init__(self, tensors: dict[str, Tensor], bias: Tensor | None = None) -> None:
        super().__init__()
        missing = [k for k in self.KEYS if k not in tensors]
        if missing:
            raise ValueError(f"{self.LAYOUT} packed tensors missing {missing}")
        for k in self.KEYS:
            self.register_buffer(k, tensors[k].detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features, self.bits = self._shape(self.unpacked())  # validates the layout now

    @staticmethod
    def _unpack(tensors: dict[str, Tensor]) -> Any:
        raise NotImplementedError

    @staticmethod
    def _shape(w: Any) -> tuple[int, int, int]:
        """(out_features, in_features, bits) of an unpacked weight."""
        raise NotImplementedError

    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> Self:
        return cls(tensors, tensors.get("bias", bias))

    def unpacked(self) -> Any:
        return self._unpack({k: self._buffers[k] for k in self.KEYS})  # type: ignore[misc]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.unpacked().dequantize(torch.float32).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
        b = self._buffers.get("bias")
        return F.linear(x, self.dequantized_weight(x.dtype), None if b is None else b.to(x.dtype))

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # model.to(dtype) must not round the fp16 grids: an int16 view only moves device (as QuantLinear)
        for name in self.FP16_KEYS:
            self._buffers[name] = self._buffers[name].view(torch.int16)  # type: ignore[union-attr]
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in self.FP16_KEYS:
                self._buffers[name] = self._buffers[name].view(SCALE_DTYPE)  # type: ignore[union-attr]
