"""Slow, obvious references for the quantizer core: Python loops over rows, groups and elements, with numpy
scalars standing in for float32 arithmetic (each numpy float32 op is correctly rounded, like torch's)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from quant.grid import MSE_CLIP_FACTORS, MSE_NORM
from quant.types import GridConfig

F32 = np.float32
TINY = np.finfo(np.float32).tiny


def ref_grid(w: list[float], bits: int, sym: bool, mse_clip: bool) -> tuple[np.float32, np.float32]:
    """(scale, zero) for one row of one group, exactly as documented in quant/grid.py."""
    v = [F32(x) for x in w]
    maxq = 2**bits - 1
    if sym:
        hi = max(abs(x) for x in v)
        lo = -hi
    else:
        lo, hi = min(min(v), F32(0)), max(max(v), F32(0))

    def from_range(lo: np.float32, hi: np.float32) -> tuple[np.float32, np.float32]:
        if sym:
            scale = hi / F32(2 ** (bits - 1) - 1)
            scale = scale if scale >= TINY else F32(1)
            return scale, F32(2 ** (bits - 1))
        scale = (hi - lo) / F32(maxq)
        scale = scale if scale >= TINY else F32(1)
        return scale, F32(min(max(round(float(-lo / scale)), 0), maxq))

    def error(scale: np.float32, zero: np.float32) -> float:
        return sum(
            abs(float(x) - float(ref_dequant(ref_code(x, scale, zero, bits), scale, zero))) ** MSE_NORM for x in v
        )

    scale, zero = from_range(lo, hi)
    if mse_clip:
        best = error(scale, zero)
        for p in MSE_CLIP_FACTORS[1:]:
            s, z = from_range(lo * F32(p), hi * F32(p))
            e = error(s, z)
            if e < best:
                best, scale, zero = e, s, z
    return scale, zero


def ref_code(x: float, scale: np.float32, zero: np.float32, bits: int) -> int:
    """clamp(round(x / scale) + zero, 0, 2^b − 1); float32 division for float32 x, float64 otherwise."""
    r = x / scale if isinstance(x, np.float32) else float(x) / float(scale)
    return min(max(round(float(r)) + int(zero), 0), 2**bits - 1)


def ref_dequant(code: int, scale: np.float32, zero: np.float32) -> np.float32:
    return scale * (F32(code) - zero)


def ref_rtn(W: Tensor, cfg: GridConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(codes int64 [m, n], scales [m, G], zeros [m, G]) by loops over rows, groups and elements."""
    m, n = W.shape
    gs = n if cfg.group_size <= 0 else cfg.group_size
    G = math.ceil(n / gs)
    Wl = W.to(torch.float32).tolist()
    codes = [[0] * n for _ in range(m)]
    scales = [[0.0] * G for _ in range(m)]
    zeros = [[0.0] * G for _ in range(m)]
    for r in range(m):
        for g in range(G):
            cols = range(g * gs, min((g + 1) * gs, n))
            s, z = ref_grid([Wl[r][j] for j in cols], cfg.bits, cfg.sym, cfg.mse_clip)
            scales[r][g], zeros[r][g] = float(s), float(z)
            for j in cols:
                codes[r][j] = ref_code(F32(Wl[r][j]), s, z, cfg.bits)
    return torch.tensor(codes), torch.tensor(scales), torch.tensor(zeros)


def ref_obq(W: Tensor, H: Tensor, cfg: GridConfig, damp: float, static_groups: bool) -> Tensor:
    """GPTQ without act-order in the original OBQ form (float64, explicit inverse, rank-1 downdates).

    For j = 0..n−1: q_j = Q(w_j); W[:, j+1:] −= (w_j − q_j) Hinv[j, j+1:] / Hinv[j, j];
    Hinv −= Hinv[:, j] Hinv[j, :] / Hinv[j, j]. Returns int64 codes [m, n].
    """
    m, n = W.shape
    gs = n if cfg.group_size <= 0 else cfg.group_size
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    for i in range(n):
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    grids: dict[tuple[int, int], tuple[np.float32, np.float32]] = {}

    def fit(g: int) -> None:
        cols = range(g * gs, min((g + 1) * gs, n))
        for r in range(m):
            grids[r, g] = ref_grid([float(W[r, j]) for j in cols], cfg.bits, cfg.sym, cfg.mse_clip)

    if static_groups:
        for g in range(math.ceil(n / gs)):
            fit(g)
    codes = torch.zeros(m, n, dtype=torch.int64)
    for j in range(n):
        if not static_groups and j % gs == 0:
            fit(j // gs)
        q = torch.zeros(m, dtype=torch.float64)
        for r in range(m):
            s, z = grids[r, j // gs]
            codes[r, j] = ref_code(float(W[r, j]), s, z, cfg.bits)
            q[r] = float(ref_dequant(int(codes[r, j]), s, z))
        err = W[:, j] - q
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :] / Hinv[j, j]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return codes


def random_spd(n: int, seed: int, n_tokens: int | None = None, eps: float = 1e-3) -> Tensor:
    """H = 2/N XᵀX + εI (float64) with correlated columns, so error feedback matters."""
    gen = torch.Generator().manual_seed(seed)
    N = n_tokens or 4 * n
    X = torch.randn(N, n, generator=gen, dtype=torch.float64)
    X = X @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64))
    return 2.0 / N * X.T @ X + eps * torch.eye(n, dtype=torch.float64)


def random_weight(m: int, n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 10_000)
    return torch.randn(m, n, generator=gen) * 0.05
