"""Stage ``hessians``: one forward pass of the fp model, Σ x xᵀ per distinct linear input, one artifact per block.

Per-block artifacts (``hessian-block``) are committed as soon as a block is done, so a killed run resumes at the
first missing block (earlier blocks are only re-forwarded, without hooks). The stage artifact is an index of the
block artifacts plus the peak RSS, which stays near one block + activations because blocks are streamed.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from infra.errors import QuantpipeError
from infra.keys import ArtifactRef
from tasks.recipe import HessianConfig
from tasks.stage import StageContext, StageResult, ensure_artifact, run_stage, stage_key

__all__ = ["BLOCK_VERSION", "STAGE_VERSION", "load_block_hessians", "load_tokens", "run_hessians"]

# 2: Gram matrices from the upper block triangle (ULP-level changes); 3: blocks stored compact (BLOCK_VERSION 2)
STAGE_VERSION = 3
# 2: each Σxxᵀ stored as its upper triangle in float32 (quant.hessian_store), ≈ 0.25x the bytes of full float64
BLOCK_VERSION = 2


def load_tokens(ctx: StageContext, cal_ref: str) -> Any:
    from safetensors.torch import load

    return load(ctx.store.read_bytes(cal_ref, "tokens.safetensors"))["input_ids"]


def load_block_hessians(ctx: StageContext, block_ref: str, groups: list[str] | None = None) -> dict[str, Any]:
    """{group: (H_sum fp64 [n, n], n tokens)} of one block artifact (verified read); compact (upper triangle,
    BLOCK_VERSION 2) and full (version 1) layouts both read."""
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
                out[g] = (unpack_upper(f.get_tensor(f"{g}.H_upper"), int(f.get_tensor(f"{g}.dim").item())), n)
    return out


def run_hessians(
    ctx: StageContext, model_path: Any, model_ref: str, cal_ref: str, cfg: HessianConfig, *, progress: Any = None
) -> StageResult:
    import torch
    from safetensors.torch import save

    from quant.hessian import check_finite
    from quant.hessian_store import pack_upper
    from tasks.driver import BlockStreamer, collect_block_hessians, for_each_block, peak_rss_mb

    config = cfg.key_config()
    inputs = {"model": model_ref, "calibration": cal_ref}

    def block_ref(i: int) -> ArtifactRef:
        return stage_key("hessian-block", BLOCK_VERSION, {**config, "block": i}, inputs)

    def produce(w: Any, run: Any) -> None:
        streamer = BlockStreamer(model_path, device=ctx.settings.resolved_device())
        refs = [block_ref(i) for i in range(streamer.n_blocks)]
        done = [ctx.store.exists(r) and ctx.store.verify(r).ok for r in refs]
        todo = [i for i, d in enumerate(done) if not d]
        ids = load_tokens(ctx, cal_ref)
        tokens = int(ids.numel())

        def visit(i: int, block: Any, hidden: Any) -> Any:
            stats, out = collect_block_hessians(streamer, block, hidden, micro_batch=cfg.micro_batch)
            tensors = {}
            for g, s in stats.items():
                assert s.H is not None and s.x_sum is not None
                try:
                    check_finite(s.H, f"{streamer.block_name(i)}.{g}")
                except ValueError as exc:
                    raise QuantpipeError(str(exc)) from None
                tensors[f"{g}.H_upper"] = pack_upper(s.H)
                tensors[f"{g}.dim"] = torch.tensor(s.H.shape[0], dtype=torch.int64)
                tensors[f"{g}.x_sum"] = s.x_sum
                tensors[f"{g}.n"] = torch.tensor(s.n, dtype=torch.int64)
            payload = save(tensors)

            def produce_block(bw: Any, _run: Any) -> None:
                bw.add_bytes("hessians.safetensors", payload)
                bw.metadata.update(
                    {
                        "block": i,
                        "tokens": tokens,
                        "dims": {g: int(s.H.shape[0]) for g, s in stats.items() if s.H is not None},
                    }
                )

            ensure_artifact(ctx, "hessian-block", BLOCK_VERSION, {**config, "block": i}, inputs, produce_block)
            return out

        if todo:
            autocast = (
                torch.autocast(streamer.device.type, dtype=torch.bfloat16)
                if cfg.compute_dtype == "bfloat16"
                else contextlib.nullcontext()
            )
            with autocast:
                for_each_block(
                    streamer,
                    ids,
                    visit,
                    skip=lambda i: done[i],
                    progress=progress,
                    micro_batch=cfg.micro_batch,
                    until=max(todo),
                )
        w.add_bytes("index.json", json.dumps({"blocks": [str(r) for r in refs]}, indent=1).encode())
        w.metadata.update(
            {
                "blocks": [str(r) for r in refs],
                "groups": [g.name for g in streamer.mapping.groups],
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
