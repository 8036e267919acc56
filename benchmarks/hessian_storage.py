"""What storing Σxxᵀ as an fp32 upper triangle (hessian-block v2) costs in bytes and in quantization results.

Collects real Hessians of SmolLM2-135M-Instruct (first ``--blocks`` decoder blocks, ``--samples`` x 512 calibration
tokens of wiki.valid.raw), then quantizes every linear with GPTQ W4 g64 (the shipped grid: asym, MSE clip, act
order, static groups) twice: against the fp64 sum and against its fp32-rounded upper triangle. Prints and writes
(``benchmarks/results/hessian_storage.json``): bytes per block both ways, the fraction of codes that differ and the
relative change of the proxy loss per layer.

    .venv/bin/python benchmarks/hessian_storage.py --blocks 6 --samples 32

``--ppl RECIPE ...`` measures whole builds instead: each recipe runs end to end (the quantize-model flow, BENCHMARKS.md
protocol, as ``methods_smollm2.py``) twice, each in a fresh ``QUANTPIPE_HOME``: once as shipped (blocks stored as the
fp32 upper triangle) and once with the triangle stored in float64 (what the loader reads back is then the exact
float64 sum, i.e. the pre-v2 Hessians), and appends both perplexities to
``benchmarks/results/hessian_storage_ppl.jsonl``. The quantize stage holds H in float32 either way (layer v2+), so
this isolates what rounding the *stored sum* costs; with the protocol's 128 x 512 = 2^16 tokens the 2/n scaling is
exact and both give the same bits (``tests/quant/test_hessian_store.py``). Only parallel-mode builds read
stored Hessians (sequential ones collect their own), so use parallel recipes or ``--set quantize.mode=parallel``:

    .venv/bin/python benchmarks/hessian_storage.py --ppl hadamard-e8p-w2 gptq-w4g64 --set quantize.mode=parallel
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

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PPL_JSONL = RESULTS / "hessian_storage_ppl.jsonl"

# A child per build, so each sees a fresh store and only the float64 one is patched.
_BUILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
stored, recipe, overrides = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if stored == "float64":
    import tasks.hessians as h
    shipped = h._stats_tensors
    h._stats_tensors = lambda stats, where, _dtype: shipped(stats, where, torch.float64)
from methods_smollm2 import run_recipe
print(json.dumps(run_recipe("smollm2-135m", recipe, overrides, {})))
"""


def ppl_before_after(recipes: list[str], overrides: list[str], out: Path) -> None:
    """Whole-build perplexity with the Hessians stored as fp32 triangles (shipped) and as float64 ones."""
    here = Path(__file__).resolve().parent
    for recipe in recipes:
        row: dict = {"recipe": recipe, "overrides": overrides}
        for stored in ("float32", "float64"):
            with tempfile.TemporaryDirectory() as home:
                # A fresh store and tracking home per build, but the converted model is shared (not re-fetched).
                env = {
                    **os.environ,
                    "QUANTPIPE_HOME": home,
                    "QUANTPIPE_CACHE_DIR": os.environ.get(
                        "QUANTPIPE_CACHE_DIR", str(Path.home() / ".quantpipe" / "cache")
                    ),
                    "PYTHONPATH": str(here.parent),
                }
                t = time.perf_counter()
                child = subprocess.run(
                    [sys.executable, "-c", _BUILD, str(here), stored, recipe, json.dumps(overrides)],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                    check=True,
                )
                res = json.loads(child.stdout.strip().splitlines()[-1])
                row[stored] = {
                    "ppl": res.get("ppl"),
                    "ppl_fp": res.get("ppl_fp"),
                    "wall_s": round(time.perf_counter() - t),
                }
            print(recipe, stored, row[stored], flush=True)
        row["delta_ppl"] = row["float32"]["ppl"] - row["float64"]["ppl"]
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ppl", nargs="+", metavar="RECIPE", help="whole-build ppl, fp32 vs float64 storage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (with --ppl)")
    args = parser.parse_args()
    if args.ppl:
        ppl_before_after(args.ppl, args.overrides, Path(args.out or PPL_JSONL))
        return
    args.out = args.out or str(RESULTS / "hessian_storage.json")

    from infra.settings import get_settings
    from quant.hessian import finalize
    from quant.hessian_store import pack_upper, unpack_upper
    from tasks.calibration import load_texts
    from tasks.driver import BlockStreamer, collect_block_hessians, for_each_block
    from tasks.models import fetch_demo_model, load_tokenizer
    from tasks.quantize import _quantize_tensor
    from tasks.recipe import load_recipe

    settings = get_settings()
    path = fetch_demo_model("smollm2-135m", settings)
    text, _ = load_texts("wikitext2", settings)
    ids = load_tokenizer(path)(text, add_special_tokens=False).input_ids
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - 512, (args.samples,), generator=gen).tolist()
    windows = torch.tensor([ids[s : s + 512] for s in starts])
    cfg = load_recipe("gptq-w4g64").quantize
    streamer = BlockStreamer(path)
    rows: list[dict] = []
    blocks: list[dict] = []
    t0 = time.perf_counter()

    def visit(i: int, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        stats, out = collect_block_hessians(streamer, block, hidden)
        full = packed = 0
        for g, s in stats.items():
            assert s.H is not None
            full += s.H.numel() * 8
            tri = pack_upper(s.H)
            packed += tri.numel() * 4
            H32 = unpack_upper(tri, s.H.shape[0])
            for linear in streamer.mapping.groups[[x.name for x in streamer.mapping.groups].index(g)].linears:
                W = block.get_submodule(linear).weight.detach().clone()
                a = _quantize_tensor(W, finalize(s.H, s.n), cfg, linear)
                b = _quantize_tensor(W, finalize(H32, s.n), cfg, linear)
                differ = float((a.codes != b.codes).float().mean())  # type: ignore[union-attr]
                la = a.stats["proxy_loss_exact"]  # type: ignore[union-attr]
                lb = b.stats["proxy_loss_exact"]  # type: ignore[union-attr]
                rows.append(
                    {
                        "block": i,
                        "linear": linear,
                        "codes_differ": differ,
                        "proxy_loss_rel_change": (lb - la) / la,
                        "max_rel_entry_error": float(((H32 - s.H).abs() / s.H.abs().clamp_min(1e-30)).max()),
                    }
                )
        blocks.append({"block": i, "bytes_fp64_full": full, "bytes_fp32_upper": packed, "ratio": packed / full})
        print(f"block {i}: {packed / full:.4f}x bytes; codes differ {max(r['codes_differ'] for r in rows[-7:]):.2e}")
        return out

    for_each_block(streamer, windows, visit, until=args.blocks - 1)
    summary = {
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF bundle)",
        "calibration": f"{args.samples} x 512 tokens of wiki.valid.raw",
        "recipe_grid": "gptq-w4g64 (asym g64, MSE clip, act-order static)",
        "blocks": blocks,
        "layers": rows,
        "max_codes_differ": max(r["codes_differ"] for r in rows),
        "mean_codes_differ": sum(r["codes_differ"] for r in rows) / len(rows),
        "max_abs_proxy_loss_rel_change": max(abs(r["proxy_loss_rel_change"]) for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("layers", "blocks")}, indent=1))


if __name__ == "__main__":
    main()
