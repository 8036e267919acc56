"""``hadamard_transform``: normalised FWHT along the last dim, Triton for the 2^k factor when possible.

    y = hadamard_transform(x)                   # y = x Hᵀ / sqrt(n), x's dtype
    y = hadamard_transform(x, signs=d)          # randomized: y = (x ⊙ d) Hᵀ / sqrt(n)  (row x ↦ H diag(d) x)
    y = hadamard_transform(x, transpose=True)   # inverse direction: y = x H / sqrt(n)

Sizes: every n that ``quant.hadamard.hadamard_factorization`` handles, n = m·2^k with m = 1 or a Paley order
(12, 20, 28 as in ``ref``, and e.g. 576 = 36·16, 11008 = 344·32) — the same H_n the quantizer's transforms use.
The 2^k factor (with the sign vector fused into its load) runs in the Triton kernel (2^k <= 2^15) on CUDA, or on
CPU when the kernel module was imported under TRITON_INTERPRET=1 and ``use_kernel=True``; the m factor is a small
fp32 matmul with H_m in torch. The reference is ``quant.hadamard.fwht`` (identical to ``ref.fwht_ref`` on its
sizes). ``use_kernel``: None = kernel on CUDA when available, True = require the kernel, False = reference only.
Importing this module does not import triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._triton_util import is_interpreted, triton_available
from kernels.hadamard.configs import MAX_TRITON_SIZE, hadamard_config
from quant.hadamard import HadamardSizeError, fwht, hadamard_factorization, paley_matrix
from quant.incoherence import IncoherenceTransforms, OrthogonalTransform

__all__ = [
    "SUPPORTED_DTYPES",
    "hadamard_factors",
    "hadamard_kernel_unsupported_reason",
    "hadamard_transform",
    "incoherence_input",
    "incoherence_output",
    "orthogonal_apply",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel():
    from kernels.hadamard.triton import fwht_kernel

    return fwht_kernel


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k (m = 1 or a Paley order); raises ``HadamardSizeError`` (a ValueError) otherwise."""
    fac = hadamard_factorization(n)
    if fac is None:
        raise HadamardSizeError(
            f"unsupported Hadamard size {n}: need 2^k or m·2^k with a Paley order m (12, 20, 28, 36, …); "
            "see quant.hadamard for the constructions and the random-orthogonal fallback"
        )
    return fac


def hadamard_kernel_unsupported_reason(x: Tensor) -> str | None:
    """None if the Triton FWHT can handle x's 2^k factor, else why not (unsupported sizes raise)."""
    n = x.shape[-1]
    _, p = hadamard_factors(n)
    if not triton_available():
        return "triton is not installed"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if p > MAX_TRITON_SIZE:
        return f"power-of-two factor {p} > {MAX_TRITON_SIZE}"
    if x.device.type != "cuda" and not is_interpreted(_kernel()):
        return f"device {x.device.type} (needs CUDA, or TRITON_INTERPRET=1)"
    return None


def _fwht_triton(x: Tensor, p: int, signs: Tensor | None = None, m: int = 1) -> Tensor:
    """Normalised FWHT over the last dim of size p = 2^k, in Triton; ``signs`` [m·p] multiply first."""
    x2 = x.reshape(-1, p)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    rows = x2.shape[0]
    if rows:
        cfg = hadamard_config(p)
        grid = (-(-rows // cfg.block_rows),)
        d = None if signs is None else signs.to(device=x.device, dtype=torch.float32).contiguous()
        _kernel()[grid](
            x2,
            out,
            d if d is not None else x2,  # dummy pointer when unused
            rows,
            x2.stride(0),
            out.stride(0),
            1.0 / math.sqrt(p),
            N=p,
            LOG_N=p.bit_length() - 1,
            BLOCK_R=cfg.block_rows,
            HAS_SIGNS=d is not None,
            M_FAC=m,
            num_warps=cfg.num_warps,
        )
    return out.view(x.shape)


def hadamard_transform(
    x: Tensor, *, use_kernel: bool | None = None, transpose: bool = False, signs: Tensor | None = None
) -> Tensor:
    """y = (x ⊙ signs) H_nᵀ / sqrt(n) over the last dim, or (x ⊙ signs) H_n / sqrt(n) with ``transpose``."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    if signs is not None and tuple(signs.shape) != (n,):
        raise ValueError(f"signs must have shape [{n}], got {tuple(signs.shape)}")
    reason = None if use_kernel is False else hadamard_kernel_unsupported_reason(x)
    if use_kernel is False or reason is not None or (use_kernel is None and x.device.type != "cuda"):
        if use_kernel and reason is not None:
            raise RuntimeError(f"Hadamard Triton kernel unsupported: {reason}")
        xs = x if signs is None else (x.to(torch.float32) * signs.to(x.device, torch.float32)).to(x.dtype)
        return fwht(xs, transpose=transpose)
    if m == 1:  # Sylvester H_{2^k} is symmetric: transpose changes nothing
        return _fwht_triton(x, p, signs)
    z = _fwht_triton(x.reshape(*x.shape[:-1], m, p), p, signs, m)  # [..., m, p], normalised by 1/sqrt(p)
    Hm = (paley_matrix(m) / math.sqrt(m)).to(device=x.device, dtype=torch.float32)
    return torch.matmul(Hm.t() if transpose else Hm, z.to(torch.float32)).to(x.dtype).reshape(x.shape)


def orthogonal_apply(
    t: OrthogonalTransform, x: Tensor, *, transpose: bool = False, use_kernel: bool | None = None
) -> Tensor:
    """``t.apply(x)`` (x ↦ V x per row) or, with ``transpose``, ``t.apply_t(x)`` (x ↦ Vᵀ x), with the Hadamard
    factors on the FWHT kernel; matches ``quant.incoherence.OrthogonalTransform`` (the reference) up to fp32
    rounding. The common QuIP#/QuaRot case V = H_n diag(s) / sqrt(n) is one kernel pass with the signs fused.
    Works in x's dtype (callers pass fp32, as ``RotatedQuantLinear`` does).
    """
    n = t.n
    if x.shape[-1] != n:
        raise ValueError(f"transform of size {n} applied to last dim {x.shape[-1]}")
    fuse_signs = not transpose and t.perm is None and len(t.factors) == 1 and t.factors[0][1] is None
    if fuse_signs:
        return hadamard_transform(x, use_kernel=use_kernel, signs=t.signs)
    if not transpose:
        if t.signs is not None:
            x = x * t.signs.to(device=x.device, dtype=x.dtype)
        if t.perm is not None:
            x = x[..., t.perm.to(x.device)]
    lead = x.shape[:-1]
    z = x.reshape(-1, n)
    left, right = z.shape[0], n
    for size, F in t.factors:
        right //= size
        z = z.reshape(left, size, right)
        if F is None:
            z = hadamard_transform(z.transpose(1, 2), use_kernel=use_kernel, transpose=transpose).transpose(1, 2)
        else:
            F = F.to(device=z.device, dtype=z.dtype)
            z = torch.einsum("ij,ljr->lir", F.t() if transpose else F, z)
        left *= size
    z = z.reshape(*lead, n)
    if transpose:
        if t.perm is not None:
            z = z[..., torch.argsort(t.perm.to(z.device))]
        if t.signs is not None:
            z = z * t.signs.to(device=z.device, dtype=z.dtype)
    return z


def incoherence_input(tr: IncoherenceTransforms, x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
    """``tr.input(x)`` = V diag(rescale)⁻¹ x per row, on the FWHT kernel (see ``orthogonal_apply``)."""
    if tr.rescale is not None:
        x = x / tr.rescale.to(device=x.device, dtype=x.dtype)
    return orthogonal_apply(tr.V, x, use_kernel=use_kernel)


def incoherence_output(tr: IncoherenceTransforms, y: Tensor, *, use_kernel: bool | None = None) -> Tensor:
    """``tr.output(y)`` = Uᵀ y per row, on the FWHT kernel."""
    return orthogonal_apply(tr.U, y, transpose=True, use_kernel=use_kernel)


@torch.library.custom_op("quantpipe::hadamard", mutates_args=(), schema="(Tensor x) -> Tensor")
def hadamard_op(x: Tensor) -> Tensor:
    """``torch.ops.quantpipe.hadamard``: ``hadamard_transform(x)`` as an opaque op."""
    return hadamard_transform(x)


@hadamard_op.register_fake
def _hadamard_fake(x):
    hadamard_factors(x.shape[-1])
    return torch.empty_like(x)
