"""Launcher for the binary-coding GEMM: validate, pick a config, launch; plus the ``quantpipe::bcq_gemm`` op.

    y = bcq_gemm(x, planes, alpha, beta, group_size, in_features, bias=None)
      x [..., K] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1) -> y [..., N] in x's dtype
      planes int32 [k, ceil(K/32), N], alpha [k, G, N], beta [G, N] (``kernels.bcq_linear`` layout)

Supported: any number of planes k >= 1 (unrolled at compile time), any group size (BLOCK_K | group_size reads
one α'/β' row per K-tile, other sizes and a ragged last group gather per column), any M (tuned for M <= 256;
``BCQLinear`` sends larger M to dequantize + dense matmul). Config: explicit ``config`` > the weight-only GEMM
heuristic ``kernels.wgemm.configs.default_config`` (same tiles, same split-K rule).
Numerics: Ŵ is rebuilt in fp32 in the reference's order (planes, then β'), cast to x's dtype, multiplied with
fp32 accumulation; split-K partials are summed in fp32 and y is rounded once. Measured max relative error vs the
reference (interpreter, ``tests/kernels/test_bcq_kernel.py``): fp32 6.5e-7, fp16 1.6e-5, bf16 1.2e-2.
Unsupported combinations make ``kernel_unsupported_reason`` non-None; ``BCQLinear`` then uses the reference
with a one-time warning. Importing this module does not import triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._gemm_launch import SUPPORTED_DTYPES, check_bias, check_x, device_reason, finish, plan_gemm
from kernels._triton_util import triton_available
from kernels.bitwords import word_rows
from kernels.packing import normalize_group_size, num_groups
from kernels.wgemm.configs import WGemmConfig

__all__ = ["SUPPORTED_DTYPES", "bcq_gemm", "bcq_gemm_op", "kernel_unsupported_reason"]


def _kernel():
    from kernels.bcq.triton import bcq_gemm_kernel

    return bcq_gemm_kernel


def kernel_unsupported_reason(x: Tensor, planes: Tensor, alpha: Tensor, beta: Tensor) -> str | None:
    """None if the Triton kernel can run this call, else a short reason (used for fallbacks/warnings)."""
    if not triton_available():
        return "triton is not installed"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype}"
    if alpha.dtype not in SUPPORTED_DTYPES or beta.dtype not in SUPPORTED_DTYPES:
        return f"alpha/beta dtype {alpha.dtype}/{beta.dtype}"
    return device_reason((x, planes, alpha, beta), _kernel, "kernels.bcq.triton")


def _validate(
    x: Tensor, planes: Tensor, alpha: Tensor, beta: Tensor, group_size: int, K: int, bias: Tensor | None
) -> tuple[int, int]:
    """(k planes, N); raises ValueError on a layout mismatch."""
    check_x(x, K)
    if planes.dtype != torch.int32 or planes.dim() != 3 or planes.shape[1] != word_rows(K) or planes.shape[0] < 1:
        raise ValueError(
            f"planes must be int32 [k >= 1, ceil(K/32)={word_rows(K)}, N], got {planes.dtype} {tuple(planes.shape)}"
        )
    k, _, N = planes.shape
    G = num_groups(K, group_size)
    if tuple(alpha.shape) != (k, G, N):
        raise ValueError(f"alpha must be [k={k}, G={G}, N={N}], got {tuple(alpha.shape)}")
    if tuple(beta.shape) != (G, N):
        raise ValueError(f"beta must be [G={G}, N={N}], got {tuple(beta.shape)}")
    check_bias(bias, N)
    return k, N


def bcq_gemm(
    x: Tensor,
    planes: Tensor,
    alpha: Tensor,
    beta: Tensor,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    *,
    config: WGemmConfig | None = None,
) -> Tensor:
    """y [..., N] = x [..., K] @ Ŵᵀ (+ bias) with the Triton kernel (see module docstring)."""
    reason = kernel_unsupported_reason(x, planes, alpha, beta)
    if reason is not None:
        raise RuntimeError(f"bcq_gemm Triton kernel unsupported: {reason}")
    K = in_features
    group_size = normalize_group_size(group_size, K)
    k, N = _validate(x, planes, alpha, beta, group_size, K, bias)
    plan = plan_gemm(x, N, K, group_size, k, bias is not None, config)
    if plan.M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    x2 = plan.x2
    kernel = _kernel()
    kernel[plan.grid](
        x2,
        planes,
        alpha,
        beta,
        *plan.io_args(bias, planes, K, group_size),  # planes: dummy bias pointer when unused
        planes.stride(0),
        planes.stride(1),
        planes.stride(2),
        alpha.stride(0),
        alpha.stride(1),
        alpha.stride(2),
        beta.stride(0),
        beta.stride(1),
        *plan.out_strides,
        NPLANES=k,
        GROUP_PER_TILE=group_size % plan.cfg.block_k == 0,
        **plan.launch_meta(kernel),
    )
    return finish(plan, x, bias)


@torch.library.custom_op(
    "quantpipe::bcq_gemm",
    mutates_args=(),
    schema="(Tensor x, Tensor planes, Tensor alpha, Tensor beta, Tensor? bias, int group_size, int in_features) "
    "-> Tensor",
)
def bcq_gemm_op(
    x: Tensor, planes: Tensor, alpha: Tensor, beta: Tensor, bias: Tensor | None, group_size: int, in_features: int
) -> Tensor:
    """``torch.ops.quantpipe.bcq_gemm``: the kernel when supported, else the reference (opaque to compile)."""
    if kernel_unsupported_reason(x, planes, alpha, beta) is None:
        return bcq_gemm(x, planes, alpha, beta, group_size, in_features, bias)
    from kernels.bcq.ref import bcq_gemm_ref

    return bcq_gemm_ref(x, planes, alpha, beta, group_size, in_features, bias)


@bcq_gemm_op.register_fake
def _bcq_gemm_fake(x, planes, alpha, beta, bias, group_size, in_features):
    return x.new_empty(*x.shape[:-1], planes.shape[2])
