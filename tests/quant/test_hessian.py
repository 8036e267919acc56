"""Hessian accumulation, normalisation and the shared damping helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.hessian import (
    HESSIAN_DTYPE,
    accumulate,
    add_damping,
    check_finite,
    damp_schedule,
    finalize,
    fix_dead_inputs,
    proxy_loss,
)


def test_accumulate_matches_float64_gram_over_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 37, 24, generator=gen).to(torch.bfloat16) for _ in range(5)]
    H, n = None, 0
    for x in chunks:
        H, n = accumulate(H, n, x)
    X = torch.cat([c.reshape(-1, 24) for c in chunks]).to(torch.float64)
    assert H is not None and H.dtype == HESSIAN_DTYPE and n == 5 * 2 * 37
    torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-5)  # float32 per-chunk GEMM
    torch.testing.assert_close(finalize(H, n), 2.0 / n * X.T @ X, rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 19), tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_block_triangle_gram_is_the_full_symmetric_gram(d: int, tokens: int, seed: int) -> None:
    """Any width (fewer columns than panels included): every entry of Xᵀ X; off-diagonal panels exactly symmetric."""
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))
    H, _ = accumulate(None, 0, x)
    X = x.to(torch.float64)
    torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-5)
    panel = torch.tensor([next(i for i in range(4) if c < round((i + 1) * d / 4)) for c in range(d)])
    across = panel[:, None] != panel[None, :]  # entries of off-diagonal panels are mirrored copies
    assert torch.equal(H[across], H.T[across])


def test_accumulate_is_mergeable() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 8, generator=gen), torch.randn(30, 8, generator=gen)
    Ha, na = accumulate(None, 0, a)
    Hb, nb = accumulate(None, 0, b)
    Hab, nab = accumulate(None, 0, torch.cat([a, b]))
    assert na + nb == nab
    torch.testing.assert_close(Ha + Hb, Hab, rtol=1e-6, atol=1e-6)


def test_accumulate_rejects_wrong_accumulator() -> None:
    with pytest.raises(ValueError, match="accumulator must be"):
        accumulate(torch.zeros(8, 8, dtype=torch.float32), 0, torch.randn(3, 8))


def test_finalize_rejects_no_tokens() -> None:
    with pytest.raises(ValueError, match="from 0 tokens"):
        finalize(torch.zeros(3, 3, dtype=torch.float64), 0)


def test_check_finite_names_layer() -> None:
    H = torch.eye(3, dtype=torch.float64)
    check_finite(H, "ok")
    H[1, 2] = float("nan")
    msg = "Hessian for 'model.layers.3.mlp.down_proj' has NaN/Inf entries; recollect Hessians"
    with pytest.raises(ValueError, match=msg):
        check_finite(H, "model.layers.3.mlp.down_proj")
    wide = torch.zeros(2500, 4, dtype=torch.float64)  # rows are checked in bands: one past the first two
    check_finite(wide, "ok")
    wide[2499, 3] = float("-inf")
    with pytest.raises(ValueError, match="'wide' has NaN/Inf"):
        check_finite(wide, "wide")


def test_damping_helpers() -> None:
    assert damp_schedule(0.01, 1.0) == pytest.approx([0.01, 0.1, 1.0])
    assert damp_schedule(0.05, 1.0) == pytest.approx([0.05, 0.5, 1.0])
    assert damp_schedule(0.1, 0.1) == [0.1]
    H = torch.diag(torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64))
    Hf, dead = fix_dead_inputs(H)
    assert dead.tolist() == [False, False, True] and Hf[2, 2] == 1 and H[2, 2] == 0
    assert torch.diagonal(add_damping(Hf, 0.1)).tolist() == pytest.approx([1 + 5 / 30, 3 + 5 / 30, 1 + 5 / 30])


def test_proxy_loss_is_trace_form() -> None:
    gen = torch.Generator().manual_seed(2)
    W, W_hat = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    X = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    H = X.T @ X
    D = W_hat.double() - W.double()
    assert proxy_loss(W, W_hat, H) == pytest.approx(float(torch.trace(D @ H @ D.T)), rel=1e-12)


def test_gram_is_float32_under_bf16_autocast() -> None:
    """A bf16 autocast forward must not round the Gram products to bf16 (H would keep 8 mantissa bits)."""
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H, _ = accumulate(None, 0, x)
    X = x.to(torch.float64)
    torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-5)


def test_bf16_and_float32_activations_both_get_a_float32_accurate_gram() -> None:
    """bf16 inputs (large enough for oneDNN's GEMM) get float32-accurate products and the process-wide bf16 GEMM
    switch is back to what it was afterwards; a float32 Gram next to it keeps float32 operands (bf16 ones would
    be ~1e-4 relative here, ten times the tolerance)."""
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(2, 512, 320, generator=gen).to(torch.bfloat16)
    H, _ = accumulate(None, 0, xb)
    X = xb.reshape(-1, 320).to(torch.float64)
    ref = X.T @ X
    assert (H - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert mm.fp32_precision == before
    xf = torch.randn(1024, 320, generator=gen) * (1 + 1e-3 * torch.rand(1024, 320, generator=gen))
    Hf, _ = accumulate(None, 0, xf)
    Xf = xf.to(torch.float64)
    reff = Xf.T @ Xf
    assert (Hf - reff).abs().max() <= 1e-5 * reff.abs().max()


def test_in_place_finalize_and_panelled_proxy_loss_match_the_plain_forms() -> None:
    """finalize(in_place=True) gives the same bits as the copying form; proxy_loss in panels equals the one-shot
    tr(Δ H Δᵀ) to float64 rounding (panels smaller than the matrix, so the loop really runs)."""
    from quant.hessian import finalize, proxy_loss

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 70, generator=g, dtype=torch.float64)
    H_sum = X.T @ X
    copy = finalize(H_sum, 300)
    assert torch.equal(finalize(H_sum.clone(), 300, in_place=True), copy)
    W = torch.randn(45, 70, generator=g)
    W_hat = W + 0.01 * torch.randn(45, 70, generator=g)
    D = W_hat.double() - W.double()
    plain = float(((D @ copy) * D).sum())
    assert proxy_loss(W, W_hat, copy, panel=16) == pytest.approx(plain, rel=1e-12)
    assert proxy_loss(W, W_hat, copy.float(), panel=16) == pytest.approx(plain, rel=1e-6)
