"""Where does QuaRot's W4A4KV4 loss come from? 4-bit activations switched on one input site at a time.

Loads a packed QuaRot checkpoint (the ``native`` folder of a pack artifact, e.g. from ``recipes/quarot-w4a4kv4``),
keeps its weights, online rotations and KV-cache quantization, and evaluates perplexity on the protocol's windows
with the activation quantizer on none, each, and all of the four input sites of a block (q/k/v, o_proj,
gate/up, down_proj) — plus, on one window, each site's relative quantization error ‖Q(x) − x‖² / ‖x‖² and
excess kurtosis at several clip ratios (a Gaussian input gives ≈ 1.2 % at the best clip: the 4-bit floor).

    python benchmarks/quarot_sites.py --checkpoint <store>/artifacts/pack/<key>/native --windows 4 \\
        --out benchmarks/results/quarot_sites.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SITES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
CLIPS = (0.7, 0.8, 0.9, 1.0)


def load_without_activation_quant(path: Path) -> tuple[Any, dict[str, Any]]:
    """The packed model with its rotations and KV quantization but no activation quantizer; and its runtime."""
    from tasks.checkpoint import load_packed_model

    runtime = json.loads((path / "config.json").read_text())["quantization_config"].get("runtime") or {}
    if "activations" not in runtime:
        raise SystemExit(f"{path} has no activation quantization in its runtime config (not an A4 recipe)")
    return load_packed_model(path, runtime_parts={"kv_cache"}), runtime["activations"]


def with_sites(model: Any, sites: list[str], acts: dict[str, Any]) -> list[Any]:
    from tasks.quarot_runtime import _act_quant, _pre_hook

    quant = _act_quant(int(acts["bits"]), float(acts["clip_ratio"]), int(acts.get("group_size", 0)))
    return [
        block.get_submodule(linear).register_forward_pre_hook(_pre_hook(quant))
        for block in model.model.layers
        for site in sites
        for linear in SITES[site]
    ]


def site_errors(model: Any, window: torch.Tensor, acts: dict[str, Any]) -> dict[str, dict[str, float]]:
    from kernels.actquant.ref import fake_quant_per_token

    seen: dict[str, list[dict[str, float]]] = {s: [] for s in SITES}

    def record(site: str) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].float().reshape(-1, args[0].shape[-1])
            c = x - x.mean(-1, keepdim=True)
            row = {"excess_kurtosis": float(((c**4).mean(-1) / c.var(-1) ** 2).median() - 3)}
            for clip in CLIPS:
                q = fake_quant_per_token(x, int(acts["bits"]), clip, int(acts.get("group_size", 0)))
                row[f"rel_err_clip{clip}"] = float(((q - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())
            seen[site].append(row)

        return hook

    hooks = [
        block.get_submodule(linears[0]).register_forward_pre_hook(record(site))
        for block in model.model.layers
        for site, linears in SITES.items()
    ]
    with torch.no_grad():
        model(window[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {s: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for s, rows in seen.items()}


def main() -> None:
    from infra.settings import Settings
    from tasks.evaluate import eval_windows, perplexity
    from tasks.recipe import EvalConfig
    from tasks.stage import StageContext

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="packed QuaRot checkpoint folder (native/)")
    ap.add_argument("--wikitext", type=Path, default=None, help="wikitext-2-raw folder (default: settings)")
    ap.add_argument("--windows", type=int, default=4, help="2048-token windows (the protocol's first N)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = Settings(**({"wikitext_dir": args.wikitext} if args.wikitext else {}))
    ctx = StageContext(settings=settings, store_url=settings.effective_store_url)
    windows = eval_windows(args.checkpoint, EvalConfig(n_windows=args.windows), ctx)
    model, acts = load_without_activation_quant(args.checkpoint)
    runs: dict[str, Any] = {}
    for label, sites in [("none", []), *[(s, [s]) for s in SITES], ("all", list(SITES))]:
        hooks = with_sites(model, sites, acts)
        t0 = time.perf_counter()
        ppl = perplexity(model, windows)["ppl"]
        for h in hooks:
            h.remove()
        runs[label] = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"A{acts['bits']} on {label:>9}: ppl {ppl:8.3f}", flush=True)
    errors = site_errors(model, windows[0], acts)
    for site, e in errors.items():
        print(f"{site:>9}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items()), flush=True)
    result = {"checkpoint": str(args.checkpoint), "activations": acts, "windows": args.windows, "ppl": runs}
    result["site_errors_window0"] = errors
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
