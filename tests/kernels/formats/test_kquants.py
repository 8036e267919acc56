"""ggml k-quant / legacy block bytes: our encoder's rows decoded by the ``gguf`` package (the independent reader)
equal our dequantization bit for bit, and our decoder inverts the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.formats.kquants import decode_rows, encode_rows, row_bytes
from quant.kquant import KSPECS, KQuantWeight, quantize_rtn

gguf = pytest.importorskip("gguf")

TYPES = sorted(KSPECS)


def _random_fields(qtype: str, rows: int, cols: int, seed: int) -> KQuantWeight:
    """Every field drawn uniformly over its whole stored range (extremes included), fp16 scales of both signs."""
    spec = KSPECS[qtype]
    g = torch.Generator().manual_seed(seed)
    nb, ns = cols // spec.block, cols // spec.sub
    codes = torch.randint(0, spec.umax + 1, (rows, cols), generator=g).to(torch.uint8)
    codes[0, 0], codes[0, 1] = 0, spec.umax
    d = (torch.randn(rows, nb, generator=g) * 0.01).to(torch.float16)
    dmin = (torch.randn(rows, nb, generator=g) * 0.01).to(torch.float16)
    if (spec.kind == "sym" and spec.scale_bits == 0) or qtype in ("Q3_K", "Q6_K"):
        dmin = torch.zeros_like(dmin)
    if spec.scale_bits == 0:
        sc, m = torch.ones(rows, ns, dtype=torch.int16), torch.zeros(rows, ns, dtype=torch.int16)
    elif qtype == "Q6_K":
        sc = torch.randint(-128, 128, (rows, ns), generator=g).to(torch.int16)
        m = torch.zeros_like(sc)
    else:
        top = (1 << spec.scale_bits) - 1
        sc = torch.randint(0, top + 1, (rows, ns), generator=g).to(torch.int16)
        m = torch.randint(0, top + 1, (rows, ns), generator=g).to(torch.int16)
        if spec.kind == "sym":
            m = torch.zeros_like(m)
        sc[0, 0], sc[0, 1] = 0, top
    return KQuantWeight(qtype, codes, d, dmin, sc, m)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_reader_decodes_our_blocks_to_our_dequantization(qtype: str) -> None:
    kw = _random_fields(qtype, rows=5, cols=512, seed=len(qtype) + ord(qtype[1]))
    data = encode_rows(kw)
    assert tuple(data.shape) == (5, row_bytes(qtype, 512))
    ref = gguf.quants.dequantize(data.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    ours = kw.dequantize().numpy()
    assert ref.shape == ours.shape
    np.testing.assert_array_equal(ref.view(np.uint32), ours.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_inverts_encoder(qtype: str) -> None:
    kw = _random_fields(qtype, rows=3, cols=768, seed=7)
    back = decode_rows(qtype, encode_rows(kw), 768)
    for field in ("codes", "d", "dmin", "sc", "m"):
        a, b = getattr(kw, field), getattr(back, field)
        assert a.shape == b.shape, field
        assert torch.equal(a.to(torch.float32), b.to(torch.float32)), field


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_rtn_blocks_read_back_like_the_gguf_quantizer(qtype: str) -> None:
    """On legacy types the gguf package also quantizes: its blocks and ours dequantize within one grid step
    of each other (different rounding rules on purpose: ours is the weighted search) and both are read by gguf."""
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    ours = gguf.quants.dequantize(
        encode_rows(quantize_rtn(W, qtype)).numpy(), getattr(gguf.GGMLQuantizationType, qtype)
    )
    theirs = gguf.quants.dequantize(
        gguf.quants.quantize(W.numpy(), getattr(gguf.GGMLQuantizationType, qtype)),
        getattr(gguf.GGMLQuantizationType, qtype),
    )
    err_ours = float(((ours - W.numpy()) ** 2).mean())
    err_theirs = float(((theirs - W.numpy()) ** 2).mean())
    assert err_ours <= err_theirs * 1.05


def test_out_of_range_fields_are_refused() -> None:
    kw = _random_fields("Q4_K", 1, 256, 0)
    bad = KQuantWeight("Q4_K", kw.codes, kw.d, kw.dmin, kw.sc + 64, kw.m)
    with pytest.raises(ValueError, match="sc outside"):
        encode_rows(bad)
    ragged = _random_fields("Q4_0", 1, 96, 0)
    with pytest.raises(ValueError, match="whole 256-weight blocks"):
        encode_rows(KQuantWeight("Q4_K", ragged.codes, ragged.d, ragged.dmin, ragged.sc, ragged.m))
