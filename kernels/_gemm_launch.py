"""Launch plumbing shared by the coded-weight GEMM launchers (``kernels.bcq``, ``kernels.icq``).

Both kernels walk K like ``kernels.wgemm`` (same ``WGemmConfig`` block shapes, same heuristic, same split-K
scheme), so the config choice, the split-K plan, the output buffer and the final reduction live here once:
split == 1 writes y in x's dtype with the bias fused; split > 1 writes fp32 partials [split, M, N] that
``finish`` sums deterministically (bias added once, in fp32) before the single rounding to x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels._triton_util import device_sm_count
from kernels.wgemm.configs import WGemmConfig, default_config

__all__ = ["SUPPORTED_DTYPES", "GemmPlan", "cdiv", "finish", "plan_gemm"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmPlan:
    """One launch: x as [M, K], the config, the K range per split, the output buffer and its strides."""

    x2: Tensor
    M: int
    N: int
    cfg: WGemmConfig
    k_per_split: int
    split: int
    out: Tensor
    fuse_bias: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        return (cdiv(self.M, self.cfg.block_m), cdiv(self.N, self.cfg.block_n), self.split)

    @property
    def out_strides(self) -> tuple[int, int, int]:
        """(split, m, n) strides of ``out``; split stride 0 when there is a single slice."""
        o = self.out
        return (o.stride(0), o.stride(1), o.stride(2)) if self.split > 1 else (0, o.stride(0), o.stride(1))


def plan_gemm(
    x: Tensor, N: int, K: int, group_size: int, bits: int, has_bias: bool, config: WGemmConfig | None
) -> GemmPlan:
    """Config (explicit, else ``default_config``), split-K plan and output buffer for y = x @ Ŵᵀ."""
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = config or default_config(max(M, 1), N, K, group_size, bits, device_sm_count(x.device))
    bk = cfg.block_k
    k_per_split = cdiv(cdiv(K, cfg.split_k), bk) * bk  # K range of one split, a multiple of BLOCK_K
    split = cdiv(K, k_per_split)
    if split == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    else:
        out = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    return GemmPlan(x2, M, N, cfg, k_per_split, split, out, has_bias and split == 1)


def finish(plan: GemmPlan, x: Tensor, bias: Tensor | None) -> Tensor:
    """y [..., N] in x's dtype: reduce split-K partials (and add the bias) when the kernel did not."""
    out = plan.out
    if plan.split > 1:
        y = out.sum(0)
        if bias is not None:
            y = y + bias.to(torch.float32)
        out = y.to(x.dtype)
    return out.view(*x.shape[:-1], plan.N)
