"""Group-wise mixed precision: per-group widths in the GPTQ/RTN sweeps and the split into per-width parts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.bitalloc import hessian_group_sensitivity, hessian_sensitivity
from quant.gptq import GPTQConfig, quantize_gptq
from quant.mixed import split_by_bits
from quant.rtn import quantize_rtn
from quant.types import GridConfig


def _problem(out: int = 12, n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=gen)
    X = torch.randn(200, n, generator=gen) * torch.rand(n, generator=gen) * 3
    return W, (X.T @ X).double() / 200


def _grid(bits: int = 4, group_size: int = 8, sym: bool = False) -> GridConfig:
    return GridConfig(bits=bits, group_size=group_size, sym=sym, scale_dtype="float16")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_group_bits_is_plain_gptq(bits: int) -> None:
    W, H = _problem()
    cfg = GPTQConfig(grid=_grid(bits), act_order=True, static_groups=True, block_size=16)
    ref = quantize_gptq(W, H, cfg)
    got = quantize_gptq(W, H, cfg, group_bits=[bits] * 5)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales) and got.bits == bits


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_group_bits_is_rtn_of_each_group_alone(sym: bool) -> None:
    """Grids are per (row, group): each group at its own width equals RTN of that group's columns alone."""
    W, _ = _problem(n=36)  # ragged last group of 4
    gb = [2, 4, 3, 2, 8]
    q = quantize_rtn(W, _grid(sym=sym), group_bits=gb)
    assert q.bits == 8
    for g, b in enumerate(gb):
        cols = slice(8 * g, min(8 * g + 8, 36))
        ref = quantize_rtn(W[:, cols], _grid(bits=b, sym=sym))
        assert torch.equal(q.codes[:, cols], ref.codes)
        assert torch.equal(q.scales[:, g], ref.scales[:, 0]) and torch.equal(q.zeros[:, g], ref.zeros[:, 0])


def test_gptq_with_diagonal_hessian_is_rtn_at_the_same_widths() -> None:
    """A diagonal H leaves nothing to compensate: GPTQ rounds like RTN, group widths included."""
    W, _ = _problem(n=32)
    H = torch.diag(torch.rand(32, dtype=torch.float64) + 0.5)
    gb = [3, 2, 4, 2]
    g = quantize_gptq(W, H, GPTQConfig(grid=_grid(), act_order=True, static_groups=True), group_bits=gb)
    r = quantize_rtn(W, _grid(), group_bits=gb)
    assert torch.equal(g.codes, r.codes)


def test_more_bits_where_it_matters_lowers_the_proxy_loss() -> None:
    W, H = _problem(seed=3)
    cfg = GPTQConfig(grid=_grid(), act_order=True, static_groups=True)
    losses = [quantize_gptq(W, H, cfg, group_bits=gb).stats["proxy_loss_exact"] for gb in ([2] * 5, [3] * 5, [4] * 5)]
    mixed = quantize_gptq(W, H, cfg, group_bits=[3, 3, 3, 3, 2]).stats["proxy_loss_exact"]
    assert losses[0] > mixed > losses[1] > losses[2]


@settings(max_examples=30, deadline=None)
@given(
    gb=st.lists(st.sampled_from([2, 3, 4, 8]), min_size=1, max_size=6),
    ragged=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_split_parts_put_back_are_the_weight(gb: list[int], ragged: int, seed: int) -> None:
    n = 8 * len(gb) - (ragged if len(gb) > 1 else 0)
    W = torch.randn(6, n, generator=torch.Generator().manual_seed(seed))
    q = quantize_rtn(W, _grid(), group_bits=gb)
    m = split_by_bits(q, torch.tensor(gb))
    assert torch.equal(m.dequantize(), q.dequantize())
    assert sorted(m.parts) == sorted(set(gb))
    assert m.avg_bits == pytest.approx(sum(b * min(8, n - 8 * g) for g, b in enumerate(gb)) / n)


def test_bad_group_bits_are_refused() -> None:
    W, H = _problem()
    cfg = GPTQConfig(grid=_grid(), act_order=True, static_groups=True)
    with pytest.raises(ValueError, match="4 group bit-widths for 5 groups"):
        quantize_gptq(W, H, cfg, group_bits=[4] * 4)
    with pytest.raises(ValueError, match=r"must be in 2..8, got \[1, 4\]"):
        quantize_rtn(W, _grid(), group_bits=[4, 1, 4, 4, 4])
    with pytest.raises(ValueError, match="need static_groups"):
        quantize_gptq(W, H, cfg.model_copy(update={"static_groups": False}), group_bits=[4] * 5)
    q = quantize_rtn(W, _grid(bits=4))
    with pytest.raises(ValueError, match="exceed 2 bits"):
        split_by_bits(q, torch.tensor([2, 4, 4, 4, 4]))


def test_group_sensitivities_sum_to_the_layer_sensitivity() -> None:
    W, H = _problem(n=36)
    for relative in (False, True):
        layer = hessian_sensitivity("l", W, H, (2, 3, 4), 8, relative=relative)
        groups = hessian_group_sensitivity("l", W, H, (2, 3, 4), 8, relative=relative)
        assert [g.name for g in groups] == [f"l#{i}" for i in range(5)]
        assert sum(g.n_params for g in groups) == layer.n_params
        for b in (2, 3, 4):
            assert sum(g.loss[b] for g in groups) == pytest.approx(layer.loss[b], rel=1e-12)
