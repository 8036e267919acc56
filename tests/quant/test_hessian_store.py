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
