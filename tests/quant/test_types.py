"""GridConfig / QuantizedWeight validation and dequantization."""

from __future__ import annotations

import pydantic
import pytest
import torch

from quant.types import GridConfig, QuantizedWeight


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 0}, "bits must be 2..8, got 0"),
        ({"bits": 9}, "bits must be 2..8, got 9"),
        ({"bits": 4, "group_size": -3}, "group_size must be -1 or 0 (per channel) or >= 1, got -3"),
        ({"bits": 4, "version": 2}, "GridConfig version must be 1, got 2"),
    ],
)
def test_grid_config_rejects_with_one_line_message(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GridConfig(**kwargs)


def test_grid_config_is_frozen_and_forbids_extra() -> None:
    cfg = GridConfig(bits=4, group_size=128)
    with pytest.raises(pydantic.ValidationError):
        cfg.bits = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        GridConfig(bits=4, groupsize=128)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("group_size", "n_in", "eff", "groups"),
    [(-1, 576, 576, 1), (0, 576, 576, 1), (128, 576, 128, 5), (128, 512, 128, 4), (1, 7, 1, 7), (1000, 576, 1000, 1)],
)
def test_group_counting(group_size: int, n_in: int, eff: int, groups: int) -> None:
    cfg = GridConfig(bits=4, group_size=group_size)
    assert cfg.effective_group_size(n_in) == eff
    assert cfg.n_groups(n_in) == groups


def test_dequantize_contiguous_and_g_idx() -> None:
    codes = torch.tensor([[0, 1, 2, 3, 3]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    zeros = torch.tensor([[1.0, 2.0]])
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=2, group_size=3)
    assert qw.dequantize().tolist() == [[-0.5, 0.0, 0.5, 2.0, 2.0]]
    assert (qw.out_features, qw.in_features, qw.n_groups) == (1, 5, 2)
    g_idx = torch.tensor([1, 0, 1, 0, 0], dtype=torch.int32)
    qw2 = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=2, group_size=3, g_idx=g_idx)
    assert qw2.dequantize(torch.float64).tolist() == [[-4.0, 0.0, 0.0, 1.0, 1.0]]
    assert qw2.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_quantized_weight_rejects_bad_shapes() -> None:
    codes = torch.zeros(2, 5, dtype=torch.uint8)
    ok = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="codes must be a 2-D uint8"):
        QuantizedWeight(codes=codes.float(), scales=ok, zeros=ok, bits=4, group_size=3)
    with pytest.raises(ValueError, match="scales must be float32"):
        QuantizedWeight(codes=codes, scales=ok.double(), zeros=ok, bits=4, group_size=3)
    with pytest.raises(ValueError, match="do not match"):
        QuantizedWeight(codes=codes, scales=ok, zeros=ok, bits=4, group_size=5)
    with pytest.raises(ValueError, match="g_idx must be int32"):
        QuantizedWeight(codes=codes, scales=ok, zeros=ok, bits=4, group_size=3, g_idx=torch.zeros(5))
