"""E8P packed layout and ``E8PLinear``: lossless pack/unpack, the module applies the fake-quantized weight in the
original basis (transforms included), dtype casts keep the fp16 scales and fp32 transforms exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.e8p_linear import E8PLinear, pack_e8p, unpack_e8p
from kernels.layouts import replace_linears
from quant.e8p import E8PConfig, E8PWeight, quantize_e8p_ldlq
from quant.incoherence import IncoherenceConfig, dequantize_original, quantize_incoherent
from tests.quant.reference import random_spd, random_weight


def _rotated(m: int = 24, n: int = 48, seed: int = 0) -> E8PWeight:
    W, H = random_weight(m, n, seed), random_spd(n, seed)
    return quantize_incoherent(
        W,
        H,
        IncoherenceConfig(kind="hadamard", fallback="random_orthogonal"),
        lambda Wt, Ht: quantize_e8p_ldlq(Wt, Ht, E8PConfig()),
        generator=torch.Generator().manual_seed(seed),
    )


def test_pack_unpack_is_lossless() -> None:
    q = _rotated()
    t = pack_e8p(q)
    assert t["qweight"].dtype == torch.int16 and t["scales"].dtype == torch.float16
    back = unpack_e8p(t)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert back.transforms is not None and q.transforms is not None
    assert set(back.transforms) == set(q.transforms)
    assert all(torch.equal(back.transforms[k], v) for k, v in q.transforms.items())


def test_module_applies_the_fake_quantized_weight() -> None:
    q = _rotated()
    mod = E8PLinear.from_packed(pack_e8p(q), bias=torch.linspace(-1, 1, 24))
    assert torch.equal(mod.dequantized_weight(), q.dequantize())  # Ŵ̃, bit-exact
    W_fq = dequantize_original(q)
    torch.testing.assert_close(mod.dequantized_weight_original(), W_fq, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mod(x), F.linear(x, W_fq, mod.bias), rtol=1e-5, atol=1e-5)
    assert "e8p, incoherent" in repr(mod)


def test_plain_codes_without_transforms() -> None:
    W, H = random_weight(8, 16, 2), random_spd(16, 2)
    q = quantize_e8p_ldlq(W, H, E8PConfig())
    mod = E8PLinear.from_packed(pack_e8p(q))
    x = torch.randn(4, 16)
    assert torch.equal(mod(x), F.linear(x, q.dequantize()))


def test_dtype_cast_keeps_scales_and_transforms_exact() -> None:
    q = _rotated()
    mod = E8PLinear.from_packed(pack_e8p(q)).to(torch.bfloat16)
    assert mod.scales.dtype == torch.float16
    assert q.transforms is not None
    for k, v in q.transforms.items():
        assert torch.equal(mod.get_buffer(k), v), k
    assert torch.equal(mod.dequantized_weight(torch.float32), q.dequantize())


def test_replace_linears_picks_the_e8p_module() -> None:
    q = _rotated()
    model = nn.Sequential(nn.Linear(48, 24))
    replace_linears(model, {"0": pack_e8p(q)})
    assert isinstance(model[0], E8PLinear)


def test_bad_packed_tensors_are_refused() -> None:
    q = _rotated()
    t = pack_e8p(q)
    with pytest.raises(ValueError, match="unsupported E8P format"):
        unpack_e8p({**t, "e8pmeta": torch.tensor([9, 48], dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"E8P qweight must be int16 \[N, 6\]"):
        unpack_e8p({**t, "qweight": t["qweight"][:, :5]})
    with pytest.raises(ValueError, match="missing"):
        E8PLinear({k: v for k, v in t.items() if k != "scales"})
    bad = E8PWeight(q.codes, q.scales + 1e-4)
    with pytest.raises(ValueError, match="not fp16-exact"):
        pack_e8p(bad)


def test_stored_bits_are_two_per_weight_plus_row_scales() -> None:
    from tasks.qlayer import stored_bits

    q = _rotated(m=24, n=48)
    bpw = stored_bits(pack_e8p(q), 24 * 48)
    assert bpw["bpw_codes"] == 2.0
    assert bpw["bpw_grids"] == pytest.approx(16 / 48)  # one fp16 scale per row
    assert bpw["bpw_other"] > 0  # e8pmeta + the transforms' sign vectors


def test_three_bit_codes_pack_and_run() -> None:
    W, H = random_weight(16, 64, 5), random_spd(64, 5)
    q = quantize_e8p_ldlq(W, H, E8PConfig(bits=3))
    t = pack_e8p(q)
    assert t["qweight2"].dtype == torch.uint8 and t["e8pmeta"].tolist() == [1, 64, 3]
    back = unpack_e8p(t)
    assert back.bits == 3 and back.codes2 is not None and q.codes2 is not None
    assert torch.equal(back.codes2, q.codes2) and torch.equal(back.dequantize(), q.dequantize())
    mod = E8PLinear.from_packed(t)
    x = torch.randn(3, 64)
    assert torch.equal(mod(x), F.linear(x, q.dequantize())) and mod.bits == 3
    with pytest.raises(ValueError, match="3-bit layer lacks qweight2"):
        unpack_e8p({k: v for k, v in t.items() if k != "qweight2"})
    from tasks.qlayer import stored_bits

    assert stored_bits(t, 16 * 64)["bpw_codes"] == 3.0


def test_first_two_bit_layout_is_still_read() -> None:
    """The first E8P layout wrote e8pmeta = (version, K) without the bits field: read as 2-bit codes."""
    q = _rotated()
    t = pack_e8p(q)
    old = {**t, "e8pmeta": torch.tensor([1, 48], dtype=torch.int32)}
    assert unpack_e8p(old).bits == 2 and torch.equal(unpack_e8p(old).dequantize(), q.dequantize())


def test_transforms_are_unpacked_once_per_buffer_version() -> None:
    """The bit-packed signs are unpacked when the buffers change, not on every forward."""
    mod = E8PLinear.from_packed(pack_e8p(_rotated()))
    t = mod.transforms()
    assert t is not None and mod.transforms() is t
    mod.to(torch.bfloat16)  # integer buffers untouched, fp32 ones re-viewed: the same transforms either way
    t2 = mod.transforms()
    assert t2 is not None and torch.equal(t2.V.signs, t.V.signs)  # type: ignore[arg-type]
    mod.get_buffer("su").zero_()  # modified in place: rebuilt from the new bits
    t3 = mod.transforms()
    assert t3 is not None and t3 is not t2 and bool((t3.U.signs == 1).all())  # type: ignore[union-attr]
