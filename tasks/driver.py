"""The layer driver: one generic loop that streams a causal LM block by block (STYLE.md item 7).

Only the embeddings, ONE decoder block's weights and the calibration activations are in memory at a time: the
model skeleton lives on the ``meta`` device and each block is materialised from the safetensors files just before
it runs, then dropped. Per block: (hooks → Hessians) → optional block edit (quantize) → re-forward → swap the
ping-pong activation buffers. Peak memory is therefore one block + activations, independent of depth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.arch import ArchMapping, mapping_for
from quant.hessian import accumulate

__all__ = ["BlockStreamer", "GroupStats", "collect_block_hessians", "peak_rss_mb"]


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after a block is dropped.

    glibc raises its mmap threshold after large frees, so per-block weight buffers end up on the heap and freed
    blocks would stay resident; ``malloc_trim`` keeps peak RSS at one block instead of creeping with depth.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited from a forking parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


class _WeightIndex:
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


@dataclass
class GroupStats:
    """Mergeable Hessian statistics of one linear input: sum of x xᵀ, sum of x, token count (fp64)."""

    H: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        self.H, self.n = accumulate(self.H, self.n, x2)
        s = x2.sum(0, dtype=torch.float64)
        self.x_sum = s if self.x_sum is None else self.x_sum + s


class BlockStreamer:
    """Materialise parts of a causal LM on demand from its checkpoint directory."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        self.mapping: ArchMapping = mapping_for(self.config.architectures or [])
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        from tasks.quarot import install_runtime  # rotated checkpoints: online Hadamards before o/down_proj

        install_runtime(self.model, json.loads((self.path / "config.json").read_text()))
        self.weights = _WeightIndex(self.path)
        rotary = self.module(self.mapping.rotary)
        self.rotary = type(rotary)(config=self.config).to(self.device)
        self.n_blocks = len(self.module(self.mapping.blocks))

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def block_name(self, i: int) -> str:
        return f"{self.mapping.blocks}.{i}"

    def load(self, name: str) -> nn.Module:
        """Materialise module ``name`` (weights from disk) on the target device."""
        mod = self.module(name)
        mod.to_empty(device=self.device)
        state = {}
        for pname, _ in list(mod.named_parameters()) + list(mod.named_buffers()):
            full = f"{name}.{pname}"
            if full not in self.weights and full == f"{self.mapping.lm_head}.weight":
                full = f"{self.mapping.embed}.weight"  # tied embeddings
            state[pname] = self.weights.get(full).to(self.dtype)
        mod.load_state_dict(state, strict=True)
        return mod

    def unload(self, name: str) -> None:
        self.module(name).to("meta")
        _release_freed_memory()

    @contextmanager
    def loaded(self, name: str) -> Iterator[nn.Module]:
        mod = self.load(name)
        try:
            yield mod
        finally:
            self.unload(name)

    # ---- forward pieces ------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.loaded(self.mapping.embed) as emb:
            return emb(input_ids.to(self.device)).to(self.dtype)

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        cos, sin = self.rotary(hidden, pos)
        return cos, sin

    @torch.no_grad()
    def run_block(self, block: nn.Module, hidden: torch.Tensor, *, micro_batch: int = 8) -> torch.Tensor:
        """Forward every sample of ``hidden`` [n, seq, d] through ``block`` (causal attention, no cache)."""
        out = torch.empty_like(hidden)
        pe = self.position_embeddings(hidden[:1])
        for start in range(0, hidden.shape[0], micro_batch):
            chunk = hidden[start : start + micro_batch]
            res = block(chunk, attention_mask=None, position_embeddings=pe)
            out[start : start + micro_batch] = res[0] if isinstance(res, tuple) else res
        return out


def collect_block_hessians(
    streamer: BlockStreamer, block: nn.Module, hidden: torch.Tensor, *, micro_batch: int = 8
) -> tuple[dict[str, GroupStats], torch.Tensor]:
    """Hessian statistics of every linear group of ``block`` and the block's outputs, in one forward pass."""
    stats = {g.name: GroupStats() for g in streamer.mapping.groups}
    handles = []
    for g in streamer.mapping.groups:
        first = block.get_submodule(g.linears[0])

        def hook(_mod: nn.Module, args: tuple[Any, ...], _name: str = g.name) -> None:
            stats[_name].add(args[0].detach())

        handles.append(first.register_forward_pre_hook(hook))
    try:
        out = streamer.run_block(block, hidden, micro_batch=micro_batch)
    finally:
        for h in handles:
            h.remove()
    return stats, out


def for_each_block(
    streamer: BlockStreamer,
    input_ids: torch.Tensor,
    visit: Callable[[int, nn.Module, torch.Tensor], torch.Tensor | None],
    *,
    skip: Callable[[int], bool] = lambda i: False,
    progress: Callable[[int], None] | None = None,
    micro_batch: int = 8,
    until: int | None = None,
) -> None:
    """Stream the calibration activations through every block.

    ``visit(i, block, hidden)`` returns the block's outputs (it may edit the block first); when ``skip(i)`` is
    true the block is only forwarded (resume replay); blocks after ``until`` are not run at all. Buffers
    ping-pong: one block's input and output at a time.
    """
    hidden = streamer.embed(input_ids)
    last = streamer.n_blocks - 1 if until is None else until
    for i in range(last + 1):
        name = streamer.block_name(i)
        with streamer.loaded(name) as block:
            if skip(i):
                out = streamer.run_block(block, hidden, micro_batch=micro_batch)
            else:
                result = visit(i, block, hidden)
                out = result if result is not None else streamer.run_block(block, hidden, micro_batch=micro_batch)
        hidden = out
        if progress is not None:
            progress(i)
