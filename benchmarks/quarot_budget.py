"""Where does QuaRot's W4A4KV4 perplexity budget go? Weights, activations and KV cache switched on one at a time.

The issue-6 target is W4A4KV4 within +30 % of the fp perplexity. This script splits the measured degradation into
its parts on the protocol's windows, all against the same fp number:

* ``fp``: the original checkpoint; ``rotated``: the QuaRot fp checkpoint (folded norms, R1, V/O and down_proj
  rotations, online Hadamards) — equal to fp up to rounding, the sanity row;
* ``rotated+kv4`` / ``rotated+a4`` / ``rotated+a4+kv4``: the fp rotated weights with the packed recipe's KV-cache
  and/or activation quantizers (exactly the evaluated runtime, weights unquantized);
* ``w4`` / ``w4+kv4`` / ``w4+a4+kv4``: the packed checkpoint's quantized weights with none, the KV, or all of its
  runtime — the last row is the recipe's evaluated perplexity.

The rotated fp checkpoint is rebuilt from ``--model`` with the packed checkpoint's rotation seed (no store needed).

    python benchmarks/quarot_budget.py --model <smollm2 dir> --packed <store>/artifacts/pack/<key>/native \\
        --windows 16 --out benchmarks/results/quarot_budget.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("fp", "rotated", "rotated+kv4", "rotated+a4", "rotated+a4+kv4", "w4", "w4+kv4", "w4+a4+kv4")


def load_fp(path: Path, runtime: dict[str, Any] | None = None) -> Any:
    """A plain fp checkpoint (rotated or not) with its online rotations and the given A/KV runtime installed."""
    from transformers import AutoModelForCausalLM

    from tasks.quarot import install_runtime

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    install_runtime(model, json.loads((path / "config.json").read_text()), runtime)
    return model


def runtime_subset(runtime: dict[str, Any], row: str) -> dict[str, Any]:
    parts = {"kv_cache"} if row.endswith("kv4") else set()
    if "+a4" in row:
        parts.add("activations")
    return {k: v for k, v in runtime.items() if k in parts}


def main() -> None:
    from infra.settings import Settings
    from tasks.checkpoint import load_packed_model
    from tasks.evaluate import eval_windows, perplexity
    from tasks.quarot import QUAROT_KEY, write_rotated_checkpoint
    from tasks.recipe import EvalConfig, RotationConfig
    from tasks.stage import StageContext

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the original fp checkpoint folder")
    ap.add_argument("--packed", type=Path, required=True, help="packed QuaRot A4/KV4 checkpoint folder (native/)")
    ap.add_argument("--wikitext", type=Path, default=None, help="wikitext-2-raw folder (default: settings)")
    ap.add_argument("--windows", type=int, default=16, help="2048-token windows (the protocol's first N)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    packed_config = json.loads((args.packed / "config.json").read_text())
    if QUAROT_KEY not in packed_config:
        raise SystemExit(f"{args.packed} is not a QuaRot checkpoint (no {QUAROT_KEY} in its config.json)")
    runtime = packed_config["quantization_config"].get("runtime") or {}
    if not {"activations", "kv_cache"} <= set(runtime):
        raise SystemExit(f"{args.packed} quantizes {sorted(runtime) or 'neither'}; need activations and kv_cache")
    settings = Settings(**({"wikitext_dir": args.wikitext} if args.wikitext else {}))
    ctx = StageContext(settings=settings, store_url=settings.effective_store_url)
    windows = eval_windows(args.packed, EvalConfig(n_windows=args.windows), ctx)
    rotation = packed_config[QUAROT_KEY]
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rotated = Path(tmp) / "rotated"
        if any(r.startswith("rotated") for r in args.rows):
            cfg = RotationConfig(kind="quarot", seed=rotation["seed"], fallback=rotation["fallback"])
            write_rotated_checkpoint(args.model, rotated, cfg)
        for row in args.rows:
            if row == "fp":
                model = load_fp(args.model)
            elif row.startswith("rotated"):
                model = load_fp(rotated, runtime_subset(runtime, row))
            else:
                model = load_packed_model(args.packed, runtime_parts=runtime_subset(runtime, row))
            t0 = time.perf_counter()
            ppl = perplexity(model, windows)["ppl"]
            rows[row] = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
            del model
            print(f"{row:>15}: ppl {ppl:8.3f}", flush=True)
    base = rows.get("fp", {}).get("ppl")
    if base:
        for r in rows.values():
            r["rel_to_fp"] = r["ppl"] / base - 1
    result = {"packed": str(args.packed), "runtime": runtime, "windows": args.windows, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
