"""Round-to-nearest (RTN) baseline: every weight independently to its group's grid (ALGORITHMS.md §1).

W_hat[:, j] = scale[:, g(j)] · (clamp(round(W[:, j] / scale) + zero, 0, 2^b − 1) − zero), g(j) = j // g.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.grid import dequantize_codes, fit_group_grids, quantize_codes
from quant.hessian import check_finite, proxy_loss
from quant.types import GridConfig, QuantizedWeight

__all__ = ["quantize_rtn"]


def quantize_rtn(W: Tensor, cfg: GridConfig, H: Tensor | None = None, *, name: str = "layer") -> QuantizedWeight:
    """Quantize W [out, in] (any float dtype; computed in float32) with contiguous group grids.

    If H [in, in] is given, ``stats["proxy_loss"]`` = tr((Ŵ − W) H (Ŵ − W)ᵀ) in float64.
    """
    if W.dim() != 2:
        raise ValueError(f"W for {name!r} must be 2-D [out, in], got {tuple(W.shape)}")
    W = W.to(torch.float32)
    n = W.shape[1]
    gs = cfg.effective_group_size(n)
    scales, zeros = fit_group_grids(W, cfg)
    g = torch.arange(n, device=W.device) // gs
    q = quantize_codes(W, scales[:, g], zeros[:, g], cfg.bits)
    stats: dict[str, float] = {}
    if H is not None:
        if H.shape != (n, n):
            raise ValueError(f"H for {name!r} must be [{n}, {n}], got {tuple(H.shape)}")
        check_finite(H, name)
        stats["proxy_loss"] = proxy_loss(W, dequantize_codes(q, scales[:, g], zeros[:, g]), H)
    codes = q.to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=cfg.bits, group_size=gs, stats=stats)
