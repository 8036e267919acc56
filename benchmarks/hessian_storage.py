"""What storing Σxxᵀ as an fp32 upper triangle (hessian-block v2) costs in bytes and in quantization results.

Collects real Hessians of SmolLM2-135M-Instruct (first ``--blocks`` decoder blocks, ``--samples`` x 512 calibration
tokens of wiki.valid.raw), then quantizes every linear with GPTQ W4 g64 (the shipped grid: asym, MSE clip, act
order, static groups) twice: against the fp64 sum and against its fp32-rounded upper triangle. Prints and writes
(``benchmarks/results/hessian_storage.json``): bytes per block both ways, the fraction of codes that differ and the
relative change of the proxy loss per layer.

    .venv/bin/python benchmarks/hessian_storage.py --blocks 6 --samples 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "hessian_storage.json"))
    args = parser.parse_args()

    from infra.settings import get_settings
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
                a = _quantize_tensor(W, s.H, s.n, cfg, linear)
                b = _quantize_tensor(W, H32, s.n, cfg, linear)
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
