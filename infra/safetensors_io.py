"""Byte-reproducible safetensors: the same tensors and metadata always give the same file (and sha256).

``safetensors`` serialises ``__metadata__`` from a Rust ``HashMap``, so with two or more metadata entries the
header's key order (and with it the file's sha256) changes from process to process. Artifacts are compared and
cached by sha256, so every safetensors payload with metadata goes through :func:`canonical_safetensors`, which
rewrites the header with the metadata keys sorted (same length, same tensor offsets).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SHARD_BYTES",
    "ShardedWriter",
    "canonical_safetensors",
    "canonicalise_file",
    "save_canonical",
    "write_streaming",
]


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` with the header's ``__metadata__`` keys sorted; tensors and offsets untouched."""
    if len(data) < 8:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or len(meta) < 2:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > n:  # cannot happen for a pure reordering; keep the original rather than break offsets
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :]


def save_canonical(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with a reproducible header."""
    from safetensors.torch import save

    return canonical_safetensors(save(dict(tensors), metadata=dict(metadata) if metadata else None))


def canonicalise_file(path: Path) -> None:
    """Rewrite ``path`` in place when its header is not canonical (reads the header only when it is)."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        header = fh.read(n)
    fixed = canonical_safetensors(head + header)
    if fixed != head + header:
        with path.open("r+b") as fh:
            fh.write(fixed)


SHARD_BYTES = 512 << 20
"""Tensor bytes per shard of a written checkpoint: a 70B pack never holds more than about this much (and
safetensors' own serialisation copy of it) besides the one layer being packed."""


class ShardedWriter:
    """A checkpoint written as its tensors arrive, one shard at a time, so the writer holds at most one shard.

    Tensors accumulate until ``max_shard_bytes``, then go to disk as a canonical safetensors file. ``close`` names
    the result the way transformers, vLLM and llama.cpp's converters read it: a single ``model.safetensors`` when
    everything fit in one shard (byte-identical to writing the whole dict at once), else
    ``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json`` mapping every tensor to its file.
    State is real (the open shard), hence a class.
    """

    def __init__(
        self, out: Path, *, metadata: Mapping[str, str] | None = None, max_shard_bytes: int | None = None
    ) -> None:
        self.out = Path(out)
        self.metadata = dict(metadata) if metadata else None
        self.max_shard_bytes = SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._shards: list[Path] = []
        self._where: dict[str, int] = {}
        self._total = 0

    def add(self, name: str, tensor: Any) -> None:
        if name in self._where or name in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.out / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        canonicalise_file(path)
        self._where.update(dict.fromkeys(self._pending, len(self._shards)))
        self._shards.append(path)
        self._total += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending and name the files; returns the file names written."""
        self._flush()
        if len(self._shards) <= 1:
            final = self.out / "model.safetensors"
            if self._shards:
                self._shards[0].rename(final)
            else:
                save_canonical_file({}, final, self.metadata)
            return [final.name]
        n = len(self._shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, name in zip(self._shards, names, strict=True):
            path.rename(self.out / name)
        index = {"metadata": {"total_size": self._total}, "weight_map": {k: names[i] for k, i in self._where.items()}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def save_canonical_file(tensors: Mapping[str, Any], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    Path(path).write_bytes(save_canonical(tensors, metadata))


_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# safetensors' own layout: data sorted by dtype (this rank, its Rust enum's order, highest first), then by name,
# so a file written here is byte for byte the one ``safetensors.torch.save`` writes (tested against it)
_DTYPE_RANK = {d: r for r, d in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}


def write_streaming(tensors: Mapping[str, Any], path: Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save`` / ``save_file`` first turn every tensor into a ``bytes`` copy, so writing a 70B
    block's Hessians (4.1 GB of fp32 triangles) needed 4.1 GB more; this writes the very bytes ``save`` would (same
    order, no metadata, header padded to 8 bytes) with no copy beyond one tensor's contiguous view, so a stage
    that switches to it keeps its artifacts' content digests."""
    import torch

    dtypes = {}
    for name, t in tensors.items():
        dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        dtypes[name] = dtype
    names = sorted(tensors, key=lambda n: (-_DTYPE_RANK[dtypes[n]], n))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t, dtype = tensors[name], dtypes[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with Path(path).open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).numpy()))
