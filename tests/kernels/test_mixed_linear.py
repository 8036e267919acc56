"""The group-wise mixed-precision layout: lossless packing and a module equal to the fake-quantized Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.layouts import layout_of_tensors, replace_linears
from kernels.mixed_linear import MixedQuantLinear, pack_mixed, unpack_mixed
from quant.mixed import split_by_bits
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tasks.qlayer import stored_bits


def _mixed(gb: list[int], out: int = 10, n: int = 60, seed: int = 0):
    W = torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    q = quantize_rtn(W, GridConfig(bits=4, group_size=16, scale_dtype="float16"), group_bits=gb)
    return split_by_bits(q, torch.tensor(gb))


def test_pack_unpack_is_lossless() -> None:
    m = _mixed([2, 4, 3, 2])  # ragged last group (12 columns) at 2 bits
    back = unpack_mixed(pack_mixed(m))
    assert torch.equal(back.group_bits, m.group_bits) and back.in_features == 60
    for b, p in m.parts.items():
        assert torch.equal(back.parts[b].codes, p.codes) and torch.equal(back.parts[b].scales, p.scales)
    assert torch.equal(back.dequantize(), m.dequantize())


def test_module_matches_the_fake_quantized_linear() -> None:
    m = _mixed([3, 2, 8, 3])
    bias = torch.randn(10)
    mod = layout_of_tensors(pack_mixed(m)).build(pack_mixed(m), bias=bias)
    assert isinstance(mod, MixedQuantLinear) and mod.widths == [2, 3, 8]
    assert torch.equal(mod.dequantized_weight(), m.dequantize())
    x = torch.randn(3, 5, 60)
    torch.testing.assert_close(mod(x), F.linear(x, m.dequantize(), bias), rtol=1e-5, atol=1e-5)
    assert mod.bits == m.avg_bits == (3 * 16 + 2 * 16 + 8 * 16 + 3 * 12) / 60


def test_replace_linears_and_stored_bits() -> None:
    m = _mixed([2, 2, 4, 2])
    model = torch.nn.Sequential(torch.nn.Linear(60, 10, bias=False))
    replace_linears(model, {"0": pack_mixed(m)})
    assert isinstance(model[0], MixedQuantLinear)
    bpw = stored_bits(pack_mixed(m), 600)
    # each part's codes in int32 words along K: 44 two-bit columns → 3 words, 16 four-bit columns → 2 words
    assert bpw["bpw_codes"] == 32 * (3 + 2) / 60
    assert bpw["bpw_grids"] == 4 * 10 * 2 * 16 / 600  # fp16 scale + zero per (row, group)
