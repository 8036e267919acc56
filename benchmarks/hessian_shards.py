"""Sharded Hessian collection (issue 20): 1 vs 2 shards on a real model, and a projection to 8 / 32 workers.

Runs the hessians stage on the same model and calibration with ``hessians.shards`` = 1 and 2 (local threads, torch
threads split between them), each in a fresh store, timing every shard and the reduce. Checks that the two runs
wrote the same block keys and the same stored triangles. The projection to k workers divides the single run's
time by k (one shard per worker, each as fast as this machine) and adds the measured reduce per shard times k (the
reduce is serial in the driver), so it is what a Dask cluster of k equal machines would take.

    .venv/bin/python benchmarks/hessian_shards.py --model qwen2.5-coder-0.5b --samples 32 --seq-len 512

Writes ``benchmarks/results/hessian_shards-<model>.json``. Run it on an otherwise idle machine: the times are wall
clock.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def collect(model_src: str, home: Path, samples: int, seq_len: int, shards: int) -> dict[str, Any]:
    import torch

    from infra.settings import Settings
    from tasks import hessians
    from tasks.calibration import run_calibration, run_model
    from tasks.models import resolve_model
    from tasks.recipe import CalibrationConfig, HessianConfig
    from tasks.stage import StageContext

    settings = Settings(home=home, cache_dir=Path.home() / ".quantpipe" / "cache")
    ctx = StageContext(settings=settings, store_url=(home / "store").as_uri(), progress=False)
    model = resolve_model(model_src, settings, progress=False)
    m = run_model(ctx, model)
    cal = run_calibration(ctx, model, str(m.ref), CalibrationConfig(n_samples=samples, seq_len=seq_len))
    cores = os.cpu_count() or 1
    shard_times: list[dict[str, float]] = []

    def timed_map(jobs: list[Any]) -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        def one(job: Any) -> list[str]:
            t = time.perf_counter()
            refs = hessians.run_hessian_shard(ctx, job)
            shard_times.append({"samples": job.stop - job.start, "seconds": time.perf_counter() - t})
            return refs

        torch.set_num_threads(max(1, cores // len(jobs)))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            return list(pool.map(one, jobs))

    torch.set_num_threads(cores)
    t = time.perf_counter()
    if shards == 1:
        out = hessians.run_hessians(ctx, model.path, str(m.ref), str(cal.ref), HessianConfig())
        total = time.perf_counter() - t
        shard_times.append({"samples": samples, "seconds": total})
        reduce_s = 0.0
    else:
        cfg = HessianConfig(micro_batch=max(1, min(8, samples // shards)), shards=shards)
        out = hessians.run_hessians(ctx, model.path, str(m.ref), str(cal.ref), cfg, map_shards=timed_map)
        total = time.perf_counter() - t
        reduce_s = total - max(s["seconds"] for s in shard_times)
    blocks = out.metadata["blocks"]
    digests = [ctx.store.manifest(b).files[0].sha256 for b in blocks]
    return {
        "shards": shards,
        "wall_s": round(total, 1),
        "shard_times": shard_times,
        "reduce_s": round(reduce_s, 1),
        "ref": str(out.ref),
        "block_digests": digests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2):
            runs.append(collect(args.model, Path(tmp) / f"k{k}", args.samples, args.seq_len, k))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "block_digests"}), flush=True)
    one, two = runs
    # One shard per worker, each worker as fast as this whole machine: the compute divides by k (the single run's
    # wall time / k: forward and Gram products are linear in the samples) and the reduce, serial in the driver,
    # grows with k (each shard's partial of every block is read and summed once).
    cores = os.cpu_count() or 1
    reduce_per_shard = two["reduce_s"] / 2
    projection = {str(k): round(one["wall_s"] / k + (reduce_per_shard * k if k > 1 else 0.0), 1) for k in (1, 2, 8, 32)}
    report = {
        "model": args.model,
        "calibration": f"{args.samples}x{args.seq_len} tokens",
        "cpu_cores": cores,
        "runs": [{k: v for k, v in r.items() if k != "block_digests"} for r in runs],
        "same_keys": one["ref"] == two["ref"],
        "same_stored_blocks": one["block_digests"] == two["block_digests"],
        "reduce_s_per_shard": round(reduce_per_shard, 1),
        "projected_wall_s_by_workers": projection,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hessian_shards-{args.model}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
