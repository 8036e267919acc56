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

__all__ = ["canonical_safetensors", "canonicalise_file", "save_canonical"]


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
