"""Pipeline benchmark on SmolLM2-135M-Instruct (BENCHMARKS.md protocol): quality, stage timings, caching.

Runs, in one fresh QUANTPIPE_HOME (or --home):
  1. the full flow for each recipe (default: gptq-w4g64 first, then the others reusing its Hessians),
  2. a rerun of the first recipe with only the eval window count changed (cache-hit check),
and writes one JSON object per run to ``benchmarks/results/pipeline_smollm2.jsonl`` plus a markdown summary.

    .venv/bin/python benchmarks/pipeline_smollm2.py --recipes gptq-w4g64 rtn-w4g64 gptq-w4g128 gptq-w3g64

Peer reference numbers (llm-compressor 0.14, same machine kind) are in ../shared/BENCHMARKS.md; the peer's
wall time is measured by ``benchmarks/peer_llmcompressor.py`` back to back when its venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
UPSTREAM = ("model", "calibration", "hessians", "quantize", "pack")


def run(recipe_name: str, overrides: list[str]) -> dict:
    from flows.prefect_backend import with_prefect_backend
    from flows.quantize import quantize_model
    from flows.runners import task_runner_for
    from tasks.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    if overrides:
        recipe = recipe.with_overrides(overrides)
    started = time.perf_counter()
    # as `quantpipe quantize` runs it: this process's own Prefect server (exits with it)
    flow = with_prefect_backend(quantize_model.with_options(task_runner=task_runner_for(recipe.quantize.workers, None)))
    out = flow(model="smollm2-135m", recipe=recipe)
    wall = time.perf_counter() - started
    stages = out["stages"]
    return {
        "recipe": recipe_name,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "calib_to_pack_s": round(sum(stages[s]["seconds"] for s in UPSTREAM if s in stages), 1),
        "stages": stages,
        "metrics": out["metrics"],
        "model_version": out["model_version"],
        "aliases": out["aliases"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["gptq-w4g64", "rtn-w4g64", "gptq-w4g128", "gptq-w3g64"])
    parser.add_argument("--home", default=None, help="QUANTPIPE_HOME (default: a fresh dir under /tmp)")
    parser.add_argument("--no-rerun", action="store_true", help="skip the eval-only rerun")
    parser.add_argument("--out", default=str(RESULTS / "pipeline_smollm2.jsonl"))
    args = parser.parse_args()
    os.environ["QUANTPIPE_HOME"] = args.home or f"/tmp/quantpipe-bench-{int(time.time())}"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import torch

    from infra.settings import get_settings
    from tasks.models import fetch_demo_model

    fetch_demo_model("smollm2-135m", get_settings(refresh=True), progress=False)
    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    rows = []
    for name in args.recipes:
        rows.append(run(name, []))
        print(json.dumps(rows[-1]["metrics"] | {"recipe": name, "calib_to_pack_s": rows[-1]["calib_to_pack_s"]}))
    if not args.no_rerun:
        rerun = run(args.recipes[0], ["eval.n_windows=8"])
        rerun["upstream_all_hits"] = all(rerun["stages"][s]["cache_hit"] for s in UPSTREAM)
        rerun["fraction_of_full_run"] = round(rerun["wall_s"] / rows[0]["wall_s"], 3)
        rows.append(rerun)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps({**machine, **row}) + "\n")
    print("\n| recipe | overrides | ppl | fp ppl | Δ | stored bits/w | calib→pack s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        print(
            f"| {r['recipe']} | {' '.join(r['overrides']) or '-'} | {m['ppl']:.2f} | {m['ppl_fp']:.2f} | "
            f"{100 * m['ppl_delta_rel']:+.1f} % | {m['bits_per_weight_stored']:.3f} | {r['calib_to_pack_s']} | "
            f"{r['wall_s']} |"
        )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
