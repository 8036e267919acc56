"""Tensor-by-tensor reads of a safetensors checkpoint (``WeightIndex``): what the block streamer, the quantize
stage and the QuaRot rotation read weights with, one tensor at a time, so memory stays at one block.

For a mixture-of-experts family the index also answers the unfused model's expert names (``expert_entries``,
used by :mod:`tasks.moe`), from per-expert or fused checkpoint tensors alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from quant.arch import EXPERT_LINEARS, ArchMapping, mapping_for

__all__ = ["WeightIndex", "expert_entries"]

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
        self.entries = expert_entries(Path(path), self.entries)  # MoE: unfused expert names → their byte ranges

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

    def stored(self) -> list[str]:
        """The tensors the files hold as written (not the MoE names the index also answers)."""
        return sorted(dict.keys(self.entries))

    def pieces(self, name: str, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """A tensor's elements, 1-D, in pieces of at most ``max_bytes``: a pass over a checkpoint larger than
        memory (the NaN/Inf check of a 70B model) holds one piece, not one tensor (a 70B embedding is 2–4 GB)."""
        f, offset, dtype, _shape, nbytes = self.entries[name]
        item = torch.empty((), dtype=dtype).element_size()
        step = max(item, max_bytes // item * item)
        with f.open("rb") as fh:
            fh.seek(offset)
            for start in range(0, nbytes, step):
                size = min(step, nbytes - start)
                buf = bytearray(size)
                if fh.readinto(buf) != size:
                    from infra.errors import CorruptArtifactError

                    raise CorruptArtifactError(f"{f} is truncated (tensor {name})")
                yield torch.frombuffer(buf, dtype=dtype)


class _ExpertEntries(dict):  # type: ignore[type-arg]
    """``WeightIndex.entries`` of an MoE checkpoint: a name of the unfused model that the checkpoint does not hold
    as written resolves to the byte range that holds it (renamed module, per-expert tensor, or rows of a fused
    tensor's expert slice). Every such tensor is one contiguous range, so reads stay one tensor at a time."""

    def __init__(self, entries: dict[str, Any], mapping: ArchMapping) -> None:
        super().__init__(entries)
        self.mapping = mapping

    def __missing__(self, name: str) -> Any:
        entry = self._resolve(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and self._resolve(name) is not None)

    def _resolve(self, name: str) -> Any:
        moe = self.mapping.moe
        head = self.mapping.blocks + "."
        if moe is None or not name.startswith(head):
            return None
        index, _, rest = name[len(head) :].partition(".")
        if not index.isdigit():
            return None
        block = f"{head}{index}."
        for mem, disk in moe.disk_renames:
            if rest.startswith(mem + "."):
                return self.get(block + disk + rest[len(mem) :])
        if not rest.startswith(moe.experts + "."):
            return None
        e_str, _, linear = rest[len(moe.experts) + 1 :].partition(".")
        gate, up, down = (f"{x}.weight" for x in EXPERT_LINEARS)
        disk_names = {gate: moe.disk_gate, up: moe.disk_up, down: moe.disk_down}
        if not e_str.isdigit() or linear not in disk_names:
            return None
        per_expert = self.get(f"{block}{moe.disk_experts}.{e_str}.{disk_names[linear]}.weight")
        if per_expert is not None:
            return per_expert
        # fused on disk: [E, 2I, H] gate rows then up rows, or [E, H, I]; expert e's rows are one byte range
        fused = self.get(f"{block}{moe.experts}.{moe.down if linear == down else moe.gate_up}")
        if fused is None:
            return None
        f, offset, dtype, shape, nbytes = fused
        per = nbytes // shape[0]
        start = offset + int(e_str) * per
        if linear == down:
            return (f, start, dtype, list(shape[1:]), per)
        half = per // 2
        return (f, start + (half if linear == up else 0), dtype, [shape[1] // 2, shape[2]], half)


def expert_entries(path: Path, entries: dict[str, Any]) -> dict[str, Any]:
    """``entries`` as they are for a dense model; for an MoE family (read from ``path/config.json``) a mapping
    that also answers the unfused model's expert and renamed names (see :class:`_ExpertEntries`)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return entries
    try:
        mapping = mapping_for(json.loads(config_path.read_text()).get("architectures") or [])
    except ValueError:
        return entries
    return entries if mapping.moe is None else _ExpertEntries(entries, mapping)
