"""RTN against a slow per-row/group/element reference: bit-exact codes and grids."""

from __future__ import annotations

import itertools

import pytest
import torch

from quant.hessian import proxy_loss
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight, ref_rtn

CASES = list(itertools.product([2, 3, 4, 8], [-1, 16, 48], [False, True], [False, True]))


@pytest.mark.parametrize(("bits", "group_size", "sym", "mse_clip"), CASES, ids=str)
def test_rtn_matches_reference_bit_exact(bits: int, group_size: int, sym: bool, mse_clip: bool) -> None:
    W = random_weight(6, 100, seed=bits + group_size) ** 3 * 400  # heavy tails so clipping matters
    cfg = GridConfig(bits=bits, group_size=group_size, sym=sym, mse_clip=mse_clip)
    qw = quantize_rtn(W, cfg)
    codes, scales, zeros = ref_rtn(W, cfg)
    assert torch.equal(qw.codes.long(), codes)
    assert torch.equal(qw.scales, scales) and torch.equal(qw.zeros, zeros)
    assert qw.g_idx is None and qw.stats == {}


def test_rtn_ragged_576_g128_and_proxy_loss() -> None:
    W = random_weight(8, 576, seed=0)
    H = random_spd(576, seed=0, n_tokens=600)
    qw = quantize_rtn(W, GridConfig(bits=4, group_size=128), H)
    assert qw.n_groups == 5 and qw.group_size == 128
    assert qw.stats["proxy_loss"] == pytest.approx(proxy_loss(W, qw.dequantize(), H), rel=1e-12)
    assert qw.stats["proxy_loss"] > 0


def test_rtn_accepts_half_precision() -> None:
    W = random_weight(4, 64, seed=1).to(torch.float16)
    cfg = GridConfig(bits=4, group_size=32)
    assert torch.equal(quantize_rtn(W, cfg).codes, quantize_rtn(W.float(), cfg).codes)
