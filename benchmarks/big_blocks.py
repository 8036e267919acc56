"""Every stage on blocks of Llama-3-8B and Llama-3-70B shape: seconds and peak RSS per stage (issue 20).

Builds a random Llama checkpoint with the exact block shapes (8B: hidden 4096, MLP 14,336, 32 q / 8 kv heads;
70B: hidden 8192, MLP 28,672, 64 q / 8 kv heads), 2 blocks and the tests' small vocabulary, then runs the stages
of a recipe one after another in a fresh child process, resetting the kernel's peak-RSS counter (VmHWM, via
``/proc/self/clear_refs``) before each, so each stage's peak is its own. Full-model projections scale the
per-block seconds by the real depth (32 / 80 blocks); memory does not scale with depth because every stage streams
blocks (that is what the per-stage peaks check).

    .venv/bin/python benchmarks/big_blocks.py --shape 8b --recipe gptq-w4g64 --samples 32 --windows 2
    .venv/bin/python benchmarks/big_blocks.py --shape 70b --recipe hadamard-e8p-w2 --samples 16 --windows 1

``--model NAME`` runs the same per-stage measurement on a real fetched model instead (``quantpipe models fetch``),
evaluating 2048-token windows, e.g. Qwen2.5-Coder-1.5B beside llm-compressor (``real_models.py --peer-python``):

    .venv/bin/python benchmarks/big_blocks.py --model qwen2.5-coder-1.5b --recipe gptq-w4g64 --samples 32 --windows 2

Writes ``benchmarks/results/big_blocks-<shape>-<recipe>.json``. Calibration samples and eval windows are fewer
than the recipe's, and evaluation windows are 512 tokens (the random model's max positions), all stated in the
output, so a run fits in an hour on 2 cores; per-block time is linear in samples and windows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "depth": 32},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "depth": 80},
}

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from infra.settings import get_settings
from tasks.calibration import run_calibration, run_model
from tasks.models import resolve_model
from tasks.recipe import load_recipe
from tasks.stage import StageContext

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

def rss_gb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")

model_dir, recipe_name, samples, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
eval_len = int(sys.argv[5])
recipe = load_recipe(recipe_name)
recipe = recipe.model_copy(update={
    "calibration": recipe.calibration.model_copy(update={"n_samples": samples}),
    "eval": recipe.eval.model_copy(update={"n_windows": windows, "seq_len": eval_len}),
})
settings = get_settings(refresh=True)
ctx = StageContext(settings=settings, store_url=settings.effective_store_url, progress=False)
rows = []

def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime

def stage(name, fn):
    reset_peak()
    before = rss_gb("VmRSS")
    t, c = time.perf_counter(), cpu_s()
    out = fn()
    rows.append({"stage": name, "seconds": round(time.perf_counter() - t, 1), "cpu_s": round(cpu_s() - c, 1),
                 "rss_before_gb": round(before, 2), "peak_rss_gb": round(rss_gb("VmHWM"), 2)})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return out

model = resolve_model(model_dir, settings, progress=False)
m = stage("model", lambda: run_model(ctx, model))
cal = stage("calibration", lambda: run_calibration(ctx, model, str(m.ref), recipe.calibration))
hes = None
if recipe.quantize.mode == "parallel":
    from tasks.hessians import run_hessians
    hes = stage("hessians", lambda: run_hessians(ctx, model.path, str(m.ref), str(cal.ref), recipe.hessians))
from tasks.quantize import run_quantize
q = stage("quantize", lambda: run_quantize(
    ctx, model.path, str(m.ref), recipe.quantize, hessians_ref=str(hes.ref) if hes else None, cal_ref=str(cal.ref),
    block_refs=hes.metadata["blocks"] if hes else None, forward=recipe.hessians))
from tasks.pack import run_pack
p = stage("pack", lambda: run_pack(ctx, model.path, str(m.ref), str(q.ref), recipe.quantize, recipe.pack,
                                   runtime=recipe.runtime_config()))
from tasks.evaluate import run_eval_fp, run_evaluate
fp = stage("eval-fp", lambda: run_eval_fp(ctx, model.path, str(m.ref), recipe.eval))
ev = stage("evaluate", lambda: run_evaluate(ctx, model.path, str(p.ref), str(q.ref), str(fp.ref), recipe.eval))
print(json.dumps({"stages": rows, "metrics": {k: v for k, v in ev.metadata.items() if isinstance(v, (int, float))}}))
"""


def build(shape: str, blocks: int, root: Path) -> Path:
    """A random checkpoint with ``shape``'s exact block shapes (built in a child so its memory is returned)."""
    s = SHAPES[shape]
    out = root / f"llama-{shape}-{blocks}blocks"
    code = (
        "import sys; from pathlib import Path; from tests.helpers.models import build_tiny_llama; "
        f"build_tiny_llama(Path({str(out)!r}), num_layers={blocks}, hidden={s['hidden']}, "
        f"intermediate={s['intermediate']}, heads={s['heads']}, kv_heads={s['kv_heads']}, seed=0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    return out


def projection(
    args: argparse.Namespace, shape: dict, stages: list[dict], per_block: dict[str, float], *, rates: bool = True
) -> dict:
    """Full-depth seconds on this CPU (measured per block × depth) and on an H100 (``block_cost``'s operation
    counts ÷ its stated peaks × an assumed efficiency), with the count model checked against this CPU first
    (``rates=False`` skips that check: its bf16 GEMM timing alone took minutes beside another job)."""
    from block_cost import GPU_STEP_S, H100, H100_EFFICIENCY, block_ops, cpu_rates, seconds, sweep_steps

    recipe_mse = args.recipe.startswith("gptq")  # the shipped gptq recipes clip by MSE; E8P has no grid search
    dims = (shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"])
    ops = block_ops(*dims, tokens=args.samples * 512, seq_len=512, mse_clip=recipe_mse)
    measured_rates = cpu_rates() if rates else None
    gpu_model = seconds(ops, H100, H100_EFFICIENCY)
    gpu_serial = sweep_steps(*dims) * GPU_STEP_S
    measured = sum(per_block.get(k, 0.0) for k in ("hessians", "quantize"))
    depth = shape["depth"]
    return {
        "ops_per_block": {k: f"{v:.3g}" for k, v in ops.items()},
        "cpu_rates_measured": {k: f"{v:.3g}" for k, v in measured_rates.items()} if measured_rates else None,
        "cpu_model_s_per_block": round(sum(seconds(ops, measured_rates).values()), 1) if measured_rates else None,
        "cpu_measured_hessians_quantize_s_per_block": round(measured, 1),
        "cpu_full_model_hours": round(sum(per_block.values()) * depth / 3600, 2),
        "h100_model_s_per_block": round(sum(gpu_model.values()) + gpu_serial, 2),
        "h100_full_model_hours_hessians_quantize": round((sum(gpu_model.values()) + gpu_serial) * depth / 3600, 3),
        "h100_assumptions": f"H100 SXM5 dense peaks {H100} at {H100_EFFICIENCY:.0%} efficiency, "
        f"{GPU_STEP_S * 1e6:.0f} µs per serial sweep column; a projection from operation counts, not a measurement",
        "calibration_samples_for_full_protocol": 128,
        "note": "seconds scale linearly with calibration tokens in the forward and Gram terms only",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--model", default=None, help="a fetched model name or checkpoint dir instead of --shape")
    parser.add_argument("--recipe", default="gptq-w4g64")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (the recipe's seq_len)")
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows (the recipe's seq_len)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and store here (default: temp)")
    parser.add_argument("--no-cpu-rates", action="store_true", help="project without timing this CPU's GEMM rates")
    parser.add_argument(
        "--from-log",
        type=Path,
        default=None,
        help="write the report from the per-stage lines a run printed (its stderr) instead of running again",
    )
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    if args.from_log:
        lines = args.from_log.read_text().splitlines()
        rows = [json.loads(x) for x in lines if x.startswith('{"stage"')]
        write_shape_report(args, {"stages": rows, "metrics": {}}, rates=not args.no_cpu_rates)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if args.model:
            from infra.settings import get_settings
            from tasks.models import fetch_demo_model

            model_dir = fetch_demo_model(args.model, get_settings(), progress=False)
            eval_len = 2048
        else:
            model_dir = build(args.shape, args.blocks, root)
            eval_len = 512  # the random model's positions
            print(f"built {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
        env = {**os.environ, "QUANTPIPE_HOME": str(root / "home"), "PYTHONPATH": str(repo)}
        argv = [str(model_dir), args.recipe, str(args.samples), str(args.windows), str(eval_len)]
        child = subprocess.run(
            [sys.executable, "-c", CHILD, *argv],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    if args.model:
        upstream = [r for r in result["stages"] if r["stage"] in ("calibration", "hessians", "quantize", "pack")]
        report = {
            "model": args.model,
            "recipe": args.recipe,
            "calibration_samples": args.samples,
            "eval_windows": args.windows,
            "eval_seq_len": eval_len,
            "stages": result["stages"],
            "calibration_to_pack_s": round(sum(r["seconds"] for r in upstream), 1),
            "calibration_to_pack_cpu_s": round(sum(r["cpu_s"] for r in upstream), 1),
            "load_average_at_end": os.getloadavg(),
            "calibration_to_pack_peak_rss_gb": max(r["peak_rss_gb"] for r in upstream),
            "metrics": result["metrics"],
        }
        out = RESULTS / f"big_blocks-{args.model}-{args.recipe}.json"
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        print(f"wrote {out}")
        return
    write_shape_report(args, result, rates=not args.no_cpu_rates)


def write_shape_report(args: argparse.Namespace, result: dict, *, rates: bool) -> None:
    shape = SHAPES[args.shape]
    per_block = {r["stage"]: r["seconds"] / args.blocks for r in result["stages"]}
    report_projection = projection(args, shape, result["stages"], per_block, rates=rates)
    report = {
        "shape": args.shape,
        **shape,
        "recipe": args.recipe,
        "blocks": args.blocks,
        "calibration_samples": args.samples,
        "eval_windows": args.windows,
        "stages": result["stages"],
        "max_peak_rss_gb": max(r["peak_rss_gb"] for r in result["stages"]),
        "rss_unit": "GiB (2^30 bytes): VmHWM kB / 2^20",
        "projected_full_model_hours_this_cpu": round(sum(per_block.values()) * shape["depth"] / 3600, 2),
        "projection": report_projection,
        "metrics": result["metrics"],
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"big_blocks-{args.shape}-{args.recipe}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
