"""The shared scalar quantizer (ALGORITHMS.md §1), in the style of torchao ``quantize_affine``.

One affine grid per row of a column block:  q = clamp(round(w / scale) + zero, 0, 2^b − 1),
ŵ = scale · (q − zero).  ``torch.round`` (round half to even) everywhere; grids are fitted in float32.

Conventions:
- Asymmetric: range [min(w, 0), max(w, 0)] (always contains 0), scale = (max − min)/(2^b − 1),
  zero = round(−min/scale) ∈ [0, 2^b − 1], so w = 0 maps exactly to code ``zero`` and back to 0.
- Symmetric: zero = 2^(b−1) (fixed), scale = max|w| / (2^(b−1) − 1), so ±max|w| are both exactly on the
  grid and every |w| ≤ max|w| is within scale/2 of a grid point; code 0 (= −2^(b−1)·scale) is valid but
  never needed by the fit.
- ``scale_mode="rms"`` (symmetric): the range is max|w| → RMS_CLIP·RMS(w)·(2^(b−1) − 1)/2^(b−1), i.e.
  scale = RMS_CLIP·RMS(w)/2^(b−1) (QuIP's grid for incoherent, ~Gaussian weights; close to the MSE-optimal
  uniform step: 2 bits 1.2σ, 3 bits 0.6σ, 4 bits 0.3σ). A ragged last group's zero padding counts in its RMS.
- Degenerate rows (all zero, or a range so small that scale < float32 tiny) get scale = 1, which
  never divides by zero and still quantizes every element within scale/2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant.types import GridConfig

__all__ = [
    "MSE_CLIP_FACTORS",
    "MSE_NORM",
    "GRID_DTYPE",
    "RMS_CLIP",
    "dequantize_codes",
    "fit_grid",
    "fit_group_grids",
    "quantize_codes",
]

GRID_DTYPE = torch.float32
MSE_NORM = 2.4
RMS_CLIP = 2.4  # scale_mode="rms": grid range ±RMS_CLIP·RMS(w)
# Range-shrink factors for the MSE clip search: 1.0, 0.975, ..., 0.5 (21 candidates; 1.0 first, so the
# search never does worse than no clipping and ties keep the unclipped grid).
MSE_CLIP_FACTORS: tuple[float, ...] = tuple(1.0 - i / 40 for i in range(21))

_TINY = torch.finfo(GRID_DTYPE).tiny


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / scale) + zero, 0, 2^bits − 1).

    ``scale``/``zero`` broadcast against ``w``. Computed in the wider of ``w.dtype`` and float32; returns
    integer-valued codes in that float dtype (cast to uint8 for storage).
    """
    dtype = torch.promote_types(w.dtype, GRID_DTYPE)
    q = torch.round(w.to(dtype) / scale.to(dtype)) + zero.to(dtype)
    return q.clamp_(0, (1 << bits) - 1)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """ŵ = scale · (q − zero), in the wider of ``scale.dtype`` and float32 (same op order as QuantizedWeight)."""
    dtype = torch.promote_types(scale.dtype, GRID_DTYPE)
    return scale.to(dtype) * (codes.to(dtype) - zero.to(dtype))


_FP16_MIN_NORMAL = 6.103515625e-05
_FP16_MAX = 65504.0


def _round_scale(scale: Tensor, scale_dtype: str) -> Tensor:
    """Scales as stored: fp16-rounded (within fp16's normal range) when the packed format keeps fp16 scales."""
    if scale_dtype in ("float16", "float16_min"):
        scale = scale.clamp(_FP16_MIN_NORMAL, _FP16_MAX).to(torch.float16).to(GRID_DTYPE)
    return scale


def _fp16_exact(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(GRID_DTYPE) == x


def _round_significand(x: Tensor, keep: Tensor) -> Tensor:
    """x (> 0) rounded to ``keep`` significant bits (round half to even on the significand)."""
    m, e = torch.frexp(x)  # x = m·2^e, m ∈ [0.5, 1)
    step = torch.ldexp(torch.ones_like(m), keep.to(torch.int32))
    return torch.ldexp(torch.round(m * step) / step, e)


def _fp16_min_grid(scale: Tensor, zero: Tensor, wmin: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``scale_dtype="float16_min"``: fp16 scales whose grid minimum −scale·zero is an fp16 number too.

    llama.cpp's Q4_1 stores ``d`` and ``m = −scale·zero`` as fp16 and decodes ``q·d + m``, so a grid is exact
    there only when that product is. An fp16 scale has 11 significant bits; the product has up to
    ``11 + bitlen(odd part of zero)``. Where it does not fit, the scale keeps ``11 − bitlen(odd part of zero)``
    bits (round to nearest, zero recomputed); where the new zero still does not fit, it keeps ``11 − bits``,
    which fits every zero in 0..2^bits − 1. Grids whose product already fits are unchanged.
    """
    maxq = (1 << bits) - 1

    def refit(bad: Tensor, keep: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        scale = torch.where(bad, _round_significand(scale, keep), scale)
        return scale, torch.where(bad, torch.round(-wmin / scale).clamp(0, maxq), zero)

    bad = ~_fp16_exact(scale * zero)
    if not bool(bad.any()):
        return scale, zero
    z = zero.to(torch.int64)
    odd = torch.where(z > 0, z // (z & -z), torch.ones_like(z))  # odd part of the zero point
    odd_bits = torch.floor(torch.log2(odd.to(torch.float64))).to(torch.int64) + 1
    scale, zero = refit(bad, 11 - odd_bits, scale, zero)
    bad = ~_fp16_exact(scale * zero)
    if bool(bad.any()):
        scale, zero = refit(bad, torch.full_like(z, 11 - bits), scale, zero)
        if not bool(_fp16_exact(scale * zero).all()):
            raise ValueError("float16_min: a grid minimum −scale·zero is outside fp16's range")
    return scale, zero


def _grid_from_range(
    wmin: Tensor, wmax: Tensor, bits: int, sym: bool, scale_dtype: str = "float32"
) -> tuple[Tensor, Tensor]:
    """(scale, zero) [rows] for ranges with wmin ≤ 0 ≤ wmax (symmetric uses wmax = max|w| only)."""
    maxq = (1 << bits) - 1
    if sym:
        half = 1 << (bits - 1)
        scale = wmax / (half - 1)
        scale = _round_scale(torch.where(scale >= _TINY, scale, torch.ones_like(scale)), scale_dtype)
        return scale, torch.full_like(scale, float(half))
    scale = (wmax - wmin) / maxq
    scale = _round_scale(torch.where(scale >= _TINY, scale, torch.ones_like(scale)), scale_dtype)
    zero = torch.round(-wmin / scale).clamp_(0, maxq)
    if scale_dtype == "float16_min":
        scale, zero = _fp16_min_grid(scale, zero, wmin, bits)
    return scale, zero


def _row_error(W: Tensor, scale: Tensor, zero: Tensor, bits: int, buf: Tensor) -> Tensor:
    """Σ_j |W[r, j] − ŵ[r, j]|^MSE_NORM per row r, [rows], for float32 W.

    The arithmetic of ``quantize_codes`` then ``dequantize_codes``, op for op, but in one reused buffer: a
    fresh tensor per op cost the search 3.6× the CPU time (page faults of new memory; bit-identical either way)."""
    s, z = scale[:, None], zero[:, None]
    torch.div(W, s, out=buf).round_().add_(z).clamp_(0, (1 << bits) - 1)  # codes
    buf.sub_(z).mul_(s)  # ŵ = scale · (q − zero)
    return buf.sub_(W).abs_().pow_(MSE_NORM).sum(dim=1)  # |ŵ − w| = |w − ŵ| exactly


def fit_grid(W: Tensor, cfg: GridConfig) -> tuple[Tensor, Tensor]:
    """Fit one grid per row over all columns of the block ``W`` [rows, cols] (any float dtype).

    Returns float32 (scale [rows], zero [rows]); zero is integer-valued. With ``cfg.mse_clip`` the range
    (min, max) → (p·min, p·max) for p in MSE_CLIP_FACTORS, keeping argmin_p Σ|w − ŵ|^2.4 per row.
    """
    if W.dim() != 2 or W.shape[1] == 0:
        raise ValueError(f"fit_grid expects a non-empty 2-D block [rows, cols], got {tuple(W.shape)}")
    W = W.to(GRID_DTYPE)
    if cfg.scale_mode == "rms":
        half = 1 << (cfg.bits - 1)
        wmax = RMS_CLIP * W.square().mean(dim=1).sqrt() * ((half - 1) / half)
        wmin = -wmax
    elif cfg.sym:
        wmax = W.abs().amax(dim=1)
        wmin = -wmax
    else:
        wmin = W.amin(dim=1).clamp(max=0.0)
        wmax = W.amax(dim=1).clamp(min=0.0)
    scale, zero = _grid_from_range(wmin, wmax, cfg.bits, cfg.sym, cfg.scale_dtype)
    if not cfg.mse_clip:
        return scale, zero
    buf = torch.empty_like(W)
    best = _row_error(W, scale, zero, cfg.bits, buf)
    for p in MSE_CLIP_FACTORS[1:]:
        s, z = _grid_from_range(p * wmin, p * wmax, cfg.bits, cfg.sym, cfg.scale_dtype)
        err = _row_error(W, s, z, cfg.bits, buf)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def fit_group_grids(W: Tensor, cfg: GridConfig) -> tuple[Tensor, Tensor]:
    """Grids for every (row, group) of contiguous columns of W [out, in], ragged last group included.

    Returns float32 (scales, zeros), each [out, n_groups] with n_groups = ceil(in / group_size).
    The last group is zero-padded to a full group before fitting all groups as rows at once: padding is
    exact because every range already contains 0 and 0 is quantized without error.
    """
    if W.dim() != 2:
        raise ValueError(f"fit_group_grids expects W [out, in], got {tuple(W.shape)}")
    out, n = W.shape
    gs = cfg.effective_group_size(n)
    G = cfg.n_groups(n)
    W = W.to(GRID_DTYPE)
    if G * gs != n:
        W = torch.nn.functional.pad(W, (0, G * gs - n))
    scale, zero = fit_grid(W.reshape(out * G, gs), cfg)
    return scale.reshape(out, G), zero.reshape(out, G)
