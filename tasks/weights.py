"""Tensor-by-tensor reads of a safetensors checkpoint (``WeightIndex``): what the block streamer, the quantize
stage and the QuaRot rotation read weights with, one tensor at a time, so memory stays at one block."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["WeightIndex"]

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightIndex:
    """Tensor-by-tensor reads of a (possibly sharded) safetensors checkpoint, without mmap.

    safetensors' ``safe_open`` maps whole files, and every page a block touches stays resident, so peak RSS
    would grow with depth. Reading each tensor's byte range with ``pread`` keeps only the current block.
    """

    def __init__(self, path: Path) -> None:
        from infra.errors import CorruptArtifactError

        files = sorted(p for p in Path(path).glob("*.safetensors"))
        self.entries: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        for f in files:
            with f.open("rb") as fh:
                raw_len = fh.read(8)
                if len(raw_len) != 8:
                    raise CorruptArtifactError(f"{f} is not a safetensors file (truncated header)")
                n = int.from_bytes(raw_len, "little")
                try:
                    header = json.loads(fh.read(n))
                except ValueError:
                    raise CorruptArtifactError(f"{f} has a corrupt safetensors header") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self.entries[name] = (f, 8 + n + begin, _ST_DTYPES[info["dtype"]], info["shape"], end - begin)
        from tasks.moe import expert_entries  # MoE: the unfused model's expert names resolve to their byte ranges

        self.entries = expert_entries(Path(path), self.entries)

    def get(self, name: str) -> torch.Tensor:
        f, offset, dtype, shape, nbytes = self.entries[name]
        buf = bytearray(nbytes)
        with f.open("rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != nbytes:
                from infra.errors import CorruptArtifactError

                raise CorruptArtifactError(f"{f} is truncated (tensor {name})")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __contains__(self, name: str) -> bool:
        return name in self.entries
