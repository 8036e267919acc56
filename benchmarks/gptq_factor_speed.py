"""Seconds of a GPTQ sweep's factor U = chol(H_λ⁻¹): the paper's chain vs ``quant.gptq.sweep_factor``.

The paper (and llm-compressor, in float32) computes chol(H) → cholesky_inverse → chol: ≈ 4n³/3 flops and an
explicit H⁻¹. ``sweep_factor`` factors the order-reversed H once and inverts the triangle in place (≈ 2n³/3).
Both run here in float64 on the same H, back to back, and the script prints the ratio and the largest
difference between the two U (relative to max |U|):

    .venv/bin/python benchmarks/gptq_factor_speed.py --widths 1536 4096 8960
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quant.gptq import inverse_cholesky, sweep_factor
from quant.hessian import fixed_hessian

RESULTS = Path(__file__).resolve().parent / "results"


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n // 2, n, generator=g) * torch.rand(n, generator=g)  # uneven input scales, like activations
    return (X.T @ X / X.shape[0]).float()  # held float32, as the quantize stage holds H


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1536, 4096, 8960])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for n in args.widths:
        H = spd(n, n)
        perm = torch.argsort(torch.diagonal(H), descending=True)
        chain = best_of(lambda H=H, p=perm: inverse_cholesky(fixed_hessian(H, p), 0.01, 1.0, "bench"), args.repeats)
        ours = best_of(lambda H=H, p=perm: sweep_factor(H, p, 0.01, 1.0, "bench", torch.float32), args.repeats)
        ref, _ = inverse_cholesky(fixed_hessian(H, perm), 0.01, 1.0, "bench")
        diff = float((sweep_factor(H, perm, 0.01, 1.0, "bench", torch.float32).upper() - ref).abs().max())
        rows.append(
            {
                "n": n,
                "paper_chain_s": round(chain, 3),
                "sweep_factor_s": round(ours, 3),
                "ratio": round(ours / chain, 3),
                "max_rel_diff_U": diff / float(ref.abs().max()),
                "threads": torch.get_num_threads(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_factor_speed.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
