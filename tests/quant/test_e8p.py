"""E8P codebook (QuIP#) and block LDLQ: the codebook's lattice structure, exact nearest-point search against brute
force over all 65,536 codewords, and block LDLQ against the closed-form OBS update it implements."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.e8p import (
    RESID_SCALE,
    E8PConfig,
    E8PWeight,
    e8_residual_grid,
    e8_residual_nearest,
    e8p_abs_grid,
    e8p_codebook,
    e8p_decode,
    e8p_nearest,
    quantize_e8p_ldlq,
    row_scales,
)
from quant.hessian import add_damping
from tests.quant.reference import random_spd, random_weight

F64 = torch.float64


def test_codebook_is_65536_points_of_e8_shifted_by_a_quarter() -> None:
    cb = e8p_codebook()
    assert cb.shape == (65536, 8)
    assert torch.unique(cb, dim=0).shape[0] == 65536
    shift = torch.where((torch.arange(65536) >> 7) & 1 == 1, -0.25, 0.25)
    lattice = cb - shift[:, None]
    assert bool(((lattice * 2) % 2 == 1).all())  # half-odd entries ...
    assert bool((lattice.sum(-1) % 2 == 0).all())  # ... with an even sum: D8 + 1/2 ⊂ E8
    norms = lattice.pow(2).sum(-1)
    assert float(norms.max()) == 12.0 and float(norms.min()) == 2.0
    A = e8p_abs_grid()
    assert A.shape == (256, 8) and int((A.pow(2).sum(-1) == 12).sum()) == 29


def test_decode_reads_int16_indices_like_their_uint16_value() -> None:
    idx = torch.arange(65536)
    as16 = torch.where(idx >= 32768, idx - 65536, idx).to(torch.int16)
    assert torch.equal(e8p_decode(as16), e8p_codebook())


def _brute_force(x: torch.Tensor) -> torch.Tensor:
    cb = e8p_codebook().to(F64)
    d = (x.to(F64)[:, None, :] - cb[None]).pow(2).sum(-1)
    return d.min(-1).values


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.05, 4.0), n=st.integers(1, 300))
def test_nearest_point_matches_brute_force(seed: int, scale: float, n: int) -> None:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) * scale
    idx = e8p_nearest(x)
    got = (e8p_codebook()[idx].to(F64) - x.to(F64)).pow(2).sum(-1)
    torch.testing.assert_close(got, _brute_force(x), rtol=1e-6, atol=1e-6)


def test_nearest_point_of_a_codeword_is_itself() -> None:
    idx = torch.randint(0, 65536, (2000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(e8p_nearest(e8p_codebook()[idx]), idx)


def test_gaussian_mse_beats_the_best_scalar_two_bit_grid() -> None:
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    mse = float((e8p_codebook()[e8p_nearest(x * 1.03)] / 1.03 - x).pow(2).mean())
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5]) * 0.996  # Lloyd-optimal uniform 4-level step for N(0, 1)
    scalar = float((levels[(x[..., None] - levels).abs().argmin(-1)] - x).pow(2).mean())
    assert mse == pytest.approx(0.0912, abs=0.002)  # QuIP#: E8P at 2 bits
    assert scalar == pytest.approx(0.1193, abs=0.002)
    assert mse < 0.8 * scalar


def test_residual_codebook_is_256_points_of_e8() -> None:
    g = e8_residual_grid()
    assert g.shape == (256, 8) and torch.unique(g, dim=0).shape[0] == 256
    integer = (g == g.round()).all(-1)
    half = ((g * 2) % 2 == 1).all(-1)
    assert bool((integer | half).all()) and bool((g.sum(-1) % 2 == 0).all())  # E8: Z8 or Z8 + 1/2, even sum
    norms = g.pow(2).sum(-1)
    assert int((norms == 2).sum()) == 240 and int((norms == 0).sum()) == 1 and int((norms == 4).sum()) == 15


def test_residual_nearest_and_three_bit_gaussian_mse() -> None:
    r = torch.randn(5000, 8, generator=torch.Generator().manual_seed(2))
    d = (r[:, None, :] - e8_residual_grid()[None]).pow(2).sum(-1)
    torch.testing.assert_close(d.gather(1, e8_residual_nearest(r)[:, None]).squeeze(1), d.min(-1).values)
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    c1 = e8p_codebook()[e8p_nearest(x)]
    q = c1 + e8_residual_grid()[e8_residual_nearest((x - c1) * RESID_SCALE)] / RESID_SCALE
    mse = float((q - x).pow(2).mean())
    levels = (torch.arange(8) - 3.5) * 0.586  # best uniform 8-level step for N(0, 1)
    scalar = float((levels[(x[..., None] - levels).abs().argmin(-1)] - x).pow(2).mean())
    assert mse == pytest.approx(0.0296, abs=0.001) and scalar == pytest.approx(0.0377, abs=0.001)
    assert mse < 0.85 * scalar


def _round(v: torch.Tensor, bits: int) -> torch.Tensor:
    """The vector quantizer in codebook units: E8P, then (3 bits) the residual codebook."""
    c = e8p_codebook().to(F64)[e8p_nearest(v)]
    if bits == 3:
        c = c + e8_residual_grid().to(F64)[e8_residual_nearest((v - c) * RESID_SCALE)] / RESID_SCALE
    return c


def _obs_reference(
    W: torch.Tensor, H: torch.Tensor, damp: float, scale: float, bits: int = 2
) -> tuple[torch.Tensor, float]:
    """Blocks of 8 in order; after fixing each block, every later column takes its optimal value given the
    fixed ones: W_R* = W_R − (Q_F − W_F) H_FR H_RR⁻¹ (float64, the damped H)."""
    Hd = add_damping(H, damp)
    n = W.shape[1]
    s = row_scales(W, scale).to(F64)[:, None]
    W = W.to(F64)
    cur, Q = W.clone(), torch.zeros_like(W)
    for b in range(0, n, 8):
        Q[:, b : b + 8] = _round(cur[:, b : b + 8] / s, bits) * s
        F, R = slice(0, b + 8), slice(b + 8, n)
        if b + 8 < n:
            cur[:, R] = W[:, R] - (Q[:, F] - W[:, F]) @ Hd[F, R] @ torch.linalg.inv(Hd[R, R])
    D = Q - W
    return Q, float(((D @ Hd) * D).sum())


@pytest.mark.parametrize(("block_size", "bits"), [(8, 2), (32, 2), (128, 2), (32, 3)])
def test_block_ldlq_is_the_sequential_obs_update(block_size: int, bits: int) -> None:
    for seed in range(2):
        W, H = random_weight(24, 64, seed), random_spd(64, seed)
        q = quantize_e8p_ldlq(W, H, E8PConfig(block_size=block_size, bits=bits), sweep_dtype=F64)
        assert q.bits == bits and (q.codes2 is not None) == (bits == 3)
        Q_ref, loss_ref = _obs_reference(W, H, 0.01, E8PConfig().scale, bits)
        torch.testing.assert_close(q.dequantize(F64), Q_ref, rtol=0, atol=1e-6)
        assert q.stats["proxy_loss"] == pytest.approx(loss_ref, rel=1e-6)


def test_error_feedback_lowers_the_proxy_loss() -> None:
    W, H = random_weight(64, 128, 3), random_spd(128, 3)
    q = quantize_e8p_ldlq(W, H, E8PConfig())
    s = row_scales(W, E8PConfig().scale)[:, None]
    rounded = (e8p_codebook()[e8p_nearest((W / s).reshape(64, 16, 8))].reshape(64, 128) * s).to(F64)
    D = rounded - W.to(F64)
    plain = float(((D @ H) * D).sum())
    assert q.stats["proxy_loss_exact"] < 0.8 * plain  # measured 0.57×


def test_scales_are_fp16_exact_and_codes_int16() -> None:
    W, H = random_weight(16, 32, 4), random_spd(32, 4)
    q = quantize_e8p_ldlq(W, H, E8PConfig())
    assert q.codes.dtype == torch.int16 and q.codes.shape == (16, 4)
    assert torch.equal(q.scales.half().float(), q.scales)
    assert q.in_features == 32 and q.bits == 2


def test_dead_inputs_are_zero() -> None:
    W, H = random_weight(8, 32, 5), random_spd(32, 5)
    H[3, :] = 0
    H[:, 3] = 0
    q = quantize_e8p_ldlq(W, H, E8PConfig())
    assert q.stats["n_dead"] == 1.0


def test_bad_inputs_have_one_line_errors() -> None:
    H = random_spd(36, 0)
    with pytest.raises(ValueError, match=r"in_features=36 is not a multiple of 8; use a scalar method"):
        quantize_e8p_ldlq(random_weight(4, 36, 0), H, E8PConfig(), name="l")
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 8"):
        E8PConfig(block_size=12)
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_e8p_ldlq(random_weight(4, 32, 0), torch.full((32, 32), float("nan"), dtype=F64), E8PConfig())
    with pytest.raises(ValueError, match="int16"):
        E8PWeight(torch.zeros(2, 2, dtype=torch.int32), torch.ones(2))
    with pytest.raises(ValueError, match="vectors of 8, got last dim 4"):
        e8p_nearest(torch.zeros(3, 4))
