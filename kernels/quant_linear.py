"""``QuantLinear``: a Linear holding packed low-bit group-wise weights, plus ``replace_linears``.

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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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

__all__ = [
    "KERNEL_MAX_M",
    "QuantLinear",
    "RotatedQuantLinear",
    "apply_keeping_transforms",
    "incoherent_matmul",
    "module_transforms",
    "register_transforms",
    "replace_linears",
    "set_tuned_configs",
]

KERNEL_MAX_M = 256  # above this many rows dequantize + dense matmul wins
_WARNED: set[str] = set()  # one-time fallback warnings, keyed by reason


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
    def from_quantized(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        bits: int,
        group_size: int,
        g_idx: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> QuantLinear:
        """Pack the quantizer contract (codes [N,K] uint8, scales/zeros fp32 [N,G]); scales round to fp16."""
        return cls.from_packed(pack_quantized_linear(codes, scales, zeros, bits, group_size, g_idx), bias=bias)

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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
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
        for name in self._FP16_BUFFERS:
            self._buffers[name] = self._buffers[name].view(torch.int16)  # type: ignore[union-attr]
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in self._FP16_BUFFERS:
                self._buffers[name] = self._buffers[name].view(SCALE_DTYPE)  # type: ignore[union-attr]

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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got input shape {tuple(x.shape)}")
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
    bufs = module._buffers
    names = [k for k, v in bufs.items() if is_transform_key(k) and v is not None and v.is_floating_point()]
    for name in names:
        bufs[name] = bufs[name].view(torch.int32)  # type: ignore[union-attr]
    try:
        return apply()
    finally:
        for name in names:
            bufs[name] = bufs[name].view(torch.float32)  # type: ignore[union-attr]


def _module_class(tensors: dict[str, Tensor]) -> Any:
    """The module for one packed linear, told by its tensors: ICQuant (``icqmeta``), binary coding (``bcqmeta``),
    E8P (``e8pmeta``), incoherence-processed (transform keys) or plain ``QuantLinear``."""
    if "group_bits" in tensors:  # group-wise mixed precision: one plain part per width
        from kernels.mixed_linear import MixedQuantLinear

        return MixedQuantLinear
    if "icqmeta" in tensors:
        from kernels.icq_linear import ICQuantLinear

        return ICQuantLinear
    if "bcqmeta" in tensors:
        from kernels.bcq_linear import BCQLinear

        return BCQLinear
    if "e8pmeta" in tensors:  # E8P lattice codes (their module applies the transforms itself)
        from kernels.e8p_linear import E8PLinear

        return E8PLinear
    return RotatedQuantLinear if any(is_transform_key(k) for k in tensors) else QuantLinear


def set_tuned_configs(model: nn.Module, tuned: TunedConfigs | None) -> int:
    """Give every ``QuantLinear`` in ``model`` the per-GPU tuned config table (``TunedConfigs.load(path)``, as
    written by ``kernels.wgemm.launch.tune``); returns how many modules got it. Shapes missing from the table
    keep the heuristic ``default_config``."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in mods:
        m.tuned = tuned
    return len(mods)


def replace_linears(
    model: nn.Module,
    quantized: dict[str, dict[str, Tensor]],
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Swap ``nn.Linear`` submodules named in ``quantized`` (e.g. "model.layers.0.self_attn.q_proj") for
    ``QuantLinear`` built from their packed tensors (``pack_quantized_linear`` output).

    The Linear's bias is kept unless the dict has "bias". Placement: ``device`` if given, else the Linear's
    device; a Linear on the meta device (a skeleton built under ``torch.device("meta")``) gives the packed
    tensors' device, and its bias becomes a zero buffer of the same dtype for a later ``load_state_dict``.
    Returns the replaced names; with ``strict`` a missing or non-Linear name raises before anything is
    replaced (shape mismatches always raise, also before anything is replaced).
    """
    plan: list[tuple[str, nn.Module, str, nn.Module]] = []
    for name, tensors in quantized.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise KeyError(f"no submodule named {name!r}") from None
            continue
        if not isinstance(lin, nn.Linear):
            if strict:
                raise TypeError(f"{name!r} is {type(lin).__name__}, not nn.Linear")
            continue
        on_meta = lin.weight.is_meta
        dev = device if device is not None else (next(iter(tensors.values())).device if on_meta else lin.weight.device)
        t = {k: v.to(dev) for k, v in tensors.items()}
        bias = None
        if lin.bias is not None:
            bias = torch.zeros(lin.out_features, dtype=lin.bias.dtype) if lin.bias.is_meta else lin.bias.detach()
        try:
            q = _module_class(t).from_packed(t, bias=bias)
        except ValueError as exc:  # which layer of the checkpoint, e.g. transforms that cannot be drawn again
            raise ValueError(f"{name!r}: {exc}") from None
        if (q.in_features, q.out_features) != (lin.in_features, lin.out_features):
            raise ValueError(
                f"{name!r}: packed shape (in={q.in_features}, out={q.out_features}) does not match the Linear "
                f"(in={lin.in_features}, out={lin.out_features})"
            )
        parent_name, _, child = name.rpartition(".")
        plan.append((name, model.get_submodule(parent_name) if parent_name else model, child, q))
    for _, parent, child, q in plan:
        setattr(parent, child, q)
    return [p[0] for p in plan]
