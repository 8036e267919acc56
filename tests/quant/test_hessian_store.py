"""Compact Hessian storage: upper triangle round trip, exact symmetry, and its error against the fp64 sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.hessian_store import pack_upper, triangle_size, unpack_upper
from tests.quant.reference import random_spd


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600))
def test_round_trip_is_exact_in_float64(n: int) -> None:
    A = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    H = A + A.T
    packed = pack_upper(H, torch.float64)
    assert packed.numel() == triangle_size(n)
    back = unpack_upper(packed, n)
    assert torch.equal(back, H)
    assert torch.equal(back, back.T)


def test_float32_storage_is_symmetric_and_close() -> None:
    H = random_spd(300, 0) * 5000.0
    back = unpack_upper(pack_upper(H), 300)
    assert back.dtype == torch.float64 and torch.equal(back, back.T)
    assert torch.equal(back, H.to(torch.float32).to(torch.float64))  # exactly the fp32 rounding of each entry
    assert ((back - H).abs() / H.abs().clamp_min(1e-30)).max() <= 2.0**-24


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        pack_upper(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="needs 6 entries"):
        unpack_upper(torch.zeros(5), 3)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 200), st.integers(0, 18), st.integers(0, 2**31 - 1))
def test_held_hessian_from_the_stored_triangle_is_the_one_from_the_float64_sum(
    n: int, log2_tokens: int, seed: int
) -> None:
    """Why whole-build perplexity does not move with compact storage (RESULTS.md, "Compact Hessian artifacts"):
    the quantize stage holds H in float32 (``HELD_DTYPE``), and with a power-of-two token count the 2/n scaling is
    exact, so rounding the sum to float32 before scaling gives the very bits that rounding after it does."""
    from quant.hessian import HELD_DTYPE, finalize

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n + 1, dtype=torch.float64, generator=g) * torch.rand(n, 1, dtype=torch.float64, generator=g)
    S = X @ X.T
    tokens = 2**log2_tokens
    stored = unpack_upper(pack_upper(S), n)
    assert torch.equal(finalize(stored, tokens, dtype=HELD_DTYPE), finalize(S, tokens, dtype=HELD_DTYPE))
    # Any other count rounds twice: |difference| ≤ 2⁻²⁴ (store) + 2⁻²⁴ (scale) + 2⁻²⁴ (the reference's own rounding).
    other = finalize(stored, 3 * tokens, dtype=HELD_DTYPE).double()
    exact = finalize(S, 3 * tokens, dtype=HELD_DTYPE).double()
    assert torch.all((other - exact).abs() <= exact.abs() * 1.5 * 2.0**-23 * (1 + 2.0**-20))
