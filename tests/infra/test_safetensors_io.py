"""ShardedWriter: a checkpoint written one shard at a time reads back to the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infra.safetensors_io import ShardedWriter, save_canonical


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.w": torch.randn(64, 32, generator=g) for i in range(6)}
    out["codes"] = torch.randint(0, 255, (100,), generator=g, dtype=torch.int32)
    return out


def _read(root: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_one_shard_is_the_single_file_byte_for_byte(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, metadata={"format": "pt", "b": "2"})
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.close() == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == save_canonical(tensors, {"format": "pt", "b": "2"})
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_many_shards_with_an_index(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, metadata={"format": "pt"}, max_shard_bytes=3 * 64 * 32 * 4)
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = _read(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob(".shard-*"))


def test_a_name_written_twice_is_refused(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, max_shard_bytes=1)
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' written twice"):
        writer.add("a", torch.ones(2))


def test_streaming_write_reads_back_every_dtype_and_is_deterministic(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    from infra.safetensors_io import write_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.H_upper": torch.randn(1000, generator=g),
        "a.x_sum": torch.randn(7, dtype=torch.float64, generator=g),
        "a.n": torch.tensor(12345, dtype=torch.int64),  # 0-d, as the Hessian blocks store counts
        "c.half": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "d.empty": torch.zeros(0, 4),
        "e.mask": torch.tensor([True, False, True]),
        "f.view": torch.randn(6, 4, generator=g).T,  # not contiguous
    }
    write_streaming(tensors, tmp_path / "a.safetensors")
    write_streaming(dict(reversed(list(tensors.items()))), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # the bytes safetensors itself writes, so switching a stage to the streaming writer keeps its digests
    assert (tmp_path / "a.safetensors").read_bytes() == save({k: v.contiguous() for k, v in tensors.items()})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), name
    with pytest.raises(ValueError, match="complex64"):
        write_streaming({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
