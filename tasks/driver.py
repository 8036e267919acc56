"""The layer driver: one generic loop that streams a causal LM block by block (STYLE.md item 7).

Only the embeddings, ONE decoder block's weights and the calibration activations are in memory at a time: the
model skeleton lives on the ``meta`` device and each block is materialised from the safetensors files just before
it runs, then dropped. Per block: (hooks → Hessians) → optional block edit (quantize) → re-forward → swap the
ping-pong activation buffers. Peak memory is therefore one block + activations, independent of depth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infra.errors import QuantpipeError
from quant.arch import ROLES, ArchMapping, LinearGroup, mapping_for
from quant.hessian import accumulate
from tasks.weights import WeightIndex

__all__ = [
    "BlockStreamer",
    "GroupStats",
    "collect_block_hessians",
    "merge_group_stats",
    "peak_rss_mb",
    "quantize_block_by_group",
]


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


_WeightIndex = WeightIndex  # the old private name, still imported by some stages


@dataclass
class GroupStats:
    """Mergeable Hessian statistics of one linear input: sum of x xᵀ, sum of x, token count (fp64)."""

    H: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    n: int = 0
    pooled: GroupStats | None = None  # an expert's group: the block's statistics pooled over experts (tasks.moe)
    first_token_weight: float = 1.0  # HessianConfig.first_token_weight: position 0 of each sample counts this much

    def add(self, x: torch.Tensor) -> None:
        if self.first_token_weight != 1.0:
            if x.dim() < 3:
                raise QuantpipeError(
                    "hessians.first_token_weight needs token positions, and routed MoE expert inputs have none; "
                    "leave it at 1 for mixture-of-experts models"
                )
            x = x.clone()
            x[:, 0] *= math.sqrt(self.first_token_weight)  # Σ (√w x)(√w x)ᵀ = w·x xᵀ for that token
        x2 = x.reshape(-1, x.shape[-1])
        self.H, self.n = accumulate(self.H, self.n, x2)
        s = x2.sum(0, dtype=torch.float64)
        self.x_sum = s if self.x_sum is None else self.x_sum + s


def merge_group_stats(parts: list[GroupStats], pooled: dict[tuple[int, ...], GroupStats] | None = None) -> GroupStats:
    """One linear input's statistics from the partials of calibration shards, summed in shard order into the first
    partial's tensors, which the merge consumes (a single partial is returned as it is). ``pooled`` memoizes the
    merge of MoE pooled statistics, which every expert of a role shares (pass the same dict for one block).

    Σ x xᵀ is the float64 sum of per-micro-batch float32 Gram products (``quant.hessian.accumulate``), and shards
    hold whole micro-batches, so the merged sum has the very terms one running sum has, added in another
    association: ((g1 + g2) + (g3 + g4)) instead of (((g1 + g2) + g3) + g4). Float64 addition of float32 values is
    exact unless an entry's terms span more than ~2^25 in magnitude, so the sums are equal bit for bit but in such
    rare entries, where they differ in the last float64 bit (the same holds for the hessians stage's reduce, whose
    float32 storage also rounds that away). Σ x differs in its last bits more often; quantization does not read it.
    """
    if len(parts) == 1:
        return parts[0]
    out = GroupStats(first_token_weight=parts[0].first_token_weight)
    for p in parts:  # shard order; each partial is consumed (its shard does not read it after the barrier), so the
        # merge holds one sum, not k + 1 (a 70B down_proj's is 6.6 GB)
        if p.H is not None:
            out.H = p.H if out.H is None else out.H.add_(p.H)
            p.H = None
        if p.x_sum is not None:
            out.x_sum = p.x_sum if out.x_sum is None else out.x_sum.add_(p.x_sum)
            p.x_sum = None
        out.n += p.n
    shared = [p.pooled for p in parts if p.pooled is not None]
    if shared:
        memo = {} if pooled is None else pooled
        key = tuple(id(p) for p in shared)
        if key not in memo:
            memo[key] = merge_group_stats(shared)
        out.pooled = memo[key]
    return out


class BlockStreamer:
    """Materialise parts of a causal LM on demand from its checkpoint directory."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from tasks.models import model_construction

        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        self.mapping: ArchMapping = mapping_for(self.config.architectures or [])
        with model_construction(), torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        from tasks.moe import unfuse_model  # fused experts → per-expert linears (each gets its own Hessian)

        unfuse_model(self.model, self.mapping)
        self.config_dict: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        from tasks.quarot_runtime import install_runtime  # rotated checkpoints: online Hadamards before o/down_proj

        install_runtime(self.model, json.loads((self.path / "config.json").read_text()))
        self.weights = WeightIndex(self.path)
        rotary = self.module(self.mapping.rotary)
        self.rotary = type(rotary)(config=self.config).to(self.device)
        self.n_blocks = len(self.module(self.mapping.blocks))
        self._index = {id(b): i for i, b in enumerate(self.module(self.mapping.blocks))}  # type: ignore[arg-type]
        self._kwargs: dict[int, list[dict[str, Any]]] = {}

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def block_name(self, i: int) -> str:
        return f"{self.mapping.blocks}.{i}"

    def block_groups(self, block: nn.Module) -> tuple[LinearGroup, ...]:
        """The linear groups of ``block`` (per layer: MoE layers have one pair per expert, dense layers do not)."""
        try:
            return self.mapping.groups_for_layer(self.config_dict, self._index[id(block)])
        except KeyError:
            raise ValueError("block_groups: not one of this model's decoder blocks") from None

    def load(self, name: str) -> nn.Module:
        """Materialise module ``name`` (weights from disk) on the target device."""
        mod = self.module(name)
        mod.to_empty(device=self.device)
        for sub in mod.modules():  # non-persistent buffers (Gemma's embed_scale) are not in the checkpoint:
            if getattr(sub, "_non_persistent_buffers_set", None):  # transformers' own init recomputes them
                self.model._init_weights(sub)
        state = {}
        for pname in mod.state_dict():
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

    @torch.no_grad()
    def block_kwargs(self, block: nn.Module, seq_len: int) -> dict[str, Any]:
        """The keyword arguments the model's own forward passes to ``block`` for a ``seq_len``-token sequence
        without cache: attention mask (causal, sliding window or whatever the layer's attention kind is),
        position embeddings and ids, and any family-specific extras.

        Captured from the model's real decoder loop run on a dummy input with every block stubbed out (blocks and
        embeddings stay on the meta device), so a block forwarded here computes exactly what it computes inside
        transformers' full forward — Hessians are statistics of the real function (a sliding-window model run
        with no mask differed by 83–90 % at window 32, length 128)."""
        if seq_len not in self._kwargs:
            self._kwargs[seq_len] = self._capture_block_kwargs(seq_len)
        try:
            return self._kwargs[seq_len][self._index[id(block)]]
        except KeyError:
            raise ValueError("block_kwargs: not one of this model's decoder blocks") from None

    def _capture_block_kwargs(self, seq_len: int) -> list[dict[str, Any]]:
        blocks = self.module(self.mapping.blocks)
        base_name, _, rotary_attr = self.mapping.rotary.rpartition(".")
        base = self.module(base_name)
        captured: list[dict[str, Any]] = []

        class _DoneError(Exception):
            pass

        def stub(_hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                raise ValueError(f"decoder blocks of {self.mapping.architectures} take positional extras")
            captured.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
            if len(captured) == len(blocks):  # type: ignore[arg-type]
                raise _DoneError
            return _hidden

        real_rotary = getattr(base, rotary_attr)
        setattr(base, rotary_attr, self.rotary)
        for block in blocks:  # type: ignore[attr-defined]
            block.forward = stub
        try:
            dummy = torch.zeros(1, seq_len, self.config.hidden_size, dtype=self.dtype, device=self.device)
            base(inputs_embeds=dummy, use_cache=False)
        except _DoneError:
            pass
        finally:
            for block in blocks:  # type: ignore[attr-defined]
                del block.forward
            setattr(base, rotary_attr, real_rotary)
        if len(captured) != len(blocks):  # type: ignore[arg-type]
            raise ValueError(f"captured the inputs of {len(captured)} of {len(blocks)} decoder blocks")  # type: ignore[arg-type]
        return captured

    @torch.no_grad()
    def run_block(self, block: nn.Module, hidden: torch.Tensor, *, micro_batch: int = 8) -> torch.Tensor:
        """Forward every sample of ``hidden`` [n, seq, d] through ``block`` as the model's forward would (its mask,
        position embeddings and attention kind; no cache)."""
        out = torch.empty_like(hidden)
        kwargs = self.block_kwargs(block, hidden.shape[1])
        for start in range(0, hidden.shape[0], micro_batch):
            chunk = hidden[start : start + micro_batch]
            res = block(chunk, **kwargs)
            out[start : start + micro_batch] = res[0] if isinstance(res, tuple) else res
        return out


def collect_block_hessians(
    streamer: BlockStreamer,
    block: nn.Module,
    hidden: torch.Tensor,
    *,
    micro_batch: int = 8,
    first_token_weight: float = 1.0,
) -> tuple[dict[str, GroupStats], torch.Tensor]:
    """Hessian statistics of every linear group of ``block`` and the block's outputs, in one forward pass. An
    expert's groups see only the tokens routed to it; MoE blocks also get the pooled expert statistics
    (``tasks.moe.pool_expert_stats``)."""
    groups = streamer.block_groups(block)
    stats = {g.name: GroupStats(first_token_weight=first_token_weight) for g in groups}
    handles = []
    for g in groups:
        first = block.get_submodule(g.linears[0])

        def hook(_mod: nn.Module, args: tuple[Any, ...], _name: str = g.name) -> None:
            stats[_name].add(args[0].detach())

        handles.append(first.register_forward_pre_hook(hook))
    try:
        out = streamer.run_block(block, hidden, micro_batch=micro_batch)
    finally:
        for h in handles:
            h.remove()
    from tasks.moe import pool_expert_stats  # no-op for a block without experts

    pool_expert_stats(stats, block, groups)
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

    ``visit(i, block, hidden)`` returns the block's outputs (it may edit the block first) or ``None``, and then
    the block is forwarded here, unless it is the last one run (its outputs would feed nothing); when ``skip(i)``
    is true the block is only forwarded (resume replay); blocks after ``until`` are not run at all. Buffers
    ping-pong: one block's input and output at a time.
    """
    hidden: torch.Tensor | None = streamer.embed(input_ids)
    last = streamer.n_blocks - 1 if until is None else until
    for i in range(last + 1):
        assert hidden is not None  # only the last block may leave no outputs
        name = streamer.block_name(i)
        with streamer.loaded(name) as block:
            out = None if skip(i) else visit(i, block, hidden)
            if out is None and i < last:
                out = streamer.run_block(block, hidden, micro_batch=micro_batch)
        hidden = out
        if progress is not None:
            progress(i)


class _StopForwardError(Exception):
    """Raised by a capture hook: the rest of the block is not needed for this input."""


def _capture_input(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """``module``'s input (after its other pre-hooks, e.g. QuaRot's online transform) when ``run()`` reaches it."""
    seen: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _StopForwardError

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the block forward never reached {type(module).__name__}; check the architecture mapping")
    return seen[0]


@contextmanager
def _replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The linear map alone: ``x`` was captured after the module's pre-hooks, which must not run twice."""
    return torch.nn.functional.linear(x, module.weight, getattr(module, "bias", None))


KEEP_BYTES = 2 << 30  # quantize_block_by_group keeps the down_proj inputs of a block up to this size


@torch.no_grad()
def quantize_block_by_group(
    streamer: BlockStreamer,
    block: nn.Module,
    hidden: torch.Tensor,
    quantize_group: Callable[[str, GroupStats], None],
    *,
    micro_batch: int = 8,
    keep_bytes: int = KEEP_BYTES,
    first_token_weight: float = 1.0,
    outputs: bool = True,
) -> torch.Tensor | None:
    """True-sequential quantization of one block in a single calibration forward; returns the block's outputs
    (``None`` with ``outputs=False``: the last block's outputs feed nothing, and at a 70B block computing them is
    a quarter of the block's forward time).

    Each linear group's Hessian is collected from the outputs of the groups before it *after* they were quantized
    (``quantize_group(name, stats)`` must write the group's quantized weights into ``block``): q/k/v from the
    input norm; o_proj from attention over the quantized q/k/v; gate/up from the norm of the residual with the
    quantized o_proj; down_proj from the quantized gate/up. Every intermediate is computed once and kept per
    micro-batch (attention output, MLP input; the down_proj input too unless it exceeds ``keep_bytes``, then it
    is recomputed), so the block costs one forward instead of llm-compressor's two (calibrate, then propagate).
    """
    m = streamer.mapping
    groups = streamer.block_groups(block)
    by_name = {g.name: g for g in groups}
    if set(by_name) != set(ROLES):  # a sparse block: its experts' groups share roles
        return _quantize_block_by_role(
            streamer,
            block,
            hidden,
            groups,
            quantize_group,
            micro_batch=micro_batch,
            first_token_weight=first_token_weight,
            outputs=outputs,
        )
    first = {name: block.get_submodule(g.linears[0]) for name, g in by_name.items()}
    attn, mlp = block.get_submodule(m.attention), block.get_submodule(m.mlp)
    kwargs = streamer.block_kwargs(block, hidden.shape[1])
    chunks = [hidden[s : s + micro_batch] for s in range(0, hidden.shape[0], micro_batch)]

    def call(x: torch.Tensor) -> Any:
        return block(x, **kwargs)

    def run_group(name: str, inputs: Callable[[int], torch.Tensor], keep: bool) -> list[torch.Tensor]:
        stats, kept = GroupStats(first_token_weight=first_token_weight), []
        for i in range(len(chunks)):
            x = inputs(i)
            stats.add(x)
            if keep:
                kept.append(x)
        quantize_group(name, stats)
        return kept

    run_group("attn_in", lambda i: _capture_input(first["attn_in"], lambda: call(chunks[i])), keep=False)
    attn_in = run_group("o_in", lambda i: _capture_input(first["o_in"], lambda: call(chunks[i])), keep=True)
    attn_out = [_linear(first["o_in"], a) for a in attn_in]
    del attn_in
    current = 0

    def cached_attention(*_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, None]:
        return attn_out[current], None

    def mlp_input(i: int) -> torch.Tensor:
        nonlocal current
        current = i
        with _replaced_forward(attn, cached_attention):
            return _capture_input(first["mlp_in"], lambda: call(chunks[i]))

    mlp_in = run_group("mlp_in", mlp_input, keep=True)
    d_bytes = sum(x[..., :1].numel() for x in mlp_in) * first["down_in"].in_features * hidden.element_size()
    down_in = run_group(
        "down_in",
        lambda i: _capture_input(first["down_in"], lambda: mlp(mlp_in[i])),
        keep=outputs and d_bytes <= keep_bytes,
    )
    if not outputs:
        return None

    mlp_forward = mlp.forward  # the real MLP, for a down_proj input too large to keep

    def cached_mlp(x: torch.Tensor) -> torch.Tensor:
        return _linear(first["down_in"], down_in[current]) if down_in else mlp_forward(x)

    out = torch.empty_like(hidden)
    start = 0
    for i, chunk in enumerate(chunks):
        current = i
        with _replaced_forward(attn, cached_attention), _replaced_forward(mlp, cached_mlp):
            res = call(chunk)
        out[start : start + chunk.shape[0]] = res[0] if isinstance(res, tuple) else res
        start += chunk.shape[0]
    return out


@torch.no_grad()
def _quantize_block_by_role(
    streamer: BlockStreamer,
    block: nn.Module,
    hidden: torch.Tensor,
    groups: tuple[LinearGroup, ...],
    quantize_group: Callable[[str, GroupStats], None],
    *,
    micro_batch: int = 8,
    first_token_weight: float = 1.0,
    outputs: bool = True,
) -> torch.Tensor | None:
    """True-sequential quantization of a block whose groups are not one per role (a sparse MoE block: every
    expert and the shared expert have an ``mlp_in`` and a ``down_in`` group). One calibration forward per role in
    block order, each after the roles before it were quantized, so every expert's Hessian comes from the tokens
    the quantized attention routes to it; then one forward for the outputs (5 forwards instead of 1: the
    caching of :func:`quantize_block_by_group` assumes one linear per role)."""
    from tasks.moe import pool_expert_stats

    for role in ROLES:
        stage = tuple(g for g in groups if g.kind == role)
        if not stage:
            continue
        stats = {g.name: GroupStats(first_token_weight=first_token_weight) for g in stage}
        handles = []
        for g in stage:

            def hook(
                _mod: nn.Module, args: tuple[Any, ...], _name: str = g.name, _stats: dict[str, GroupStats] = stats
            ) -> None:
                _stats[_name].add(args[0].detach())

            handles.append(block.get_submodule(g.linears[0]).register_forward_pre_hook(hook))
        try:
            streamer.run_block(block, hidden, micro_batch=micro_batch)
        finally:
            for h in handles:
                h.remove()
        pool_expert_stats(stats, block, stage)
        for g in stage:
            quantize_group(g.name, stats[g.name])
    return streamer.run_block(block, hidden, micro_batch=micro_batch) if outputs else None
