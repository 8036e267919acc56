"""Serving-format layouts (kernels.formats) against readers written from the formats' documentation.

GPTQ: ``tests.helpers.gptq_reader`` unpacks int32 words as little-endian bit strings (AutoGPTQ's
``(w >> b·j) & mask`` for b = 2/4/8; 32 codes over 3 words for b = 3), applies the v1 (+1) / v2 zero convention
and dequantizes ``(q − z)·s`` through ``g_idx``. ggml: the ``gguf`` package's own block decoders. Neither is
the writer's inverse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.formats.ggml import encode_rows, ggml_type_for, grid_reason
from kernels.formats.gptq import checkpoint_format, gptq_layer_reason, pack_dense_int32, pack_gptq_linear
from quant.grid import fit_group_grids, quantize_codes
from quant.types import GridConfig, QuantizedWeight
from tests.helpers.gptq_reader import read_gptq, unpack_words


def _weight(out: int, inp: int, bits: int, group: int, sym: bool, *, act_order: bool = False) -> QuantizedWeight:
    torch.manual_seed(bits * 100 + group + int(sym))
    W = torch.randn(out, inp) * 0.03
    cfg = GridConfig(bits=bits, group_size=group, sym=sym, scale_dtype="float16")
    scales, zeros = fit_group_grids(W, cfg)
    gs = cfg.effective_group_size(inp)
    g = torch.arange(inp) // gs
    g_idx = None
    if act_order:  # columns of a group scattered, as act-order without static groups leaves them
        g = g[torch.randperm(inp)]
        g_idx = g.to(torch.int32)
    codes = quantize_codes(W, scales[:, g], zeros[:, g], bits).to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs, g_idx=g_idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_packing_is_little_endian_bit_order(bits: int) -> None:
    torch.manual_seed(bits)
    values = torch.randint(0, 1 << bits, (5, 64))
    words = pack_dense_int32(values, bits)
    assert words.dtype == torch.int32 and words.shape == (5, 64 * bits // 32)
    assert np.array_equal(unpack_words(words.numpy(), bits, 64), values.numpy())
    if bits == 4:  # AutoGPTQ's documented form for 4 bits: word i holds codes 8i..8i+7, code 8i+j at bits 4j
        w = words[0, 0].item() & 0xFFFFFFFF
        assert [(w >> (4 * j)) & 0xF for j in range(8)] == values[0, :8].tolist()


@pytest.mark.parametrize(
    ("bits", "group", "sym", "act_order"),
    [
        (4, 32, False, False),
        (4, 32, True, False),
        (3, 32, False, False),
        (8, 64, True, False),
        (2, -1, False, False),
        (4, 32, False, True),
    ],
    ids=["w4g32-asym", "w4g32-sym", "w3g32-asym", "w8g64-sym", "w2-per-channel", "w4g32-act-order"],
)
def test_gptq_tensors_read_back_bit_for_bit(bits: int, group: int, sym: bool, act_order: bool) -> None:
    q = _weight(64, 128, bits, group, sym, act_order=act_order)
    fmt = checkpoint_format(sym)
    assert gptq_layer_reason("l", 64, 128, bits, q.group_size, q.zeros, fmt) is None
    t = pack_gptq_linear(q.codes, q.scales, q.zeros, q.g_idx, bits, q.group_size, fmt)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (q.n_groups, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    assert torch.equal(read_gptq(t, bits, fmt), q.dequantize())
    if sym and bits == 4:  # v1 symmetric zeros: 8 − 1 = 7 in every nibble
        assert (t["qzeros"] == 0x77777777).all()


def test_gptq_v1_cannot_store_zero_point_zero() -> None:
    zeros = torch.full((64, 2), 8.0)
    zeros[3, 1] = 0.0
    assert "zero point of 0" in gptq_layer_reason("l", 64, 64, 4, 32, zeros, "gptq")
    assert gptq_layer_reason("l", 64, 64, 4, 32, zeros, "gptq_v2") is None
    assert "ragged" in gptq_layer_reason("l", 64, 96, 4, 64, zeros, "gptq_v2")
    assert "output rows" in gptq_layer_reason("l", 36, 64, 4, 32, zeros, "gptq_v2")


def _gguf_decode(qtype: str, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    import gguf

    out = gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)


@pytest.mark.parametrize(
    ("bits", "sym", "scale_dtype"), [(4, True, "float16"), (4, False, "float16_min"), (8, True, "float16")]
)
def test_ggml_blocks_decode_exactly_with_gguf(bits: int, sym: bool, scale_dtype: str) -> None:
    torch.manual_seed(bits)
    W = torch.randn(48, 96) * 0.02
    cfg = GridConfig(bits=bits, group_size=32, sym=sym, scale_dtype=scale_dtype, mse_clip=True)
    scales, zeros = fit_group_grids(W, cfg)
    g = torch.arange(96) // 32
    codes = quantize_codes(W, scales[:, g], zeros[:, g], bits).to(torch.uint8)
    q = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=32)
    qtype = ggml_type_for(bits, 32, sym)
    assert qtype == {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}[(bits, sym)]
    blocks = encode_rows(qtype, codes, scales, zeros)
    assert blocks.shape == (48, 3 * {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype])
    assert torch.equal(_gguf_decode(qtype, blocks, (48, 96)), q.dequantize())


def test_q4_1_refuses_grids_whose_minimum_fp16_cannot_hold() -> None:
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.02
    scales, zeros = fit_group_grids(W, GridConfig(bits=4, group_size=32, sym=False, scale_dtype="float16"))
    reason = grid_reason("layer", "Q4_1", scales, zeros, 64)
    assert reason is not None and "fp16_min" in reason and "groups" in reason
    with pytest.raises(ValueError, match="fp16 cannot hold"):
        encode_rows("Q4_1", torch.zeros(32, 64, dtype=torch.uint8), scales, zeros)
    assert ggml_type_for(4, 64, False) is None and ggml_type_for(3, 32, False) is None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float16_min_grids_have_fp16_minimum(bits: int) -> None:
    """Every asymmetric float16_min grid has fp16 scale and fp16 −scale·zero; grids that already had one are
    unchanged, and the squared error stays within 1% of plain fp16 scales (at most 4 bits: the scale keeps at
    least 11 − bits significand bits; 8-bit grids would keep 3, which is why the recipe allows W4 only)."""
    torch.manual_seed(bits)
    W = torch.randn(256, 256) * 0.05
    base = GridConfig(bits=bits, group_size=32, sym=False, scale_dtype="float16")
    s0, z0 = fit_group_grids(W, base)
    s1, z1 = fit_group_grids(W, base.model_copy(update={"scale_dtype": "float16_min"}))
    m = s1 * z1
    assert torch.equal(m.half().float(), m) and torch.equal(s1.half().float(), s1)
    had = (s0 * z0).half().float() == s0 * z0
    assert torch.equal(s1[had], s0[had]) and torch.equal(z1[had], z0[had])

    def err(s: torch.Tensor, z: torch.Tensor) -> float:
        g = torch.arange(256) // 32
        c = quantize_codes(W, s[:, g], z[:, g], bits)
        return float(((s[:, g] * (c - z[:, g]) - W) ** 2).sum())

    assert err(s1, z1) <= 1.01 * err(s0, z0)
