"""WeightIndex.pieces: a tensor read in bounded pieces, and the NaN/Inf check that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infra.errors import ConfigError
from tasks.models import check_weights_finite
from tasks.weights import WeightIndex


def _checkpoint(tmp_path: Path, bad: float | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 11, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.index": torch.arange(9, dtype=torch.int64),
    }
    if bad is not None:
        tensors["a.weight"][-1, -1] = bad  # the very last element: only the last piece holds it
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("max_bytes", [1, 4, 12, 100, 1 << 20])
def test_pieces_tile_the_tensor(tmp_path: Path, max_bytes: int) -> None:
    index = WeightIndex(_checkpoint(tmp_path))
    assert index.stored() == ["a.weight", "b.weight", "c.index"]
    for name in index.stored():
        pieces = list(index.pieces(name, max_bytes))
        item = index.get(name).element_size()
        assert all(p.numel() * item <= max(max_bytes, item) for p in pieces)
        assert torch.equal(torch.cat(pieces), index.get(name).reshape(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_finds_the_last_element(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ConfigError, match=r"tensor a\.weight in model\.safetensors has NaN/Inf values"):
        check_weights_finite(_checkpoint(tmp_path, bad))


def test_finite_check_passes_a_clean_checkpoint(tmp_path: Path) -> None:
    check_weights_finite(_checkpoint(tmp_path))
