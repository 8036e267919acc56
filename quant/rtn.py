"""Round-to-nearest (RTN) baseline: every weight independently to its group's grid (ALGORITHMS.md §1).

W_hat[:, j] = scale[:, g(j)] · (clamp(round(W[:, j] / scale) + zero, 0, 2^b − 1) − zero), g(j) = j // g.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from quant.grid import dequantize_codes, fit_group_grids, quantize_codes
from quant.hessian import check_finite, proxy_loss
from quant.mixed import check_group_bits, fit_mixed_group_grids
from quant.precision import exact
from quant.types import GridConfig, QuantizedWeight

__all__ = ["quantize_rtn"]


@exact
def quantize_rtn(
    W: Tensor,
    cfg: GridConfig,
    H: Tensor | None = None,
    *,
    name: str = "layer",
    group_bits: Sequence[int] | Tensor | None = None,
) -> QuantizedWeight:
    """Quantize W [out, in] (any float dtype; computed in float32) with contiguous group grids.

    If H [in, in] is given, ``stats["proxy_loss"]`` = tr((Ŵ − W) H (Ŵ − W)ᵀ) in float64. ``group_bits``
    [n_groups]: group g on a ``group_bits[g]``-bit grid (``bits`` of the result is the widest).
    """
    if W.dim() != 2:
        raise ValueError(f"W for {name!r} must be 2-D [out, in], got {tuple(W.shape)}")
    W = W.to(torch.float32)
    n = W.shape[1]
    gs = cfg.effective_group_size(n)
    g = torch.arange(n, device=W.device) // gs
    if group_bits is None:
        bits = cfg.bits
        scales, zeros = fit_group_grids(W, cfg)
        q = quantize_codes(W, scales[:, g], zeros[:, g], cfg.bits)
    else:
        gb = check_group_bits(group_bits, cfg.n_groups(n), name)
        bits = int(gb.max())
        scales, zeros = fit_mixed_group_grids(W, cfg, gb)
        maxq = ((1 << gb.to(W.device)) - 1)[g].to(torch.float32)
        q = torch.minimum(quantize_codes(W, scales[:, g], zeros[:, g], bits), maxq)
    stats: dict[str, float] = {}
    if H is not None:
        if H.shape != (n, n):
            raise ValueError(f"H for {name!r} must be [{n}, {n}], got {tuple(H.shape)}")
        check_finite(H, name)
        stats["proxy_loss"] = proxy_loss(W, dequantize_codes(q, scales[:, g], zeros[:, g]), H)
    codes = q.to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs, stats=stats)
