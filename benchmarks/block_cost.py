"""Operation counts of one decoder block through calibration → quantize, for projecting measured seconds.

``big_blocks.py`` measures a few blocks on this CPU; a full model is those seconds × depth (every stage streams
blocks). Projecting to another machine needs to know *what kind* of work the seconds were: the calibration
forward runs bf16 GEMMs, the Gram products and the column sweeps are fp32 GEMMs, the Cholesky chain of every
sweep is fp64, and the grid search is elementwise. ``block_ops`` counts each class from the block's shapes and
the quantizer's algorithm; ``cpu_rates`` measures this machine's rate for each class in the same run, so the
predicted CPU seconds can be checked against the measured ones before the same counts are divided by a GPU's
rates (``H100``: stated peaks × an assumed efficiency, not a measurement).
"""

from __future__ import annotations

import time
from typing import Any

# Dense peaks of an H100 SXM5 (NVIDIA datasheet), in FLOP/s; fp32 matmul without TF32 (torch's default for
# float32 matmul), fp64 on tensor cores. Elementwise work is bounded by HBM3 bandwidth (bytes/s).
H100: dict[str, float] = {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12, "bytes": 3.35e12}
H100_EFFICIENCY = 0.5  # assumed fraction of peak reached by these GEMM / Cholesky sizes
GPU_STEP_S = 10e-6  # one kernel launch per column step of a sweep (serial, latency-bound on a GPU)
MSE_CANDIDATES = 21  # quant.grid: range-shrink factors 1.0 … 0.5
SWEEP_BLOCK = 128


def linears(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, inputs, input width of its Hessian group) of a Llama-style block."""
    kv = kv_heads * (hidden // heads)
    return [
        ("q_proj", hidden, hidden, hidden),
        ("k_proj", kv, hidden, hidden),
        ("v_proj", kv, hidden, hidden),
        ("o_proj", hidden, hidden, hidden),
        ("gate_proj", intermediate, hidden, hidden),
        ("up_proj", intermediate, hidden, hidden),
        ("down_proj", hidden, intermediate, intermediate),
    ]


def block_ops(
    hidden: int, intermediate: int, heads: int, kv_heads: int, *, tokens: int, seq_len: int, mse_clip: bool
) -> dict[str, float]:
    """FLOPs per class (and elementwise bytes) of calibrating and GPTQ/LDLQ-quantizing one block.

    - bf16: the calibration forward, 2·T·P plus attention 4·T·s·d (one forward per block: the true-sequential
      driver keeps every intermediate, the parallel-mode hessians stage runs one too).
    - fp32: Gram products 2·T·n²·10/16 per Hessian group (``quant.hessian._add_gram``'s block triangle); per
      linear the sweep's lazy block updates (rows·n²), its in-block steps (2·rows·n·128), and the exact proxy
      loss tr(ΔW H ΔWᵀ) (2·rows·n²).
    - fp64: per linear a reversed Cholesky and a triangular inverse, ≈ 2n³/3 (``quant.gptq.sweep_factor``).
    - bytes: the MSE clip's 21 candidate grids read and write each weight (≈ 3 fp32 passes per candidate).
    """
    lin = linears(hidden, intermediate, heads, kv_heads)
    params = sum(r * c for _, r, c, _ in lin)
    groups = {hidden: 3, intermediate: 1}  # distinct Hessians: attn_in, o_in, mlp_in (all hidden) and down_in
    ops = {"bf16": 2.0 * tokens * params + 4.0 * tokens * seq_len * hidden, "fp32": 0.0, "fp64": 0.0, "bytes": 0.0}
    ops["fp32"] += sum(k * 2.0 * tokens * n * n * 10 / 16 for n, k in groups.items())
    for _, rows, n, _ in lin:
        ops["fp32"] += rows * n * n + 2.0 * rows * n * SWEEP_BLOCK + 2.0 * rows * n * n
        ops["fp64"] += 2.0 * n**3 / 3.0
        if mse_clip:
            ops["bytes"] += MSE_CANDIDATES * 3 * 4.0 * rows * n
    return ops


def sweep_steps(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """Column steps of all sweeps in a block (serial on any machine)."""
    return sum(n for _, _, n, _ in linears(hidden, intermediate, heads, kv_heads))


def cpu_rates(size: int = 2048) -> dict[str, float]:
    """This machine's achieved rate per class, measured now (FLOP/s; bytes/s for elementwise)."""
    import torch

    def best(fn: Any, flops: float) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times)

    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        rates[name] = best(lambda a=a, b=b: a @ b, 2.0 * size**3)
    x = torch.randn(size, size, dtype=torch.float64)
    spd = x @ x.T + size * torch.eye(size, dtype=torch.float64)

    from quant.gptq import sweep_factor

    rates["fp64"] = best(lambda: sweep_factor(spd, None, 0.01, 1.0, "rate", torch.float32), 2.0 * size**3 / 3.0)
    w = torch.randn(size * 4, size, dtype=torch.float32)
    rates["bytes"] = best(lambda: torch.clamp(torch.round(w * 1.7), -8, 7), 3 * 4.0 * w.numel())
    return rates


def seconds(ops: dict[str, float], rates: dict[str, float], efficiency: float = 1.0) -> dict[str, float]:
    return {k: ops[k] / (rates[k] * efficiency) for k in ops}
