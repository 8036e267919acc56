"""The layout registry is complete: every layout the pack stage can produce round-trips pack → checkpoint file →
load → the same dequantized weight, through registry lookups only (no per-layout code in the test but the
quantizer call that makes a layer of that layout)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from kernels.bcq_linear import BCQLayer, round_bcq_fp16
from kernels.layout_base import EXPORT_FORMATS
from kernels.layouts import (
    LAYOUTS,
    export_reason,
    is_packed_key,
    layout_named,
    layout_of,
    layout_of_tensors,
    replace_linears,
    stored_bits,
)
from quant.e8p import E8PConfig, quantize_e8p_ldlq
from quant.gptqt import GPTQTConfig, quantize_gptqt
from quant.icquant import ICQuantConfig, quantize_icquant
from quant.incoherence import IncoherenceConfig, quantize_incoherent
from quant.mixed import split_by_bits
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight

OUT, IN = 24, 64


def _grid(bits: int = 3, group: int = 32) -> GridConfig:
    return GridConfig(bits=bits, group_size=group, scale_dtype="float16")


def _affine(W: torch.Tensor, H: torch.Tensor) -> Any:
    return quantize_rtn(W, _grid())


def _rotated(W: torch.Tensor, H: torch.Tensor) -> Any:
    cfg = IncoherenceConfig(kind="hadamard", fallback="random_orthogonal")
    return quantize_incoherent(W, H, cfg, lambda Wt, Ht: quantize_rtn(Wt, _grid()), generator=torch.Generator())


def _icquant(W: torch.Tensor, H: torch.Tensor) -> Any:
    return quantize_icquant(W, H, ICQuantConfig(grid=_grid(), gamma=0.07, segment=16, base="gptq"))


def _bcq(W: torch.Tensor, H: torch.Tensor) -> Any:
    cfg = GPTQTConfig(grid=GridConfig(bits=4, group_size=32, scale_dtype="float16"), bits=2, multipliers=(0.9, 1.0))
    return BCQLayer(round_bcq_fp16(quantize_gptqt(W, H, cfg).weight), {"proxy_loss": 1.0})


def _mixed(W: torch.Tensor, H: torch.Tensor) -> Any:
    gb = [2, 4]
    return split_by_bits(quantize_rtn(W, _grid(4, 32), group_bits=gb), torch.tensor(gb))


def _e8p(W: torch.Tensor, H: torch.Tensor) -> Any:
    cfg = IncoherenceConfig(kind="hadamard", fallback="random_orthogonal")
    return quantize_incoherent(
        W, H, cfg, lambda Wt, Ht: quantize_e8p_ldlq(Wt, Ht, E8PConfig()), generator=torch.Generator().manual_seed(1)
    )


# one quantizer per layout the quantize stage records (tasks.quantize METHODS → these result types)
MAKERS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "affine": _affine,
    "rotated": _rotated,
    "icquant": _icquant,
    "bcq": _bcq,
    "mixed": _mixed,
    "e8p": _e8p,
}


def test_every_registered_layout_is_covered() -> None:
    """A layout added to the registry without a round-trip case here fails this test."""
    assert set(MAKERS) == {layout.name for layout in LAYOUTS}


def _checkpoint_round_trip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Through a safetensors file, as ``native/model.safetensors`` stores them."""
    return load(save({k: v.contiguous() for k, v in tensors.items()}))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_pack_load_gives_the_same_weight(name: str) -> None:
    W, H = random_weight(OUT, IN, 3), random_spd(IN, 3)
    q = MAKERS[name](W, H)
    layout = layout_of(q)
    assert layout.name == name and layout_named(name) is layout
    want = layout.dequantize(q)
    assert want.shape == (OUT, IN) == layout.shape(q)
    assert not torch.equal(want, W)  # quantized, not a copy of the weight

    tensors = _checkpoint_round_trip(layout.pack(q))
    assert layout_of_tensors(tensors) is layout
    assert all(is_packed_key(k) for k in tensors)  # load_packed_model routes every tensor to the module

    back = layout.unpack(tensors, {"proxy_loss": 2.0})  # the qlayer artifact path
    assert layout_of(back) is layout
    assert torch.equal(layout.dequantize(back), want)

    model = nn.Sequential(nn.Linear(IN, OUT, bias=True))
    bias = model[0].bias.detach().clone()
    assert replace_linears(model, {"0": tensors}) == ["0"]
    mod = model[0]
    assert isinstance(mod, layout.module)
    weight = getattr(mod, "dequantized_weight_original", mod.dequantized_weight)()  # rotated: Uᵀ Ŵ̃ V
    assert torch.equal(weight, want)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mod(x), F.linear(x, want, bias), rtol=1e-5, atol=1e-5)

    bpw = stored_bits(tensors, OUT * IN)
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert bpw["bpw_total"] == pytest.approx(8 * total_bytes / (OUT * IN))
    assert bpw["bpw_codes"] > 0 and bpw["bpw_grids"] > 0


def test_qlayer_coded_artifact_round_trip() -> None:
    """tasks.qlayer's save/load of the non-affine kinds goes through the registry by the layout name."""
    from tasks.qlayer import load_coded, save_coded

    W, H = random_weight(OUT, IN, 4), random_spd(IN, 4)
    for name in ("icquant", "bcq", "mixed", "e8p"):
        q = MAKERS[name](W, H)
        tensors, meta = save_coded(q)
        assert meta["format"] == name
        back = load_coded(_checkpoint_round_trip(tensors), meta, {"s": 1.0})
        assert torch.equal(layout_of(back).dequantize(back), layout_of(q).dequantize(q))
    with pytest.raises(ValueError, match="unknown qlayer format 'nope'"):
        load_coded({}, {"format": "nope"}, {})


def test_export_reasons_come_from_the_layouts() -> None:
    W, H = random_weight(OUT, IN, 5), random_spd(IN, 5)
    affine, ic = _affine(W, H), _icquant(W, H)
    for fmt in ("compressed-tensors", "GPTQ", "GGUF"):
        assert export_reason([affine], fmt, "rtn") is None
        reason = export_reason([affine, ic], fmt, "icquant-gptq")
        assert reason is not None and "ICQuant" in reason and fmt in reason
    assert "hadamard-gptq weights need the online" in str(export_reason([_rotated(W, H)], "gguf", "hadamard-gptq"))
    with pytest.raises(ValueError, match="unknown export format"):
        export_reason([affine], "onnx", "rtn")


def test_export_format_names_match_the_exporters() -> None:
    from tasks.export import EXPORTS

    assert set(EXPORT_FORMATS) == {f.name for f in EXPORTS}
    for layout in LAYOUTS:
        assert layout.exports <= set(EXPORT_FORMATS), layout.name


def test_unknown_packed_tensors_are_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="'0': packed tensors \\['foo'\\] are in no known layout"):
        replace_linears(model, {"0": {"foo": torch.zeros(1)}})
