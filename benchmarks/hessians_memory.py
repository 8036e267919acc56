"""Peak RSS of the hessians stage vs model depth (streamed blocks ⇒ memory must not grow with depth).

Builds random Llama checkpoints of SmolLM2's width (hidden 576, MLP 1536, 9/3 heads) with 8 and 32 layers,
runs calibration + hessians for each in a fresh subprocess, and reports the child's peak RSS next to the size of
the fp32 weights. Writes ``benchmarks/results/hessians_memory.json``.

    .venv/bin/python benchmarks/hessians_memory.py --depths 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from infra.settings import get_settings
from tasks.calibration import run_calibration, run_model
from tasks.hessians import run_hessians
from tasks.models import resolve_model
from tasks.recipe import CalibrationConfig, HessianConfig
from tasks.stage import StageContext
from tasks.driver import peak_rss_mb
settings = get_settings(refresh=True)
ctx = StageContext(settings=settings, store_url=settings.effective_store_url, progress=False)
model = resolve_model(sys.argv[1], settings)
m = run_model(ctx, model)
cal = run_calibration(ctx, model, m.ref, CalibrationConfig(n_samples=int(sys.argv[2]), seq_len=512))
base = peak_rss_mb()
t = time.perf_counter()
h = run_hessians(ctx, model.path, m.ref, cal.ref, HessianConfig())
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_before_hessians_mb": base,
                  "hessians_increment_mb": peak_rss_mb() - base, "hessians_s": time.perf_counter() - t}))
"""


def build(depth: int, root: Path) -> Path:
    from tests.helpers.models import build_tiny_llama

    return build_tiny_llama(
        root / f"llama-{depth}", num_layers=depth, hidden=576, intermediate=1536, heads=9, kv_heads=3, seed=depth
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            path = build(depth, Path(tmp))
            weights_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
            env = {**os.environ, "QUANTPIPE_HOME": str(Path(tmp) / f"home-{depth}"), "PYTHONPATH": str(repo)}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(args.samples)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=repo,
            )
            row = {
                "depth": depth,
                "weights_fp32_mb": round(weights_mb, 1),
                **{k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()},
            }
            rows.append(row)
            print(json.dumps(row))
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        summary = {
            "depth_ratio": b["depth"] / a["depth"],
            "weights_ratio": round(b["weights_fp32_mb"] / a["weights_fp32_mb"], 2),
            "peak_rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2),
        }
        print(json.dumps(summary))
        rows.append({"summary": summary})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hessians_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
