"""``hadamard_transform``: normalised FWHT along the last dim, Triton for the 2^k factor when possible.

    y = hadamard_transform(x)   # x [..., n], n = 2^k or m·2^k (m ∈ {12, 20, 28}); y = x Hᵀ / sqrt(n), x's dtype

The 2^k factor runs in the Triton kernel (2^k <= 2^15) on CUDA, or on CPU when the kernel module was imported
under TRITON_INTERPRET=1 and ``use_kernel=True``; the m factor is a small matmul with the Paley H_m in torch.
``use_kernel``: None = kernel on CUDA when available, True = require the kernel, False = reference only.
Importing this module does not import triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._triton_util import is_interpreted, triton_available
from kernels.hadamard.configs import MAX_TRITON_SIZE, hadamard_config
from kernels.hadamard.ref import _paley, fwht_ref, split_hadamard_size

__all__ = ["SUPPORTED_DTYPES", "hadamard_kernel_unsupported_reason", "hadamard_transform"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel():
    from kernels.hadamard.triton import fwht_kernel

    return fwht_kernel


def hadamard_kernel_unsupported_reason(x: Tensor) -> str | None:
    """None if the Triton FWHT can handle x's 2^k factor, else why not."""
    n = x.shape[-1]
    _, p = split_hadamard_size(n)  # raises for unsupported sizes
    if not triton_available():
        return "triton is not installed"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if p > MAX_TRITON_SIZE:
        return f"power-of-two factor {p} > {MAX_TRITON_SIZE}"
    if x.device.type != "cuda" and not is_interpreted(_kernel()):
        return f"device {x.device.type} (needs CUDA, or TRITON_INTERPRET=1)"
    return None


def _fwht_triton(x: Tensor, p: int) -> Tensor:
    """Normalised FWHT over the last dim of size p = 2^k, in Triton."""
    x2 = x.reshape(-1, p)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    rows = x2.shape[0]
    if rows:
        cfg = hadamard_config(p)
        grid = (-(-rows // cfg.block_rows),)
        _kernel()[grid](
            x2,
            out,
            rows,
            x2.stride(0),
            out.stride(0),
            1.0 / math.sqrt(p),
            N=p,
            LOG_N=p.bit_length() - 1,
            BLOCK_R=cfg.block_rows,
            num_warps=cfg.num_warps,
        )
    return out.view(x.shape)


def hadamard_transform(x: Tensor, *, use_kernel: bool | None = None) -> Tensor:
    """y = x @ H_nᵀ / sqrt(n) over the last dim (see module docstring)."""
    n = x.shape[-1]
    m, p = split_hadamard_size(n)
    if use_kernel is False:
        return fwht_ref(x)
    reason = hadamard_kernel_unsupported_reason(x)
    if reason is not None or (use_kernel is None and x.device.type != "cuda"):
        if use_kernel:
            raise RuntimeError(f"Hadamard Triton kernel unsupported: {reason}")
        return fwht_ref(x)
    if m == 1:
        return _fwht_triton(x, p)
    z = _fwht_triton(x.reshape(*x.shape[:-1], m, p), p)  # [..., m, p], normalised by 1/sqrt(p)
    Hm = (_paley(m) / math.sqrt(m)).to(device=x.device, dtype=torch.float32)
    return torch.matmul(Hm, z.to(torch.float32)).to(x.dtype).reshape(x.shape)


@torch.library.custom_op("quantpipe::hadamard", mutates_args=(), schema="(Tensor x) -> Tensor")
def hadamard_op(x: Tensor) -> Tensor:
    """``torch.ops.quantpipe.hadamard``: ``hadamard_transform(x)`` as an opaque op."""
    return hadamard_transform(x)


@hadamard_op.register_fake
def _hadamard_fake(x):
    split_hadamard_size(x.shape[-1])
    return torch.empty_like(x)
