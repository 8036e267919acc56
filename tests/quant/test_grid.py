"""The shared affine grid: exact round trips, ranges, ragged groups, MSE clipping, properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.grid import MSE_NORM, dequantize_codes, fit_grid, fit_group_grids, quantize_codes
from quant.types import GridConfig

BITS = [2, 3, 4, 8]


def _expand(t: torch.Tensor, n: int, gs: int) -> torch.Tensor:
    return t[:, torch.arange(n) // gs]


@pytest.mark.parametrize(("bits", "sym"), list(itertools.product(BITS, [False, True])), ids=str)
def test_round_trip_exact_on_grid_points(bits: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    W = torch.randn(16, 96, generator=gen)
    scale, zero = fit_grid(W, GridConfig(bits=bits, sym=sym))
    codes = torch.randint(0, 2**bits, (16, 96), generator=gen).float()
    W_hat = dequantize_codes(codes, scale[:, None], zero[:, None])
    assert torch.equal(quantize_codes(W_hat, scale[:, None], zero[:, None], bits), codes)


@pytest.mark.parametrize(("bits", "sym"), list(itertools.product(BITS, [False, True])), ids=str)
def test_codes_in_range_and_zero_exact(bits: int, sym: bool) -> None:
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    W[1] = W[1].abs() + 1.0  # all-positive row: range is still extended to include 0
    W[:, 5] = 0.0
    scale, zero = fit_grid(W, GridConfig(bits=bits, sym=sym))
    q = quantize_codes(W, scale[:, None], zero[:, None], bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    assert torch.equal(q, q.round())
    assert torch.equal(zero, zero.round())
    W_hat = dequantize_codes(q, scale[:, None], zero[:, None])
    assert torch.all(W_hat[:, 5] == 0)
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
        # ±max|w| lie exactly on the grid
        amax = W.abs().amax(dim=1)
        assert torch.allclose(scale * (2 ** (bits - 1) - 1), amax, rtol=1e-6, atol=0)


def test_degenerate_rows_do_not_divide_by_zero() -> None:
    W = torch.zeros(3, 10)
    W[1, 3] = 1e-42  # subnormal range
    for sym in (False, True):
        scale, zero = fit_grid(W, GridConfig(bits=4, sym=sym))
        assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
        q = quantize_codes(W, scale[:, None], zero[:, None], 4)
        assert torch.equal(dequantize_codes(q, scale[:, None], zero[:, None]).abs().max(), torch.tensor(0.0))


def test_round_half_to_even() -> None:
    scale, zero = torch.tensor([1.0]), torch.tensor([4.0])
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert quantize_codes(w, scale, zero, 4).tolist() == [4.0, 6.0, 6.0, 4.0, 2.0]


def test_ragged_last_group_576_g128() -> None:
    W = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    cfg = GridConfig(bits=4, group_size=128)
    scales, zeros = fit_group_grids(W, cfg)
    assert scales.shape == zeros.shape == (4, 5)
    for g in range(5):
        s, z = fit_grid(W[:, g * 128 : (g + 1) * 128], cfg)
        assert torch.equal(scales[:, g], s) and torch.equal(zeros[:, g], z)


def test_per_channel_equals_whole_row_grid() -> None:
    W = torch.randn(5, 70, generator=torch.Generator().manual_seed(2))
    for gs in (-1, 0, 70, 500):
        scales, zeros = fit_group_grids(W, GridConfig(bits=3, group_size=gs))
        s, z = fit_grid(W, GridConfig(bits=3))
        assert scales.shape == (5, 1) and torch.equal(scales[:, 0], s) and torch.equal(zeros[:, 0], z)


def test_any_float_dtype_is_upcast() -> None:
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    cfg = GridConfig(bits=4, group_size=16)
    a = fit_group_grids(W, cfg)
    b = fit_group_grids(W.float(), cfg)
    assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _group_error(W: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """Σ |w − ŵ|^2.4 per (row, group), [out, n_groups]."""
    n = W.shape[1]
    gs = cfg.effective_group_size(n)
    scales, zeros = fit_group_grids(W, cfg)
    s, z = _expand(scales, n, gs), _expand(zeros, n, gs)
    err = (W - dequantize_codes(quantize_codes(W, s, z, cfg.bits), s, z)).abs() ** MSE_NORM
    return torch.stack([err[:, g * gs : (g + 1) * gs].sum(1) for g in range(cfg.n_groups(n))], dim=1)


@pytest.mark.parametrize(
    ("bits", "sym", "gs"), list(itertools.product([2, 3, 4], [False, True], [-1, 32, 48])), ids=str
)
def test_mse_clip_never_worse(bits: int, sym: bool, gs: int) -> None:
    gen = torch.Generator().manual_seed(bits * 7 + gs)
    W = torch.randn(32, 160, generator=gen) ** 3  # heavy tails: clipping pays off
    plain = _group_error(W, GridConfig(bits=bits, group_size=gs, sym=sym))
    clipped = _group_error(W, GridConfig(bits=bits, group_size=gs, sym=sym, mse_clip=True))
    assert torch.all(clipped <= plain * (1 + 1e-5))
    assert clipped.sum() < plain.sum()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 80),
    bits=st.integers(2, 8),
    group_size=st.sampled_from([-1, 0, 1, 3, 16, 33]),
    sym=st.booleans(),
    mse_clip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-20, 20),
)
def test_property_error_at_most_half_step(
    rows: int, cols: int, bits: int, group_size: int, sym: bool, mse_clip: bool, seed: int, log_scale: float
) -> None:
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    cfg = GridConfig(bits=bits, group_size=group_size, sym=sym, mse_clip=mse_clip)
    gs = cfg.effective_group_size(cols)
    scales, zeros = fit_group_grids(W, cfg)
    assert scales.shape == (rows, cfg.n_groups(cols))
    s, z = _expand(scales, cols, gs), _expand(zeros, cols, gs)
    q = quantize_codes(W, s, z, bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    W_hat = dequantize_codes(q, s, z)
    lo, hi = s * (0 - z) - s / 2, s * (2**bits - 1 - z) + s / 2
    in_range = (lo <= W) & (hi >= W)
    if not mse_clip:
        assert bool(in_range.all())
    err = (W - W_hat).abs()
    assert bool((err[in_range] <= (s[in_range] * (0.5 + 1e-5))).all())
