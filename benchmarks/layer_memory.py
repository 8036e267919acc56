"""Where one layer's quantize holds memory: peak RSS per phase, in units of one n×n float32 matrix (issue 20).

A 70B down_proj (28,672 inputs) is too slow to profile phase by phase on 2 cores (25 min per try), but its
n²-sized terms are the same multiples of 4n² bytes at any width. This quantizes one random layer of ``--n``
inputs and ``--m`` outputs with a recipe's method, exactly as the quantize stage's parallel path does (the
stored float32 triangle unpacked, finalized in place, ``tasks.quantize._quantize_tensor``), while a thread samples
``VmRSS`` every 2 ms and attributes it to the innermost phase running (functions of ``quant/`` wrapped by name).
Terms that do not grow with n² (the E8P nearest-codeword search's chunk buffers, ~1.3 GB; the weight copies,
m×n) show up as a smaller multiple at a larger ``--n``; run two widths to tell them apart.

    .venv/bin/python benchmarks/layer_memory.py --recipe hadamard-e8p-w2 --n 4096 --m 256
    .venv/bin/python benchmarks/layer_memory.py --recipe gptq-w4g64 --n 4096 --m 256

Writes ``benchmarks/results/layer_memory-<recipe>-n<n>.json``; ``projected_gib_at`` multiplies each phase's
units by 4·28672² bytes (a 70B down_proj), an upper bound for the fixed terms.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = {  # module: functions whose time is attributed to their own name
    "quant.incoherence": ("incoherence_preprocess", "incoherence_postprocess", "proxy_loss"),
    "quant.e8p": ("quantize_e8p_ldlq", "sweep_factor", "proxy_loss"),
    "quant.gptq": ("quantize_gptq", "sweep_factor", "start_sweep"),
}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="hadamard-e8p-w2")
    parser.add_argument("--n", type=int, default=4096, help="inputs (the Hessian's width)")
    parser.add_argument("--m", type=int, default=256, help="outputs (rows of W)")
    parser.add_argument("--project-n", type=int, default=28672, help="width to project GiB at (70B down_proj)")
    parser.add_argument(
        "--shared-h", action="store_true", help="H shared with other linears (sequential q/k/v): not overwritten"
    )
    args = parser.parse_args()

    import importlib

    import torch

    from quant.hessian_store import pack_upper, unpack_upper
    from tasks.quantize import _finalized, _quantize_tensor
    from tasks.recipe import load_recipe

    torch.set_num_threads(1)
    stack = ["setup"]
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            where = "/".join(stack)
            peaks[where] = max(peaks.get(where, 0), _rss())
            time.sleep(0.002)

    def wrap(mod: Any, name: str) -> None:
        fn = getattr(mod, name)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            stack.append(name)
            try:
                return fn(*a, **k)
            finally:
                stack.pop()

        setattr(mod, name, timed)

    for module, names in PHASES.items():
        mod = importlib.import_module(module)
        for name in names:
            if hasattr(mod, name):
                wrap(mod, name)

    cfg = load_recipe(args.recipe).quantize
    n, m = args.n, args.m
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4 * n, n, generator=gen)
    packed = pack_upper((X.T @ X).double())  # what a hessian-block artifact stores
    del X
    W = torch.randn(m, n, generator=gen)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.05)
    base = _rss()
    stack[:] = ["unpack"]
    H = unpack_upper(packed, n, dtype=packed.dtype)
    del packed
    stack[:] = ["finalize"]
    H = _finalized(H, 4 * n, "layer")
    stack[:] = ["quantize"]
    _quantize_tensor(W, H, cfg, "layer", owned_h=not args.shared_h)
    stack[:] = ["after"]
    time.sleep(0.05)
    done.set()
    sampler.join()

    unit = 4 * n * n
    big = 4 * args.project_n**2
    rows = sorted(((p, (v - base) / unit) for p, v in peaks.items() if p != "setup"), key=lambda r: -r[1])
    out = {
        "recipe": args.recipe,
        "n": n,
        "m": m,
        "h": "shared (kept)" if args.shared_h else "the layer's own (overwritten by the rotated H)",
        "unit_bytes": unit,
        "base_rss_gib": round(base / 2**30, 3),
        "phases_units": {p: round(u, 2) for p, u in rows},
        "projected_gib_at": {
            "n": args.project_n,
            "phases": {p: round(u * big / 2**30, 2) for p, u in rows},
            "note": "units × 4n² bytes: exact for the n² terms, an over-estimate for fixed and m×n ones",
        },
    }
    print(
        f"{args.recipe}: n={n} m={m}, unit = one n×n float32 = {unit / 2**20:.0f} MiB, base RSS {base / 2**30:.2f} GiB"
    )
    for p, u in rows:
        print(f"{u:7.2f}  {p}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"layer_memory-{args.recipe}-n{n}{'-shared' if args.shared_h else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
