"""ICQuant and GPTQT packed layouts: lossless round trips, reference modules equal the fake-quantized weights,
and the measured position overhead at γ = 5 % sits in the entropy-bound region."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.bcq_linear import BCQLinear, pack_bcq, round_bcq_fp16, unpack_bcq
from kernels.icq_linear import ICQuantLinear, pack_icquant, unpack_icquant
from quant.gptqt import GPTQTConfig, quantize_gptqt
from quant.icquant import ICQuantConfig, entropy_floor, expected_stream_overhead, quantize_icquant
from quant.types import GridConfig
from tasks.qlayer import stored_bits


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen) * (1 + 3 * torch.rand(out, 1, generator=gen))


def _hessian(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    ("bits", "group", "segment", "base"), [(2, -1, 0, "rtn"), (3, 32, 40, "gptq"), (4, 64, 7, "rtn")]
)
def test_icquant_pack_round_trip_and_module(bits: int, group: int, segment: int, base: str) -> None:
    W = _weight(24, 100, bits)
    grid = GridConfig(bits=bits, group_size=group, scale_dtype="float16")
    H = _hessian(100, 1) if base == "gptq" else None
    q = quantize_icquant(W, H, ICQuantConfig(grid=grid, gamma=0.07, segment=segment, base=base))  # type: ignore[arg-type]
    packed = pack_icquant(q)
    back = unpack_icquant(packed)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.outlier_mask(), q.outlier_mask())
    assert torch.equal(back.dequantize(), q.dequantize())  # bit-exact
    mod = ICQuantLinear.from_packed(packed)
    assert torch.equal(mod.dequantized_weight(), q.dequantize())
    x = torch.randn(3, 5, 100)
    assert torch.equal(mod(x), F.linear(x, q.dequantize()))
    mod.to(torch.bfloat16)  # fp16 grids survive a dtype change untouched
    assert mod.scales.dtype == torch.float16 and torch.equal(mod.dequantized_weight(), q.dequantize())


def test_icquant_position_overhead_is_near_the_entropy_floor() -> None:
    """γ = 5 % on random data: measured bits of the stored position streams ≈ γ(B + 1 + q/(1 − q)) at B = 4,
    ≥ H₂(γ); with the int32 tile table (R = 16 rows per tile) the whole position overhead is ≤ 0.32."""
    W = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    q = quantize_icquant(W, None, ICQuantConfig(grid=GridConfig(bits=2, scale_dtype="float16"), base="rtn"))
    packed = pack_icquant(q)
    bpw = stored_bits(packed, W.numel())
    assert entropy_floor(0.05) <= bpw["bpw_positions"] <= 0.30
    assert bpw["bpw_offsets"] == pytest.approx(32 * 2 * (64 // 16 + 1) / W.numel())  # int32 pair per tile (+1)
    assert bpw["bpw_position_overhead"] == bpw["bpw_positions"] + bpw["bpw_offsets"] <= 0.32
    assert bpw["bpw_codes"] == 2.0
    assert bpw["bpw_positions"] == pytest.approx(q.stats["bpw_positions"], abs=1e-12)  # measured == quantizer's
    assert bpw["bpw_positions"] == pytest.approx(expected_stream_overhead(0.05, 4), abs=0.004)
    assert packed["pos_offsets"].shape == (2, 5) and q.positions.index_bits == 4


def test_icquant_old_format_is_refused() -> None:
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_icquant(W, None, ICQuantConfig(grid=GridConfig(bits=2, scale_dtype="float16"), base="rtn"))
    packed = pack_icquant(q)
    v1 = {**packed, "icqmeta": torch.tensor([1, 2, 64, 64, 5, 64, 0], dtype=torch.int32)}
    with pytest.raises(ValueError, match="unsupported ICQuant format version 1"):
        unpack_icquant(v1)


@pytest.mark.parametrize("group_rows", [1, 5, 16, 64])
def test_icquant_tiles_pack_exactly_for_any_group_rows(group_rows: int) -> None:
    W = _weight(37, 90, group_rows)
    grid = GridConfig(bits=3, group_size=32, scale_dtype="float16")
    q = quantize_icquant(W, None, ICQuantConfig(grid=grid, gamma=0.1, segment=40, group_rows=group_rows, base="rtn"))
    mod = ICQuantLinear.from_packed(pack_icquant(q))
    assert mod.unpacked().positions.group_rows == min(group_rows, 37)
    assert torch.equal(mod.dequantized_weight(), q.dequantize())


def test_bcq_pack_round_trip_and_module() -> None:
    W = _weight(16, 72, 3)
    H = _hessian(72, 2)
    cfg = GPTQTConfig(grid=GridConfig(bits=4, group_size=24, scale_dtype="float16"), bits=2, multipliers=(0.9, 1.0))
    res = quantize_gptqt(W, H, cfg)
    w16 = round_bcq_fp16(res.weight)
    torch.testing.assert_close(w16.dequantize(), res.two_step(), rtol=0, atol=2e-3 * float(W.abs().max()))
    packed = pack_bcq(w16)
    assert packed["planes"].dtype == torch.int32 and packed["planes"].shape == (2, 3, 16)
    assert torch.equal(unpack_bcq(packed).dequantize(), w16.dequantize())
    mod = BCQLinear.from_packed(packed)
    x = torch.randn(4, 72)
    assert torch.equal(mod.dequantized_weight(), w16.dequantize())
    assert torch.equal(mod(x), F.linear(x, w16.dequantize()))
    bpw = stored_bits(packed, W.numel())
    assert bpw["bpw_codes"] == pytest.approx(2 * 96 / 72)  # 72 columns pad to 3 words of 32
    assert bpw["bpw_grids"] == pytest.approx(3 * 16 / 24)  # α'_1, α'_2, β' fp16 per group of 24
    with pytest.raises(ValueError, match="fp16-exact"):
        pack_bcq(res.weight)  # unrounded α' would not survive the checkpoint
