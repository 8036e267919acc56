"""Quantize stage on a Dask LocalCluster: 1 vs 2 worker processes on this machine, plus a projected curve.

A synthetic Llama (random weights, ``--hidden``/``--intermediate``/``--layers``) is built once; each
configuration runs the full quantize-model flow into a *fresh* store (so the quantize stage is recomputed) and
reports that stage's wall time. Per-layer durations are read back from Prefect's task runs of the 1-worker run,
and the projection for N workers is ``serial part + LPT makespan of the per-layer times over N workers``
(the serial part = measured 1-worker stage time - sum of per-layer times). Writes
``benchmarks/results/dask_scaleout.json``.

    .venv/bin/python benchmarks/dask_scaleout.py [--hidden 1024 --intermediate 2816 --layers 4]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def makespan(durations: list[float], n: int) -> float:
    loads = [0.0] * n
    for d in sorted(durations, reverse=True):  # LPT: longest job to the least-loaded worker
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


def layer_durations(flow_run_id: str) -> list[float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.total_run_time.total_seconds() for r in runs if r.name.startswith("quantize-layer")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dask_scaleout.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qp-dask-bench-"))
    os.environ["QUANTPIPE_HOME"] = str(tmp / "home")
    from tests.flows.conftest import tiny_recipe, write_corpus
    from tests.helpers.models import build_tiny_llama

    wt = tmp / "wikitext"
    wt.mkdir()
    write_corpus(wt / "wiki.valid.raw", 400, 1)
    write_corpus(wt / "wiki.test.raw", 300, 2)
    os.environ["QUANTPIPE_WIKITEXT_DIR"] = str(wt)
    model_dir = build_tiny_llama(
        tmp / "synth-llama",
        num_layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=max(4, args.hidden // 128),
        kv_heads=max(2, args.hidden // 256),
        seed=0,
    )
    from flows.prefect_backend import with_prefect_backend
    from flows.quantize import quantize_model
    from flows.runners import task_runner_for

    recipe = tiny_recipe().model_copy(update={"name": "bench-gptq"})
    runs = {}
    per_layer: list[float] = []
    for n in args.workers:
        flow = with_prefect_backend(quantize_model.with_options(task_runner=task_runner_for(n, str(n))))
        t = time.perf_counter()
        out = flow(model=str(model_dir), recipe=recipe, store_url=(tmp / f"store-{n}").as_uri())
        total = time.perf_counter() - t
        stage = out["stages"]["quantize"]["seconds"]
        runs[n] = {"quantize_stage_s": round(stage, 2), "flow_total_s": round(total, 2), "ppl": out["metrics"]["ppl"]}
        if n == args.workers[0]:
            per_layer = layer_durations(out["flow_run_id"])
        print(f"{n} dask worker(s): quantize stage {stage:.2f} s, flow {total:.1f} s")
    base_n = args.workers[0]
    base = runs[base_n]["quantize_stage_s"]
    serial = max(0.0, base - makespan(per_layer, base_n))
    projection = {n: round(serial + makespan(per_layer, n), 2) for n in (1, 2, 4, 8, 16, 32) if per_layer}
    result = {
        "benchmark": "quantize stage on Dask LocalCluster (prefect-dask), fresh store per run",
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "linears": len(per_layer),
        },
        "recipe": "gptq w4 g32 (tests tiny recipe: 8x64 calibration)",
        "measured": runs,
        "speedup_measured": {n: round(base / r["quantize_stage_s"], 2) for n, r in runs.items()},
        "per_layer_s": {
            "n": len(per_layer),
            "sum": round(sum(per_layer), 2),
            "max": round(max(per_layer, default=0), 2),
            "values": [round(d, 3) for d in per_layer],
        },
        "serial_part_s": round(serial, 2),
        "projected_quantize_stage_s": projection,
        "projection_note": "serial part + LPT makespan of the measured per-layer task times; assumes one core "
        "per worker, store bandwidth not limiting, and no per-task overhead growth. Only 1 and 2 workers were "
        "measured (2-core machine).",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("measured", "speedup_measured", "projected_quantize_stage_s")}))


if __name__ == "__main__":
    main()
