"""``QuantLinear``: a Linear holding packed low-bit group-wise weights, and its layouts (int-packed, rotated).

Buffers carry the checkpoint names of ``kernels.packing.pack_quantized_linear`` (``qweight``, ``scales``,
``zeros``, ``qmeta``, optional ``g_idx``, optional ``bias``) so ``load_state_dict``/safetensors round-trip.

forward(x [..., K]) -> [..., N]:
  * CPU (or any non-CUDA device): reference ``F.linear(x, W_hat, bias)`` in x's dtype (``kernels.wgemm.ref``),
    bit-identical to an ``nn.Linear`` holding the fake-quantized weight;
  * CUDA: the Triton kernel (``kernels.wgemm.launch.wgemm``) when the combination is supported; M > 256 rows
    use dequantize + cuBLAS (faster there); anything unsupported falls back to the reference with a one-time
    warning naming the reason.

``RotatedQuantLinear`` (incoherence-processed weights, ``quant.incoherence``) also holds the transform tensors
(``su``, ``sv``, ``perm_u``, ``kron_v``, ``fac_v0``, ``rescale`` …, fp32) and computes
y = Uᵀ (Ŵ̃ (V diag(s)⁻¹ x)) + bias, with V and U applied in fp32: on CUDA by the FWHT Triton kernel
(``kernels.hadamard.launch.incoherence_input/output``, random signs fused into its load) chained before the
low-bit matmul, elsewhere by torch (``quant.incoherence``).

``AffineLayout`` and ``RotatedLayout`` register the two in :mod:`kernels.layouts` (which also swaps a model's
linears for the packed modules: ``kernels.layouts.replace_linears``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kernels.layout_base import PackedLayout, TransformSeed, canonical_transforms
from kernels.packing import (
    FORMAT_VERSION,
    SCALE_DTYPE,
    UnpackedLinear,
    normalize_group_size,
    num_groups,
    pack_quantized_linear,
    packed_rows,
    read_qmeta,
    unpack_quantized_linear,
)
from kernels.wgemm.configs import TunedConfigs
from kernels.wgemm.ref import dequantize_packed, wgemm_ref
from quant.incoherence import IncoherenceTransforms, is_transform_key
from quant.types import QuantizedWeight

__all__ = [
    "KERNEL_MAX_M",
    "AffineLayout",
    "RotatedLayout",
    "QuantLinear",
    "RotatedQuantLinear",
    "apply_keeping_transforms",
    "apply_with_int_views",
    "check_input",
    "incoherent_matmul",
    "module_transforms",
    "register_transforms",
    "set_tuned_configs",
]

KERNEL_MAX_M = 256  # above this many rows dequantize + dense matmul wins
_WARNED: set[str] = set()  # one-time fallback warnings, keyed by reason


def check_input(x: Tensor, in_features: int) -> None:
    """A packed module's forward refuses an input whose last dim is not its ``in_features``, in one line."""
    if x.shape[-1] != in_features:
        raise ValueError(f"expected last dim {in_features}, got input shape {tuple(x.shape)}")


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"QuantLinear: Triton kernel not used ({reason}); using the torch reference", stacklevel=3)


class QuantLinear(nn.Module):
    """y = x @ W_hat.T + bias with W_hat = scales * (codes - zeros), weights packed per ``kernels.packing``."""

    _FP16_BUFFERS = ("scales", "zeros")

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    qmeta: Tensor
    g_idx: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool = False,
        act_order: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        g = normalize_group_size(group_size, in_features)
        G = num_groups(in_features, g)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, g
        self.use_kernel = True  # set False to force the reference path (debugging, A/B checks)
        self.tuned: TunedConfigs | None = None  # per-GPU tuned wgemm configs (kernels.wgemm.configs), if loaded
        self.register_buffer(
            "qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(G, out_features, dtype=SCALE_DTYPE, device=device))
        self.register_buffer(
            "qmeta", torch.tensor([FORMAT_VERSION, bits, g, in_features], dtype=torch.int32, device=device)
        )
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> QuantLinear:
        """Build from checkpoint tensors (``pack_quantized_linear`` output); ``tensors["bias"]`` wins."""
        bits, g, K = read_qmeta(tensors["qmeta"])
        N = tensors["qweight"].shape[1]
        b = tensors.get("bias", bias)
        mod = cls(
            K,
            N,
            bits,
            g,
            bias=b is not None,
            act_order="g_idx" in tensors,
            bias_dtype=b.dtype if b is not None else torch.float16,
            device=tensors["qweight"].device,
        )
        state = {k: v for k, v in tensors.items() if k != "bias"}
        if b is not None:
            state["bias"] = b.detach()
        mod.load_state_dict(state, strict=True)
        return mod

    @classmethod
    def from_quantized(cls, q: UnpackedLinear | QuantizedWeight, bias: Tensor | None = None) -> QuantLinear:
        """Pack the quantizer contract (codes [N,K] uint8, scales/zeros fp32 [N,G], bits, group_size, g_idx);
        scales round to fp16."""
        return cls.from_packed(AffineLayout().pack(q), bias=bias)

    # ---- accessors --------------------------------------------------------------------------------------
    def packed_tensors(self) -> dict[str, Tensor]:
        """The checkpoint tensors (same as ``state_dict()`` with plain names)."""
        return dict(self.state_dict())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat [N, K] (exact in fp32), cast to ``dtype``."""
        return dequantize_packed(
            self.qweight,
            self.scales,
            self.zeros,
            self.g_idx,
            self.bits,
            self.group_size,
            self.in_features,
            dtype=dtype,
        )

    def unpacked(self) -> UnpackedLinear:
        """``kernels.packing.UnpackedLinear`` (codes, fp32 scales/zeros [N, G], g_idx, bits, group_size)."""
        return unpack_quantized_linear(self.packed_tensors())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.g_idx is not None}, bias={self.bias is not None}"
        )

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_features)
        return self._gemm(x, self.bias)

    def _gemm(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x @ W_hat.T (+ bias): the kernel or the reference."""
        args = (self.qweight, self.scales, self.zeros, self.g_idx, self.bits, self.group_size, self.in_features)
        if x.is_cuda and self.use_kernel:
            M = x.numel() // self.in_features
            if M <= KERNEL_MAX_M:
                from kernels.wgemm.launch import kernel_unsupported_reason, wgemm

                reason = kernel_unsupported_reason(x, *args)
                if reason is None:
                    return wgemm(x, *args, bias=bias, tuned=self.tuned)
                _warn_once(reason)
        return wgemm_ref(x, *args, bias=bias)

    # ---- keep fp16 scales/zeros exact under model.to(dtype) / .half() / .bfloat16() ------------------------
    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # Module.to(dtype) converts floating buffers; an int16 view only moves device, so fp16 stays exact.
        return apply_with_int_views(self, self._FP16_BUFFERS, lambda: super(QuantLinear, self)._apply(fn, recurse))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errs):
        meta = state_dict.get(prefix + "qmeta")
        if meta is not None:
            got = tuple(int(v) for v in meta.tolist())
            want = tuple(int(v) for v in self.qmeta.tolist())
            if got != want:
                errs.append(f"{prefix}qmeta (version, bits, group_size, K) = {got} does not match the module's {want}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errs)


class RotatedQuantLinear(QuantLinear):
    """A ``QuantLinear`` over Ŵ̃ = U W diag(s) Vᵀ: y = Uᵀ (Ŵ̃ (V diag(s)⁻¹ x)) + bias (QuIP / QuIP# inference).

    The transform buffers (names per ``quant.incoherence.is_transform_key``) stay fp32 under ``model.to(dtype)``;
    the transforms run in fp32 and the result is cast back to x's dtype.
    """

    @classmethod
    def from_packed(cls, tensors: dict[str, Tensor], bias: Tensor | None = None) -> RotatedQuantLinear:
        transforms = {k: v for k, v in tensors.items() if is_transform_key(k)}
        if not transforms:
            raise ValueError("RotatedQuantLinear needs transform tensors (su/sv/kron_u/kron_v …)")
        mod = super().from_packed({k: v for k, v in tensors.items() if k not in transforms}, bias=bias)
        assert isinstance(mod, RotatedQuantLinear)
        register_transforms(mod, transforms)
        return mod

    def transforms(self) -> IncoherenceTransforms:
        t = module_transforms(self)
        assert t is not None  # from_packed refuses a layer without transforms
        return t

    def dequantized_weight_original(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uᵀ Ŵ̃ V diag(s)⁻¹ [N, K]: the weight this layer applies, in the original basis."""
        from quant.incoherence import incoherence_postprocess

        W = incoherence_postprocess(self.dequantized_weight(torch.float64), self.transforms())
        return W.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_features)
        y = incoherent_matmul(self.transforms(), x, lambda xv: self._gemm(xv, None), self.use_kernel)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        return apply_keeping_transforms(self, lambda: super(RotatedQuantLinear, self)._apply(fn, recurse))


# ---- incoherence transforms on a packed module (RotatedQuantLinear, kernels.e8p_linear.E8PLinear) ------------


def register_transforms(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Register the transform tensors (names per ``is_transform_key``) as buffers and validate their layout now,
    not at the first forward."""
    for k, v in sorted(tensors.items()):
        if is_transform_key(k):
            module.register_buffer(k, v.detach().clone())
    module_transforms(module)


def module_transforms(module: nn.Module) -> IncoherenceTransforms | None:
    """The module's U, V (None without transform buffers), rebuilt only when a transform buffer is replaced
    (``.to``, assignment) or modified in place: the packed 1-bit sign vectors are unpacked once, not on every
    forward (on a GPU that would be a handful of tiny kernel launches per layer per token)."""
    bufs = [(k, v) for k, v in module._buffers.items() if v is not None and is_transform_key(k)]
    if not bufs:
        return None
    stamp = tuple((v, v._version) for _, v in bufs)  # holding the tensors keeps the identity check sound
    hit = module.__dict__.get("_transforms_cache")
    if (
        hit is not None
        and len(hit[0]) == len(stamp)
        and all(a is b and va == vb for (a, va), (b, vb) in zip(hit[0], stamp, strict=True))
    ):
        return hit[1]  # type: ignore[no-any-return]
    t = IncoherenceTransforms.from_dict(dict(bufs)).to(bufs[0][1].device)  # seeded parts are drawn on the CPU
    module.__dict__["_transforms_cache"] = (stamp, t)
    return t


def incoherent_matmul(
    t: IncoherenceTransforms, x: Tensor, gemm: Callable[[Tensor], Tensor], use_kernel: bool
) -> Tensor:
    """Uᵀ gemm(V diag(s)⁻¹ x): the transforms in fp32 around the low-bit matmul ``gemm`` (codes' basis), the result
    in x's dtype. On CUDA with kernels enabled the FWHT kernels (signs fused) run the transforms."""
    if x.is_cuda and use_kernel:
        from kernels.hadamard.launch import incoherence_input, incoherence_output

        xv = incoherence_input(t, x.to(torch.float32)).to(x.dtype)
        return incoherence_output(t, gemm(xv).to(torch.float32)).to(x.dtype)
    xv = t.input(x.to(torch.float32)).to(x.dtype)
    return t.output(gemm(xv).to(torch.float32)).to(x.dtype)


def apply_keeping_transforms(module: nn.Module, apply: Callable[[], Any]) -> Any:
    """Run ``apply()`` (the module's ``nn.Module._apply``) with its fp32 transform buffers viewed as int32: like
    the fp16 scales, an integer view only moves device under ``model.to(dtype)``, so the transforms stay exact."""
    names = [k for k, v in module._buffers.items() if is_transform_key(k) and v is not None and v.is_floating_point()]
    return apply_with_int_views(module, names, apply)


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_with_int_views(module: nn.Module, names: Iterable[str], apply: Callable[[], Any]) -> Any:
    """Run ``apply()`` (the module's ``nn.Module._apply``) with the floating buffers ``names`` viewed as integers of
    the same width: ``model.to(dtype)`` converts floating buffers, an integer view only moves device, so the
    fp16 grids and fp32 transforms stay bit-exact. Each buffer gets its own dtype back afterwards."""
    bufs = module._buffers
    dtypes = {n: t.dtype for n in names if (t := bufs.get(n)) is not None}
    for n, dt in dtypes.items():
        bufs[n] = bufs[n].view(_INT_VIEW[dt.itemsize])  # type: ignore[union-attr]
    try:
        return apply()
    finally:
        for n, dt in dtypes.items():
            bufs[n] = bufs[n].view(dt)  # type: ignore[union-attr]


def set_tuned_configs(model: nn.Module, tuned: TunedConfigs | None) -> int:
    """Give every ``QuantLinear`` in ``model`` the per-GPU tuned config table (``TunedConfigs.load(path)``, as
    written by ``kernels.wgemm.launch.tune``); returns how many modules got it. Shapes missing from the table
    keep the heuristic ``default_config``."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in mods:
        m.tuned = tuned
    return len(mods)


# ---- the layouts (registered in kernels.layouts) -------------------------------------------------------------

AFFINE_KEYS = ("qweight", "scales", "zeros", "qmeta", "g_idx")


class AffineLayout(PackedLayout):
    """Codes + one affine grid per (row, group), int32 K-packed (``kernels.packing``): rtn, gptq."""

    name = "affine"
    module = QuantLinear
    weight_type = QuantizedWeight
    parts: ClassVar[Mapping[str, str]] = {"qweight": "codes", "scales": "grids", "zeros": "grids"}
    exports = frozenset({"compressed-tensors", "gptq", "gguf"})

    def holds(self, q: Any) -> bool:
        return isinstance(q, QuantizedWeight) and not q.transforms

    def recognises(self, tensors: Mapping[str, Tensor]) -> bool:
        return "qmeta" in tensors and not any(is_transform_key(k) for k in tensors)

    def owns_key(self, key: str) -> bool:
        return key in AFFINE_KEYS

    def pack(
        self, q: QuantizedWeight | UnpackedLinear, transform_seed: TransformSeed | None = None
    ) -> dict[str, Tensor]:
        out = pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx)
        out.update(
            canonical_transforms(getattr(q, "transforms", None), transform_seed)
        )  # su, sv, kron_v, tseed, rescale …
        return out

    def unpack(self, tensors: Mapping[str, Tensor], stats: dict[str, float] | None = None) -> QuantizedWeight:
        u = unpack_quantized_linear({k: v for k, v in tensors.items() if k in AFFINE_KEYS})
        transforms = {k: v for k, v in tensors.items() if is_transform_key(k)} or None
        return QuantizedWeight(u.codes, u.scales, u.zeros, u.bits, u.group_size, u.g_idx, dict(stats or {}), transforms)

    def dequantize(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
        from quant.incoherence import dequantize_original

        return dequantize_original(q, dtype)

    def shape(self, q: QuantizedWeight) -> tuple[int, int]:
        return int(q.codes.shape[0]), int(q.codes.shape[1])


class RotatedLayout(AffineLayout):
    """The affine layout over Ŵ̃ = U W Vᵀ plus the transform tensors (quip, hadamard-gptq): no serving format
    applies the online transforms."""

    name = "rotated"
    module = RotatedQuantLinear
    exports = frozenset()
    no_export = "{method} weights need the online incoherence transforms, which {fmt} cannot express"

    def holds(self, q: Any) -> bool:
        return isinstance(q, QuantizedWeight) and bool(q.transforms)

    def recognises(self, tensors: Mapping[str, Tensor]) -> bool:
        return "qmeta" in tensors and any(is_transform_key(k) for k in tensors)

    def owns_key(self, key: str) -> bool:
        return key in AFFINE_KEYS or is_transform_key(key)
