"""Synthetic quantizer outputs (the contract ``kernels`` consumes) for kernel tests."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Quantized(NamedTuple):
    codes: Tensor  # uint8 [N, K]
    scales: Tensor  # fp32 [N, G] (not fp16-representable on purpose)
    zeros: Tensor  # fp32 [N, G], integer-valued
    g_idx: Tensor | None  # int32 [K]
    bits: int
    group_size: int


def make_quantized(
    N: int, K: int, bits: int, group_size: int, *, act_order: bool = False, sym: bool = False, seed: int = 0
) -> Quantized:
    """Random codes/scales/zeros; ``act_order`` gives a permuted g_idx (each group still has g columns)."""
    gen = torch.Generator().manual_seed(seed)
    g = K if group_size <= 0 else group_size
    G = -(-K // g)
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (N, K), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 1e-3) * (1 + 1e-6 * torch.rand(N, G, generator=gen))
    if sym:
        zeros = torch.full((N, G), float(1 << (bits - 1)))
    else:
        zeros = torch.randint(0, qmax + 1, (N, G), generator=gen).to(torch.float32)
    g_idx = None
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
    return Quantized(codes, scales, zeros, g_idx, bits, group_size)


def explicit_dequant(q: Quantized) -> Tensor:
    """W_hat with fp16-rounded scales, written independently of kernels.packing (loop over groups)."""
    N, K = q.codes.shape
    g = K if q.group_size <= 0 else q.group_size
    s16 = q.scales.half().float()
    grp = q.g_idx.long() if q.g_idx is not None else torch.arange(K) // g
    W = torch.empty(N, K)
    for k in range(K):
        W[:, k] = s16[:, grp[k]] * (q.codes[:, k].float() - q.zeros[:, grp[k]])
    return W
