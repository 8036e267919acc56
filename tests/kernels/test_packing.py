"""Packing layout: exact round trips (property tests), bit positions, checkpoint tensors, exact dequant."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.packing import (
    SUPPORTED_BITS,
    PackFormat,
    codes_per_word,
    dequantize_reference,
    pack_codes,
    pack_quantized_linear,
    packed_rows,
    round_scales_fp16,
    unpack_codes,
    unpack_quantized_linear,
)
from tests.kernels.synth import explicit_dequant, make_quantized


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    N=st.integers(1, 9),
    K=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_roundtrip_property(bits: int, N: int, K: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(K, bits), N) == (-(-K // (32 // bits)), N)
    assert torch.equal(unpack_codes(packed, bits, K), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"w{b}")
def test_extreme_codes_roundtrip(bits: int) -> None:
    """All-max codes set the sign bit of the int32 word (2/4/8-bit); must survive the round trip."""
    codes = torch.full((3, 50), (1 << bits) - 1, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 50), codes)


def test_bit_positions_documented_layout() -> None:
    """4-bit: code j of word w sits in bits [4j, 4j+4) -> codes 0..7 pack to 0x76543210."""
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)
    assert pack_codes(codes, 4).item() == 0x76543210
    # 3-bit: 10 codes per word, top two bits unused; 8-bit: little-endian bytes; 2-bit: 16 per word.
    c3 = torch.full((1, 10), 7, dtype=torch.uint8)
    assert pack_codes(c3, 3).item() == (1 << 30) - 1
    assert pack_codes(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 8).item() == 0x04030201
    assert [codes_per_word(b) for b in SUPPORTED_BITS] == [16, 10, 8, 4]
    # column-major over N: codes of output row n live in column n of the packed tensor
    two_rows = torch.tensor([[1] * 8, [2] * 8], dtype=torch.uint8)
    assert pack_codes(two_rows, 4).tolist() == [[0x11111111, 0x22222222]]
    assert PackFormat.INT32_KPACKED == "int32_kpacked"


@pytest.mark.parametrize(
    ("bits", "bad"),
    [(5, "bits"), (4, "range"), (2, "float")],
    ids=["bits5", "code-out-of-range", "float-codes"],
)
def test_pack_codes_rejects(bits: int, bad: str) -> None:
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    if bad == "range":
        codes[0, 0] = 16
    if bad == "float":
        codes = codes.float()  # type: ignore[assignment]
    with pytest.raises((ValueError, TypeError)):
        pack_codes(codes, bits)


# (K, g): aligned, ragged last group (576 = 4.5*128 scaled down), per-channel (g=-1), K not a multiple of P
SHAPES = [(64, 32), (96, 64), (40, -1), (75, 25)]
CASES = list(itertools.product(SUPPORTED_BITS, SHAPES, [False, True], [False, True]))


def _id(case) -> str:
    bits, (K, g), act, sym = case
    return f"w{bits}-K{K}-g{g}-{'act' if act else 'seq'}-{'sym' if sym else 'asym'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_quantized_linear_roundtrip_and_exact_dequant(case) -> None:
    bits, (K, g), act, sym = case
    q = make_quantized(12, K, bits, g, act_order=act, sym=sym, seed=K + bits)
    t = pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx)
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    assert t["zeros"].dtype == torch.float16 and t["qmeta"].dtype == torch.int32
    assert ("g_idx" in t) == act
    u = unpack_quantized_linear(t)
    assert torch.equal(u.codes, q.codes)
    assert torch.equal(u.scales, round_scales_fp16(q.scales))
    assert torch.equal(u.zeros, q.zeros)
    assert u.bits == bits and u.group_size == (K if g <= 0 else g)
    assert (u.g_idx is None) == (not act) and (u.g_idx is None or torch.equal(u.g_idx, q.g_idx))
    # "unpacked weights equal the fake-quantized weights exactly", with fp16-rounded scales
    W_unpacked = dequantize_reference(u.codes, u.scales, u.zeros, u.group_size, u.g_idx)
    W_fake = dequantize_reference(q.codes, round_scales_fp16(q.scales), q.zeros, q.group_size, q.g_idx)
    torch.testing.assert_close(W_unpacked, W_fake, rtol=0, atol=0)
    torch.testing.assert_close(W_unpacked, explicit_dequant(q), rtol=0, atol=0)


def test_safetensors_roundtrip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    q = make_quantized(16, 96, 3, 64, act_order=True)
    t = pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx)
    save_file(t, str(tmp_path / "layer.safetensors"))
    back = load_file(str(tmp_path / "layer.safetensors"))
    assert back.keys() == t.keys()
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    assert torch.equal(unpack_quantized_linear(back).codes, q.codes)


@pytest.mark.parametrize("bad", ["zero-fraction", "scale-overflow", "scales-shape", "g_idx-range", "bits"])
def test_pack_quantized_linear_rejects(bad: str) -> None:
    q = make_quantized(4, 32, 4, 16)
    scales, zeros, g_idx, bits = q.scales.clone(), q.zeros.clone(), None, 4
    if bad == "zero-fraction":
        zeros[0, 0] = 0.5
    elif bad == "scale-overflow":
        scales[0, 0] = 1e6
    elif bad == "scales-shape":
        scales = scales[:, :1]
    elif bad == "g_idx-range":
        g_idx = torch.full((32,), 2, dtype=torch.int32)
    else:
        bits = 6
    with pytest.raises(ValueError):
        pack_quantized_linear(q.codes, scales, zeros, bits, 16, g_idx)
