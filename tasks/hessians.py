"""Stage ``hessians``: one forward pass of the fp model, Σ x xᵀ per distinct linear input, one artifact per block.

Per-block artifacts (``hessian-block``) are committed as soon as a block is done, so a killed run resumes at the
first missing block (earlier blocks are only re-forwarded, without hooks). The stage artifact is an index of the
block artifacts plus the peak RSS, which stays near one block + activations because blocks are streamed.

Sharded collection (``hessians.shards`` > 1): Σ x xᵀ, Σ x and n are exactly additive over calibration samples, so
the samples are split into contiguous shards aligned to ``micro_batch`` (each shard sees the very micro-batches one
process would, so every chunk's Gram product is the same computation), each shard streams the blocks on its own
(a task of the flow's runner: threads locally, Dask workers with ``--dask``) and commits one ``hessian-partial`` per
(shard, block) — the unit of resume — and a reduce sums the partials in shard order into the usual block artifact.
The shard count is an execution setting: block and stage keys are the same whatever it is, and the partials, which
keep their float64 sums so the reduce loses nothing, are deleted once their block artifact is committed.
Sequential quantize mode collects its Hessians inside the quantize stage and shards them there, as threads that
meet at a barrier per linear group (``tasks.quantize._run_sequential``), with the same :func:`shard_ranges`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import QuantpipeError
from infra.keys import ArtifactRef
from tasks.recipe import HessianConfig
from tasks.stage import StageContext, StageResult, ensure_artifact, run_stage, stage_key

__all__ = [
    "BLOCK_VERSION",
    "PARTIAL_VERSION",
    "STAGE_VERSION",
    "ReduceJob",
    "ShardJob",
    "load_block_hessians",
    "forward_context",
    "load_tokens",
    "run_hessian_reduce",
    "run_hessian_shard",
    "run_hessians",
    "shard_ranges",
]

# 2: Gram matrices from the upper block triangle (ULP-level changes); 3: blocks stored compact (BLOCK_VERSION 2);
# 4: bf16 activations' Gram products by oneDNN's bf16 GEMM (quant.hessian._gram_precision; summation order)
STAGE_VERSION = 4
# 2: each Σxxᵀ stored as its upper triangle in float32 (quant.hessian_store), ≈ 0.25x the bytes of full float64
# 3: bf16 activations' Gram products by oneDNN's bf16 GEMM (float32-accurate, another summation order)
BLOCK_VERSION = 3
# 1: one shard's float64 upper-triangle sums for one block (deleted after the reduce); 2: as BLOCK_VERSION 3
PARTIAL_VERSION = 2

ShardMap = Callable[[list["ShardJob"]], list[list[str]]]
ReduceMap = Callable[[list["ReduceJob"]], Iterable[str]]


def load_tokens(ctx: StageContext, cal_ref: str) -> Any:
    from safetensors.torch import load

    return load(ctx.store.read_bytes(cal_ref, "tokens.safetensors"))["input_ids"]


def load_block_hessians(ctx: StageContext, block_ref: str, groups: list[str] | None = None) -> dict[str, Any]:
    """{group: (H_sum [n, n], n tokens)} of one block artifact (verified read); compact (upper triangle in float32,
    BLOCK_VERSION 2: read back as float32, exactly) and full float64 (version 1) layouts both read."""
    from safetensors import safe_open

    from quant.hessian_store import unpack_upper

    path = ctx.store.get(block_ref).file("hessians.safetensors")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        names = groups or sorted({k.split(".")[0] for k in keys})
        for g in names:
            n = int(f.get_tensor(f"{g}.n").item())
            if f"{g}.H" in keys:
                out[g] = (f.get_tensor(f"{g}.H"), n)
            else:
                packed = f.get_tensor(f"{g}.H_upper")
                out[g] = (unpack_upper(packed, int(f.get_tensor(f"{g}.dim").item()), dtype=packed.dtype), n)
    return out


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: calibration rows ``[start, stop)`` through the blocks, a partial for each of ``blocks``."""

    shard: int
    of: int
    start: int
    stop: int
    blocks: tuple[int, ...]
    model_path: str
    model_ref: str
    cal_ref: str
    cfg: HessianConfig


@dataclass(frozen=True)
class ReduceJob:
    """One block's reduce: the shards' partial refs in shard order, summed into the block artifact."""

    block: int
    partials: tuple[str, ...]
    tokens: int
    model_ref: str
    cal_ref: str
    cfg: HessianConfig


def shard_ranges(rows: int, shards: int, micro_batch: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, as even as possible in whole micro-batches (at most one shard per micro-batch)."""
    if rows < 1 or shards < 1 or micro_batch < 1:
        raise ValueError(f"need rows, shards and micro_batch >= 1, got {rows}, {shards}, {micro_batch}")
    units = -(-rows // micro_batch)
    k = min(shards, units)
    bounds = [min(rows, (units * s // k) * micro_batch) for s in range(k + 1)]
    return list(itertools.pairwise(bounds))


def forward_context(device_type: str, cfg: HessianConfig) -> Any:
    """The calibration forward's precision: a bf16 autocast without its weight-cast cache, or nothing.

    autocast caches the bf16 cast of every parameter it sees until the outermost context exits, keyed by the
    parameter. A calibration context spans every block, so the cache (1) kept a bf16 copy of each block's weights
    after the block itself was freed — 2 bytes per parameter of the whole model, 140 GB at 70B — and (2) served
    the stale cast of a weight that was since overwritten with its quantized values, so a true-sequential forward
    after quantizing (block scope; every role of an MoE block) ran the fp weights. Recasting per call costs one
    pass over the weight per micro-batch, against a matmul over thousands of tokens."""
    import torch

    if cfg.compute_dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _stats_tensors(stats: dict[str, Any], where: str, dtype: Any) -> dict[str, Any]:
    """One block's statistics as safetensors entries: upper triangles in ``dtype``, Σx (float64) and n.

    Consumes ``stats``: each group's float64 sum is dropped as soon as its triangle exists, so a block never holds
    every group's sum and every triangle at once (a 70B block: 8.1 GB of sums, 6.6 GB of them the down_proj's)."""
    import torch

    from quant.hessian import check_finite
    from quant.hessian_store import pack_upper

    tensors = {}
    for g, s in stats.items():
        assert s.H is not None and s.x_sum is not None
        try:
            check_finite(s.H, f"{where}.{g}")
        except ValueError as exc:
            raise QuantpipeError(str(exc)) from None
        tensors[f"{g}.H_upper"] = pack_upper(s.H, dtype)
        tensors[f"{g}.dim"] = torch.tensor(s.H.shape[0], dtype=torch.int64)
        s.H = None
        tensors[f"{g}.x_sum"] = s.x_sum
        tensors[f"{g}.n"] = torch.tensor(s.n, dtype=torch.int64)
    return tensors


def _partial_ref(job: ShardJob, block: int) -> ArtifactRef:
    config = {**job.cfg.key_config(), "block": block, "shard": job.shard, "of": job.of, "rows": [job.start, job.stop]}
    return stage_key("hessian-partial", PARTIAL_VERSION, config, {"model": job.model_ref, "calibration": job.cal_ref})


def run_hessian_shard(ctx: StageContext, job: ShardJob) -> list[str]:
    """Forward one shard through the blocks and commit its partial sums per block; returns the partial refs in
    ``job.blocks`` order. Partials already committed (a killed run) are only re-forwarded."""
    import torch
    from safetensors.torch import save

    from tasks.driver import BlockStreamer, collect_block_hessians, for_each_block

    refs = {i: _partial_ref(job, i) for i in job.blocks}
    todo = {i for i, r in refs.items() if not (ctx.store.exists(r) and ctx.store.verify(r).ok)}
    if todo:
        streamer = BlockStreamer(Path(job.model_path), device=ctx.settings.resolved_device())
        ids = load_tokens(ctx, job.cal_ref)[job.start : job.stop]
        config = {**job.cfg.key_config(), "shard": job.shard, "of": job.of, "rows": [job.start, job.stop]}
        inputs = {"model": job.model_ref, "calibration": job.cal_ref}

        def visit(i: int, block: Any, hidden: Any) -> Any:
            stats, out = collect_block_hessians(
                streamer, block, hidden, micro_batch=job.cfg.micro_batch, first_token_weight=job.cfg.first_token_weight
            )
            payload = save(_stats_tensors(stats, streamer.block_name(i), torch.float64))

            def produce_partial(pw: Any, _run: Any) -> None:
                pw.add_bytes("hessians.safetensors", payload)
                pw.metadata.update({"block": i, "shard": job.shard, "of": job.of, "rows": [job.start, job.stop]})

            ensure_artifact(ctx, "hessian-partial", PARTIAL_VERSION, {**config, "block": i}, inputs, produce_partial)
            return out

        with forward_context(streamer.device.type, job.cfg):
            for_each_block(
                streamer, ids, visit, skip=lambda i: i not in todo, micro_batch=job.cfg.micro_batch, until=max(todo)
            )
    return [str(refs[i]) for i in job.blocks]


def _reduce_partials(ctx: StageContext, refs: Sequence[str]) -> tuple[dict[str, Any], int]:
    """Sum the shards' partial statistics of one block in shard order; (safetensors entries as one process
    writes them, token count)."""
    import torch
    from safetensors import safe_open

    sums: dict[str, Any] = {}
    for ref in refs:
        path = ctx.store.get(ref).file("hessians.safetensors")
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if name.endswith(".dim"):
                    if name in sums and int(sums[name]) != int(t):
                        raise QuantpipeError(f"partials {refs[0]} and {ref} disagree on {name}; recollect Hessians")
                    sums[name] = t
                else:
                    sums[name] = t if name not in sums else sums[name] + t
    tensors = {k: (v.to(torch.float32) if k.endswith(".H_upper") else v) for k, v in sums.items()}
    tokens = max((int(v) for k, v in sums.items() if k.endswith(".n")), default=0)
    return tensors, tokens


def _block_ref(cfg: HessianConfig, model_ref: str, cal_ref: str, i: int) -> ArtifactRef:
    inputs = {"model": model_ref, "calibration": cal_ref}
    return stage_key("hessian-block", BLOCK_VERSION, {**cfg.key_config(), "block": i}, inputs)


def _commit_block(
    ctx: StageContext, cfg: HessianConfig, model_ref: str, cal_ref: str, i: int, tensors: dict[str, Any], tokens: int
) -> None:
    from infra.safetensors_io import write_streaming

    dims = {k[: -len(".dim")]: int(v) for k, v in tensors.items() if k.endswith(".dim")}

    def produce_block(bw: Any, _run: Any) -> None:
        # Straight from the triangles into the staging file: no whole-payload ``bytes`` copy (4.1 GB at a 70B
        # block, the part of the hessians stage's peak above 16 GiB; benchmarks/RESULTS.md).
        write_streaming(tensors, bw.path("hessians.safetensors"))
        bw.metadata.update({"block": i, "tokens": tokens, "dims": dims})

    inputs = {"model": model_ref, "calibration": cal_ref}
    ensure_artifact(ctx, "hessian-block", BLOCK_VERSION, {**cfg.key_config(), "block": i}, inputs, produce_block)


def run_hessian_reduce(ctx: StageContext, job: ReduceJob) -> str:
    """Sum one block's partials in shard order into its block artifact, then delete the partials (the block now
    holds their sum); returns the block ref. Blocks are independent, so the flow runs these as tasks on its runner
    (Dask workers with --dask) instead of one process reading every shard's partial of every block."""
    tensors, _ = _reduce_partials(ctx, job.partials)
    _commit_block(ctx, job.cfg, job.model_ref, job.cal_ref, job.block, tensors, job.tokens)
    for ref in job.partials:
        ctx.store.delete(ref)
    return str(_block_ref(job.cfg, job.model_ref, job.cal_ref, job.block))


def _local_map(ctx: StageContext) -> ShardMap:
    from concurrent.futures import ThreadPoolExecutor

    def run(jobs: list[ShardJob]) -> list[list[str]]:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="hessian-shard") as pool:
            return list(pool.map(lambda job: run_hessian_shard(ctx, job), jobs))

    return run


def run_hessians(
    ctx: StageContext,
    model_path: Any,
    model_ref: str,
    cal_ref: str,
    cfg: HessianConfig,
    *,
    progress: Any = None,
    map_shards: ShardMap | None = None,
    map_reduce: ReduceMap | None = None,
) -> StageResult:
    """The hessians stage. With ``cfg.shards`` > 1 the shards run through ``map_shards`` (the flow passes one that
    submits a task per shard to its runner; default: local threads) and their partials are reduced per block
    through ``map_reduce`` (the flow: a task per block; default: one after the other here), each block's sum in
    shard order, so the blocks are bit-identical whatever the shard count and however the reduces are spread."""
    import torch

    from tasks.driver import BlockStreamer, collect_block_hessians, for_each_block, peak_rss_mb

    config = cfg.key_config()
    inputs = {"model": model_ref, "calibration": cal_ref}

    def block_ref(i: int) -> ArtifactRef:
        return _block_ref(cfg, model_ref, cal_ref, i)

    def commit_block(i: int, tensors: dict[str, Any], tokens: int) -> None:
        _commit_block(ctx, cfg, model_ref, cal_ref, i, tensors, tokens)

    def produce(w: Any, run: Any) -> None:
        streamer = BlockStreamer(model_path, device=ctx.settings.resolved_device())
        refs = [block_ref(i) for i in range(streamer.n_blocks)]
        done = [ctx.store.exists(r) and ctx.store.verify(r).ok for r in refs]
        todo = [i for i, d in enumerate(done) if not d]
        ids = load_tokens(ctx, cal_ref)
        tokens = int(ids.numel())
        ranges = shard_ranges(int(ids.shape[0]), cfg.shards, cfg.micro_batch)

        if todo and len(ranges) > 1:
            jobs = [
                ShardJob(s, len(ranges), a, b, tuple(todo), str(model_path), model_ref, cal_ref, cfg)
                for s, (a, b) in enumerate(ranges)
            ]
            partials = (map_shards or _local_map(ctx))(jobs)
            reduces = [
                ReduceJob(i, tuple(shard_refs[n] for shard_refs in partials), tokens, model_ref, cal_ref, cfg)
                for n, i in enumerate(todo)
            ]
            reduce_all = map_reduce or (lambda rjobs: (run_hessian_reduce(ctx, j) for j in rjobs))
            for done_ref, job in zip(reduce_all(reduces), reduces, strict=True):
                if done_ref != str(block_ref(job.block)):
                    raise QuantpipeError(f"the reduce of block {job.block} committed {done_ref}, not its block key")
                if progress is not None:
                    progress(job.block)
        elif todo:

            def visit(i: int, block: Any, hidden: Any) -> Any:
                stats, out = collect_block_hessians(
                    streamer, block, hidden, micro_batch=cfg.micro_batch, first_token_weight=cfg.first_token_weight
                )
                commit_block(i, _stats_tensors(stats, streamer.block_name(i), torch.float32), tokens)
                return out

            with forward_context(streamer.device.type, cfg):
                for_each_block(
                    streamer,
                    ids,
                    visit,
                    skip=lambda i: done[i],
                    progress=progress,
                    micro_batch=cfg.micro_batch,
                    until=max(todo),
                )
        layers = range(streamer.n_blocks)  # MoE layers add per-expert groups (quant.arch.ArchMapping.groups_for_layer)
        groups = list(
            dict.fromkeys(g.name for i in layers for g in streamer.mapping.groups_for_layer(streamer.config_dict, i))
        )
        w.add_bytes("index.json", json.dumps({"blocks": [str(r) for r in refs]}, indent=1).encode())
        w.metadata.update(
            {
                "blocks": [str(r) for r in refs],
                "groups": groups,
                "tokens": tokens,
                "resumed_blocks": sum(done),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
        if run is not None:
            run.log_metrics({"peak_rss_mb": peak_rss_mb(), "tokens": float(tokens), "resumed_blocks": sum(done)})

    def after(ref: Any, run: Any, hit: bool) -> dict[str, Any]:
        meta = ctx.store.manifest(ref).metadata
        return {"blocks": meta["blocks"], "peak_rss_mb": meta["peak_rss_mb"]}

    return run_stage(ctx, "hessians", STAGE_VERSION, config, inputs, produce, after=after)
