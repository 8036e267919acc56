"""``CodedLinear``: the torch reference module shared by the non-affine packed layouts (ICQuant, binary coding).

A subclass names its checkpoint tensors (``KEYS``), the fp16 ones that must stay bit-exact under
``model.to(dtype)`` (``FP16_KEYS``) and how to turn the tensors back into its weight (``_unpack``, an object
with ``dequantize(dtype)``).

forward(x [..., K]) -> [..., N], dispatched like ``kernels.quant_linear.QuantLinear``:
  * CPU (any non-CUDA device): reference ``F.linear`` on the weight dequantized on the fly, bit-identical to an
    ``nn.Linear`` holding the fake-quantized weight;
  * CUDA with M <= ``KERNEL_MAX_M`` rows and ``use_kernel``: the subclass's Triton kernel (``_kernel_forward``);
    an unsupported combination (``_kernel_reason``) falls back to the reference with a one-time warning.
Host-side data a kernel needs (metadata ints, the decoded ICQuant mask) is memoised by ``_cached`` on the
identity and version of the buffers it came from, so ``.to(device)`` or ``load_state_dict`` rebuilds it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.quant_linear import KERNEL_MAX_M, apply_with_int_views, check_input

__all__ = ["CodedLinear"]

_T = TypeVar("_T")
_WARNED: set[str] = set()  # one-time fallback warnings, keyed by class and reason


def _warn_once(owner: str, reason: str) -> None:
    key = f"{owner}: {reason}"
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{owner}: Triton kernel not used ({reason}); using the torch reference", stacklevel=3)


class CodedLinear(nn.Module):
    """y = F.linear(x, Ŵ, bias) with Ŵ = ``unpacked().dequantize()`` (CPU reference: dequantize, then matmul)."""

    KEYS: ClassVar[tuple[str, ...]] = ()
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ()  # registered (and unpacked) only when given
    FP16_KEYS: ClassVar[tuple[str, ...]] = ()
    LAYOUT: ClassVar[str] = "coded"  # for error messages
    _unpack: ClassVar[Any]  # staticmethod: tensors -> the unpacked weight (it has ``dequantize(dtype)``)

    in_features: int
    out_features: int
    bits: int

    def __init__(self, tensors: dict[str, Tensor], bias: Tensor | None = None) -> None:
        super().__init__()
        missing = [k for k in self.KEYS if k not in tensors]
        if missing:
            raise ValueError(f"{self.LAYOUT} packed tensors missing {missing}")
        for k in (*self.KEYS, *(k for k in self.OPTIONAL_KEYS if k in tensors)):
            self.register_buffer(k, tensors[k].detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features, self.bits = self._shape(self.unpacked())  # validates the layout now
        self.use_kernel = True  # set False to force the reference path (debugging, A/B checks)
        self._kernel_cache: dict[str, tuple[Any, Any]] = {}  # name -> (buffer stamp, value)

    @staticmethod
    def _shape(w: Any) -> tuple[int, int, int]:
        """(out_features, in_features, bits) of an unpacked weight."""
        raise NotImplementedError

    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> Self:
        return cls(tensors, tensors.get("bias", bias))

    def unpacked(self) -> Any:
        keys = (*self.KEYS, *(k for k in self.OPTIONAL_KEYS if k in self._buffers))
        return self._unpack({k: self._buffers[k] for k in keys})  # type: ignore[misc]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.unpacked().dequantize(torch.float32).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_features)
        return self._dispatch(x, self._buffers.get("bias"))

    def _dispatch(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x @ Ŵᵀ (+ bias): the Triton kernel when eligible and supported, else the reference (one-time warning)."""
        if self._kernel_eligible(x):
            reason = self._kernel_reason(x)
            if reason is None:
                return self._kernel_forward(x, bias)
            _warn_once(type(self).__name__, reason)
        return F.linear(x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    # ---- kernel dispatch (subclasses implement _kernel_reason / _kernel_forward) ---------------------------
    def _kernel_eligible(self, x: Tensor) -> bool:
        """CUDA input, kernels enabled, and few enough rows that the kernel beats dequantize + dense matmul."""
        return x.is_cuda and self.use_kernel and x.numel() // max(self.in_features, 1) <= KERNEL_MAX_M

    def _kernel_reason(self, x: Tensor) -> str | None:
        """None if ``_kernel_forward`` can run on x, else why not (the default: this layout has no kernel)."""
        return f"no Triton kernel for the {self.LAYOUT} layout"

    def _kernel_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _cached(self, name: str, keys: tuple[str, ...], build: Callable[[], _T]) -> _T:
        """``build()`` memoised until one of the buffers ``keys`` is replaced (``.to``, assignment) or modified in
        place (``load_state_dict`` bumps the version); holding the buffers keeps the identity check sound."""
        stamp = tuple((t, t._version) for t in (self._buffers[k] for k in keys) if t is not None)
        hit = self._kernel_cache.get(name)
        if (
            hit is not None
            and len(hit[0]) == len(stamp)
            and all(a is b and va == vb for (a, va), (b, vb) in zip(hit[0], stamp, strict=True))
        ):
            return hit[1]
        value = build()
        self._kernel_cache[name] = (stamp, value)
        return value

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # model.to(dtype) must not round the fp16 grids: an int16 view only moves device (as QuantLinear)
        return apply_with_int_views(self, self.FP16_KEYS, lambda: super(CodedLinear, self)._apply(fn, recurse))
