"""Methods benchmark on SmolLM2-135M-Instruct (BENCHMARKS.md protocol): ppl vs stored bits/weight per method.

Runs each recipe through the real quantize-model flow (calibration and Hessians are shared, so only quantize,
pack and evaluate run per recipe), appends one JSON object per recipe to
``benchmarks/results/methods_smollm2.jsonl``, then draws "ppl vs bits/weight for every method, fp line included"
from every row in that file (``benchmarks/results/methods_smollm2.png``) and logs the plot and the rows to MLflow.

    .venv/bin/python benchmarks/methods_smollm2.py --recipes gptq-w3g64 icquant-gptq-w3 gptqt-w3 mixed-gptq-3bit
    .venv/bin/python benchmarks/methods_smollm2.py --plot-only        # redraw from the JSONL

Each recipe takes ~10 min on 2 CPU cores (most of it the 16-window evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "methods_smollm2.jsonl"
PLOT = RESULTS / "methods_smollm2.png"
DEFAULT_RECIPES = (
    "gptq-w4g64",
    "gptq-w3g64",
    "gptq-w2g64",
    "rtn-w4g64",
    "hadamard-gptq-w3g64",
    "hadamard-gptq-w2g64",
    "hadamard-e8p-w2",
    "hadamard-e8p-w3",
    "quip-w3",
    "icquant-rtn-w2",
    "icquant-gptq-w2",
    "icquant-gptq-w3",
    "gptqt-w3",
    "gptqt-w2",
    "mixed-gptq-2.5bit",
    "mixed-gptq-3bit",
)
_BREAKDOWN = ("codes", "positions", "offsets", "grids", "other")


def result_row(recipe: Any, out: dict[str, Any], machine: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One JSONL row from a flow outcome: recipe, method, ppl (quantized, fp), measured bits/weight breakdown."""
    m = out["metrics"]
    return {
        **machine,
        "recipe": recipe.name,
        "method": recipe.quantize.effective_method() + _alloc_label(recipe.quantize.bitalloc),
        "ppl": m["ppl"],
        "ppl_fp": m["ppl_fp"],
        "ppl_delta_rel": m["ppl_delta_rel"],
        "bits_per_weight_stored": m["bits_per_weight_stored"],
        "bits_per_weight_codes": m.get("bits_per_weight_codes"),
        **{f"bpw_{p}": m.get(f"bits_per_weight_stored_{p}") for p in _BREAKDOWN},
        "eval_windows": m.get("windows"),
        "wall_s": round(wall_s, 1),
        "stages": {k: {f: v[f] for f in ("key", "cache_hit", "seconds")} for k, v in out["stages"].items()},
        "model_version": out.get("model_version"),
    }


def append_rows(rows: Iterable[dict[str, Any]], path: Path = JSONL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def load_rows(path: Path = JSONL) -> list[dict[str, Any]]:
    """Every row, the latest per recipe (a rerun replaces an older measurement)."""
    if not path.is_file():
        return []
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row["recipe"]] = row
    return list(latest.values())


def plot_ppl_vs_bits(rows: Sequence[dict[str, Any]], path: Path = PLOT, title: str = "SmolLM2-135M") -> Path:
    """Scatter of ppl (log) vs measured stored bits/weight, one colour per method, the fp ppl as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no benchmark rows to plot")
    fp = sorted(r["ppl_fp"] for r in rows)[len(rows) // 2]  # same protocol → one fp value; median if mixed
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.axhline(fp, color="gray", linestyle="--", label=f"fp32 ({fp:.2f})")
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bits_per_weight_stored"])
        xs = [r["bits_per_weight_stored"] for r in pts]
        ys = [r["ppl"] if math.isfinite(r["ppl"]) else float("nan") for r in pts]
        ax.plot(xs, ys, marker="o", color=cmap(i % 10), label=method)
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(r["recipe"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits / weight (measured: codes + positions + grids)")
    ax.set_ylabel("WikiText-2 ppl (log)")
    ax.set_title(f"{title}: ppl vs bits/weight")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_mlflow(plot: Path, rows: Sequence[dict[str, Any]], settings: Any = None) -> str:
    """A ``benchmark:methods`` run holding the plot, the rows and one ppl/bpw metric pair per recipe (step order)."""
    import tempfile

    from registry.tracking import flow_run, stage_run

    tags = {"benchmark": "methods_smollm2"}
    with tempfile.TemporaryDirectory() as tmp, flow_run("benchmark:methods", tags=tags, settings=settings) as parent:
        _log_rows(stage_run("methods-plot", parent_run_id=parent, settings=settings), plot, rows, Path(tmp))
    return parent


def _log_rows(opened: Any, plot: Path, rows: Sequence[dict[str, Any]], tmp: Path) -> None:
    with opened as run:
        run.log_figure_png(plot)
        for step, r in enumerate(sorted(rows, key=lambda r: r["bits_per_weight_stored"])):
            run.log_metrics({"ppl": r["ppl"], "bits_per_weight_stored": r["bits_per_weight_stored"]}, step=step)
        dump = tmp / "methods_rows.json"
        dump.write_text(json.dumps(list(rows), indent=1, sort_keys=True))
        run.log_artifact(dump)


def _alloc_label(bitalloc: Any) -> str:
    if bitalloc is None:
        return ""
    return "+bitalloc" + ("/group" if bitalloc.granularity == "group" else "")


def run_recipe(model: str, name: str, overrides: list[str], machine: dict[str, Any]) -> dict[str, Any]:
    from flows.prefect_backend import with_prefect_backend
    from flows.quantize import quantize_model
    from flows.runners import task_runner_for
    from tasks.recipe import load_recipe

    recipe = load_recipe(name)
    if overrides:
        recipe = recipe.with_overrides(overrides)
    started = time.perf_counter()
    # as `quantpipe quantize` runs it: this process's own Prefect server, which exits with it even when the
    # process is killed (Prefect's raw ephemeral server outlived a SIGTERM'd benchmark child)
    runner = with_prefect_backend(
        quantize_model.with_options(task_runner=task_runner_for(recipe.quantize.workers, None))
    )
    out = runner(model=model, recipe=recipe)
    return {**result_row(recipe, out, machine, time.perf_counter() - started), "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, repeatable")
    parser.add_argument("--home", default=None, help="QUANTPIPE_HOME (default: ~/.quantpipe, reusing its Hessians)")
    parser.add_argument("--out", default=str(JSONL))
    parser.add_argument("--plot", default=str(PLOT))
    parser.add_argument("--plot-only", action="store_true", help="only redraw and log the plot from --out")
    args = parser.parse_args()
    if args.home:
        os.environ["QUANTPIPE_HOME"] = args.home
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import torch

    from infra.settings import get_settings

    settings = get_settings(refresh=True)
    if not args.plot_only:
        if args.model == "smollm2-135m":
            from tasks.models import fetch_demo_model

            fetch_demo_model("smollm2-135m", settings, progress=False)
        machine = {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": args.model,
        }
        for name in args.recipes:
            row = run_recipe(args.model, name, args.overrides, machine)
            append_rows([row], Path(args.out))  # one line per finished recipe: a crash loses nothing
            print(json.dumps({k: row[k] for k in ("recipe", "ppl", "ppl_fp", "bits_per_weight_stored", "wall_s")}))
    rows = load_rows(Path(args.out))
    plot = plot_ppl_vs_bits(rows, Path(args.plot))
    run_id = log_to_mlflow(plot, rows, settings)
    print("\n| recipe | method | ppl | fp ppl | Δ | stored bits/w | positions | grids |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["bits_per_weight_stored"]):
        print(
            f"| {r['recipe']} | {r['method']} | {r['ppl']:.2f} | {r['ppl_fp']:.2f} | "
            f"{100 * r['ppl_delta_rel']:+.1f} % | "
            f"{r['bits_per_weight_stored']:.3f} | {r.get('bpw_positions') or 0:.3f} | "
            f"{r.get('bpw_grids') or 0:.3f} |"
        )
    print(f"results: {args.out}; plot: {plot} (MLflow run {run_id})")


if __name__ == "__main__":
    main()
