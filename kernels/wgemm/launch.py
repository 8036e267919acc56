"""Launcher for the weight-only GEMM: validate, pick a config, launch; plus the ``quantpipe::wgemm`` op.

    y = wgemm(x, qweight, scales, zeros, g_idx, bits, group_size, in_features, bias=None)
      x [..., K] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1) -> y [..., N] in x's dtype
      qweight int32 [ceil(K/P), N], scales/zeros fp16 [G, N], g_idx int32 [K] or None (``kernels.packing``)

Supported: bits 2/3/4/8; sym/asym (zeros are data); any group size, including a ragged last group and
act-order g_idx (scales gathered per column, no reordering); any M (tuned for M <= 256). Config: explicit
``config`` > ``tuned`` table entry for this GPU/shape > ``default_config`` heuristic.
Numerics: there is no fp16 accumulation. Weights are dequantized exactly in fp32, cast to x's dtype (as the
reference does before ``F.linear``), multiplied with fp32 accumulation (``tl.dot(..., out_dtype=fp32)`` or an
fp32 multiply-reduce), split-K partials are summed in fp32, and the result is rounded to x's dtype once. Measured
max relative error vs the reference (interpreter): fp32 ~3e-7, fp16 ~9e-4, bf16 ~1.2e-2 (bf16's 8-bit mantissa).
Unsupported combinations: bit widths other than 2/3/4/8 are refused at pack time; other cases make
``kernel_unsupported_reason`` non-None, and ``QuantLinear`` then uses the reference with a one-time warning.
Importing this module does not import triton; it registers the ``quantpipe::wgemm`` custom op (+ fake impl).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._gemm_launch import (
    SUPPORTED_DTYPES,
    check_bias,
    check_qweight,
    check_x,
    finish,
    gpu_name,
    plan_gemm,
)
from kernels._triton_util import device_sm_count, is_interpreted, triton_available
from kernels.packing import SUPPORTED_BITS, codes_per_word, num_groups, packed_rows
from kernels.wgemm.configs import TunedConfigs, WGemmConfig, candidate_configs

__all__ = ["SUPPORTED_DTYPES", "kernel_unsupported_reason", "tune", "wgemm", "wgemm_op"]


def _kernel():
    from kernels.wgemm.triton import wgemm_kernel

    return wgemm_kernel


def kernel_unsupported_reason(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> str | None:
    """None if the Triton kernel can run this call, else a short reason (used for fallbacks/warnings)."""
    if not triton_available():
        return "triton is not installed"
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit weights"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"activation dtype {x.dtype}"
    if scales.dtype not in SUPPORTED_DTYPES or zeros.dtype not in SUPPORTED_DTYPES:
        return f"scale/zero dtype {scales.dtype}/{zeros.dtype}"
    devices = {t.device for t in (x, qweight, scales, zeros) + ((g_idx,) if g_idx is not None else ())}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    if x.device.type != "cuda" and not is_interpreted(_kernel()):
        return f"device {x.device.type} (needs CUDA, or TRITON_INTERPRET=1 when kernels.wgemm.triton is imported)"
    return None


def _validate(x, qweight, scales, zeros, g_idx, bits, group_size, in_features, bias) -> int:
    K = in_features
    check_x(x, K)
    N = check_qweight(qweight, K, bits)
    G = num_groups(K, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (G, N):
            raise ValueError(f"{name} must be [G={G}, N={N}], got {tuple(t.shape)}")
    if g_idx is not None and (tuple(g_idx.shape) != (K,) or g_idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"g_idx must be int32 [{K}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    check_bias(bias, N)
    return N


def wgemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: Tensor | None = None,
    *,
    config: WGemmConfig | None = None,
    tuned: TunedConfigs | None = None,
) -> Tensor:
    """y [..., N] = x [..., K] @ W_hat.T (+ bias) with the Triton kernel (see module docstring)."""
    reason = kernel_unsupported_reason(x, qweight, scales, zeros, g_idx, bits, group_size, in_features)
    if reason is not None:
        raise RuntimeError(f"wgemm Triton kernel unsupported: {reason}")
    group_size = in_features if group_size <= 0 else group_size
    N = _validate(x, qweight, scales, zeros, g_idx, bits, group_size, in_features, bias)
    K = in_features
    plan = plan_gemm(x, N, K, group_size, bits, bias is not None, config, tuned)
    if plan.M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    x2 = plan.x2
    kernel = _kernel()
    kernel[plan.grid](
        x2,
        qweight,
        scales,
        zeros,
        g_idx if g_idx is not None else qweight,  # dummy pointer when unused
        *plan.io_args(bias, qweight, K, group_size),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        *plan.out_strides,
        BITS=bits,
        PACK=codes_per_word(bits),
        HAS_GIDX=g_idx is not None,
        GROUP_PER_TILE=g_idx is None and group_size % plan.cfg.block_k == 0,
        **plan.launch_meta(kernel),
    )
    return finish(plan, x, bias)


def tune(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    *,
    act_order: bool = False,
    dtype: torch.dtype = torch.float16,
    device: str = "cuda",
    table: TunedConfigs | None = None,
) -> TunedConfigs:
    """Time ``candidate_configs`` on random packed data (CUDA only) and record the fastest in ``table``."""
    from triton.testing import do_bench

    dev = torch.device(device)
    G = num_groups(K, group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (packed_rows(K, bits), N), dtype=torch.int32, device=dev)
    scales = torch.rand(G, N, device=dev, dtype=torch.float16) * 0.01
    zeros = torch.full((G, N), float(1 << (bits - 1)), device=dev, dtype=torch.float16)
    g_idx = (torch.arange(K, device=dev) // group_size).to(torch.int32) if act_order else None
    x = torch.randn(M, K, device=dev, dtype=dtype)
    best: tuple[float, WGemmConfig] | None = None
    for cfg in candidate_configs(M, N, K, group_size, bits, device_sm_count(dev)):
        ms = do_bench(lambda c=cfg: wgemm(x, qweight, scales, zeros, g_idx, bits, group_size, K, config=c))
        if best is None or ms < best[0]:
            best = (ms, cfg)
    table = table if table is not None else TunedConfigs({})
    if best is not None:
        from kernels.wgemm.configs import tune_key

        table.table[tune_key(gpu_name(dev), M, N, K, group_size, bits)] = best[1]
    return table


@torch.library.custom_op(
    "quantpipe::wgemm",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? g_idx, Tensor? bias, "
    "int bits, int group_size, int in_features) -> Tensor",
)
def wgemm_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``torch.ops.quantpipe.wgemm``: the kernel when supported, else the reference (opaque to compile)."""
    args = (x, qweight, scales, zeros, g_idx, bits, group_size, in_features)
    if kernel_unsupported_reason(*args) is None:
        return wgemm(*args, bias=bias)
    from kernels.wgemm.ref import wgemm_ref

    return wgemm_ref(*args, bias=bias)


@wgemm_op.register_fake
def _wgemm_fake(x, qweight, scales, zeros, g_idx, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])
