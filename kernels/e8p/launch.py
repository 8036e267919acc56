"""Launcher for the E8P decode-GEMM: validate, pick a config, launch.

    y = e8p_gemm(x, qweight, scales, bias=None, qweight2=None)
      x [..., K] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1) -> y [..., N] in x's dtype
      qweight int16 [N, K/8], scales fp16 [N], qweight2 uint8 [N, K/8] for 3-bit codes (``kernels.e8p_linear``)

Config: explicit ``config`` > the weight-only GEMM heuristic ``kernels.wgemm.configs.default_config`` (same tiles
and split-K rule; BLOCK_K is a power of two >= 8, so K-tiles and split slices cover whole codewords).
Numerics: codeword entries are exact in every supported dtype; products accumulate in fp32 and the row scale
multiplies the fp32 sum, so y differs from the reference (which rounds scale·codeword to x's dtype first) by
rounding only: measured max relative error (interpreter, ``tests/kernels/test_e8p_kernel.py``) within the GEMM
tolerances of ``tests/kernels/synth.py``. Importing this module does not import triton.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from kernels._gemm_launch import SUPPORTED_DTYPES, check_bias, check_x, device_reason, finish, plan_gemm
from kernels._triton_util import triton_available
from kernels.wgemm.configs import WGemmConfig
from quant.e8p import E8P_DIM, RESID_SCALE, e8_residual_grid, e8p_codebook

__all__ = ["e8p_gemm", "kernel_unsupported_reason"]


def _kernel():
    from kernels.e8p.triton import e8p_gemm_kernel

    return e8p_gemm_kernel


@cache
def _table(device: torch.device) -> Tensor:
    """The 65,536 × 8 codeword table in fp16 (exact) on ``device``, built once per device."""
    return e8p_codebook().to(device=device, dtype=torch.float16).contiguous()


@cache
def _residual_table(device: torch.device) -> Tensor:
    """The 256 × 8 residual codewords divided by ρ, fp16 (exact: multiples of 1/4), on ``device``."""
    return (e8_residual_grid() / RESID_SCALE).to(device=device, dtype=torch.float16).contiguous()


def kernel_unsupported_reason(x: Tensor, qweight: Tensor, scales: Tensor) -> str | None:
    """None if the Triton kernel can run this call, else a short reason (used for fallbacks/warnings)."""
    if not triton_available():
        return "triton is not installed"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype}"
    if scales.dtype not in SUPPORTED_DTYPES:
        return f"scales dtype {scales.dtype}"
    return device_reason((x, qweight, scales), _kernel, "kernels.e8p.triton")


def e8p_gemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    *,
    qweight2: Tensor | None = None,
    config: WGemmConfig | None = None,
) -> Tensor:
    """y [..., N] = x [..., K] @ Ŵᵀ (+ bias) with the Triton kernel (see module docstring)."""
    reason = kernel_unsupported_reason(x, qweight, scales)
    if reason is not None:
        raise RuntimeError(f"e8p_gemm Triton kernel unsupported: {reason}")
    if qweight.dtype != torch.int16 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int16 [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = int(qweight.shape[0]), int(qweight.shape[1]) * E8P_DIM
    check_x(x, K)
    if tuple(scales.shape) != (N,):
        raise ValueError(f"scales must be [{N}], got {tuple(scales.shape)}")
    check_bias(bias, N)
    if qweight2 is not None and (qweight2.dtype != torch.uint8 or qweight2.shape != qweight.shape):
        raise ValueError(f"qweight2 must be uint8 {tuple(qweight.shape)}, got {qweight2.dtype} {tuple(qweight2.shape)}")
    plan = plan_gemm(x, N, K, K, 2 if qweight2 is None else 3, bias is not None, config)
    if plan.cfg.block_k % E8P_DIM:
        raise ValueError(f"BLOCK_K {plan.cfg.block_k} must be a multiple of {E8P_DIM} (whole codewords per K-tile)")
    if plan.M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    x2 = plan.x2
    kernel = _kernel()
    kernel[plan.grid](
        x2,
        qweight,
        _table(x.device),
        qweight if qweight2 is None else qweight2,  # dummy pointer when unused
        _residual_table(x.device),
        scales,
        *plan.io_args(bias, scales, K),  # scales: dummy bias pointer when unused
        qweight.stride(0),
        qweight.stride(1),
        (qweight if qweight2 is None else qweight2).stride(0),
        (qweight if qweight2 is None else qweight2).stride(1),
        *plan.out_strides,
        HAS_RESID=qweight2 is not None,
        **plan.launch_meta(kernel),
    )
    return finish(plan, x, bias)
