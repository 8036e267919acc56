"""Peak memory of GPTQ's inverse-Hessian factor: the copying chain vs the in-place one (``quant.gptq.sweep_factor``).

For each width n, two fresh subprocesses hold the same float64 Hessian (act-order permutation, one dead input) and
compute U = chol((H + λ·mean diag·I)⁻¹) in ``float32`` for the sweep:

* ``copy``: the chain before 2026-12-02 — fix dead inputs (copy), permute (``H[perm][:, perm]``), damp (copy),
  Cholesky, ``cholesky_inverse``, Cholesky, cast;
* ``in-place``: ``sweep_factor`` — one float64 copy built in row panels, factored in place on its column-major
  view; the sweep converts it to float32 one band of rows at a time (``SweepFactor.band``), no full cast.

Each prints its peak RSS above the Hessian it was handed, in units of one n×n float64 matrix, so the numbers carry to
any width: at a Llama-3-70B down_proj (n = 28,672) one such matrix is 6.6 GB.

``--layer M`` adds a third subprocess per width: the whole parallel-mode layer as the quantize stage runs it
(``tasks.quantize._quantize_tensor`` with the shipped ``gptq-w4g64`` config on a random [M, n] weight, the layer's
own H_sum as a stored block reads back — float32 — finalized in place, the sweep, the exact proxy loss), its peak
above H_sum and W (still in units of one n×n float64 matrix; H_sum itself is half of one).

    .venv/bin/python benchmarks/gptq_memory.py [--widths 4096 8192] [--layer 8192]

Writes ``benchmarks/results/gptq_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(mode: str, n: int, m: int = 0) -> dict[str, float]:
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from quant.gptq import inverse_cholesky, sweep_factor
    from quant.hessian import fix_dead_inputs

    def hwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def reset_hwm() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    H = torch.full((n, n), 0.25, dtype=torch.float64)  # SPD without a second n×n temporary
    H.diagonal().add_(torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1.0)
    H[3, :] = 0
    H[:, 3] = 0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    matrix_mb = n * n * 8 / 2**20
    reset_hwm()
    base = hwm_mb()
    t0 = time.time()
    if mode == "layer":
        from quant.hessian import HELD_DTYPE, finalize
        from tasks.quantize import _quantize_tensor
        from tasks.recipe import load_recipe

        W = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
        H.diagonal().mul_(1000.0)  # H_sum of 1000 tokens: finalize scales by 2/1000
        H = H.to(torch.float32)  # as a stored block's triangle reads back (hessian-block v2)
        reset_hwm()
        base = hwm_mb()
        t0 = time.time()
        H = finalize(H, 1000, in_place=True, dtype=HELD_DTYPE)  # as quantize_layer does
        q = _quantize_tensor(W, H, load_recipe("gptq-w4g64").quantize, "bench")
        seconds = time.time() - t0
        del H
        return {
            "peak_above_H_and_W_matrices": round((hwm_mb() - base) / matrix_mb, 2),
            "seconds": round(seconds, 1),
            "proxy_loss_exact": float(q.stats["proxy_loss_exact"]),
        }
    if mode == "copy":
        H_fixed, _ = fix_dead_inputs(H)
        H_fixed = H_fixed[perm][:, perm]
        U64, _ = inverse_cholesky(H_fixed, 0.01, 1.0, "bench")
        U = U64.to(torch.float32)
        u = float(U[0, 0])
    else:  # the float64 factor; the sweep converts one band of rows at a time
        u = float(sweep_factor(H, perm, 0.01, 1.0, "bench", torch.float32).band(0, 1)[0, 0])
    seconds = time.time() - t0
    return {
        "peak_above_H_matrices": round((hwm_mb() - base) / matrix_mb, 2),
        "seconds": round(seconds, 1),
        "u": u,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--layer", type=int, default=0, help="also the whole layer with this many output rows")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "N", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    rows = []
    for n in args.widths:
        row: dict = {"n": n, "matrix_gb": round(n * n * 8 / 1e9, 3)}
        for mode in ("copy", "in-place") + (("layer",) if args.layer else ()):
            cmd = [sys.executable, __file__, "--child", mode, str(n), str(args.layer)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[mode] = json.loads(out.strip().splitlines()[-1])
        if row["copy"]["u"] != row["in-place"]["u"]:
            raise SystemExit(f"n={n}: the two factors differ ({row['copy']['u']} vs {row['in-place']['u']})")
        ratio = row["in-place"]["peak_above_H_matrices"] / max(row["copy"]["peak_above_H_matrices"], 1e-9)
        row["ratio_in_place_vs_copy"] = round(ratio, 3)
        if args.layer:
            row["layer_rows"] = args.layer
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = ROOT / "benchmarks" / "results" / "gptq_memory.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
