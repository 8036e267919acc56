"""Proxy Hessian H = (2/N) Σ x xᵀ of a linear layer's inputs, and its damping (ALGORITHMS.md §2–3).

The collector only accumulates the unnormalised sum Σ x xᵀ (mergeable across shards: add sums and
token counts); ``finalize`` normalises; quantizers dampen.  The proxy loss of Ŵ is tr((Ŵ−W) H (Ŵ−W)ᵀ).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator
from typing import Annotated, Any, cast

import torch
from pydantic import AfterValidator
from torch import Tensor

__all__ = [
    "HELD_DTYPE",
    "HESSIAN_DTYPE",
    "DampFraction",
    "accumulate",
    "add_damping",
    "check_damp_max",
    "check_finite",
    "cholesky_failure",
    "damp_schedule",
    "finalize",
    "dead_inputs",
    "fix_dead_inputs",
    "fixed_diagonal",
    "fixed_hessian",
    "proxy_loss",
]

HESSIAN_DTYPE = torch.float64
_DAMP_GROWTH = 10.0


def accumulate(H: Tensor | None, n: int, x: Tensor) -> tuple[Tensor, int]:
    """H_sum += Σ_t x_t x_tᵀ over the tokens of x [..., in]; returns (H_sum [in, in] float64, n + tokens).

    Each chunk's Xᵀ X is computed in float32 (fast GEMM; a chunk of a few thousand tokens loses ~1e-7
    relative) and added into the float64 accumulator, so the error does not grow with the number of
    chunks. Autocast is switched off for it: under a bf16 autocast forward the product would otherwise round
    every partial sum to 8 mantissa bits. ``H`` is the accumulator: it is updated in place and returned (None
    starts a new one).

    bfloat16 activations (the inputs a bf16 calibration forward hands a linear: attention output, the MLP's
    down_proj input) take the bf16 × bf16 → float32 GEMM where the CPU has one (``_bf16_products``): a bf16
    product is exact in float32 and the sums stay float32, so the result is the float32 GEMM's up to summation
    order, at 2.1× its speed (measured here on a 4,096 × 8,960 chunk).
    """
    exact_bf16 = x.dtype == torch.bfloat16
    X = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=HESSIAN_DTYPE, device=X.device)
    elif H.shape != (X.shape[1], X.shape[1]) or H.dtype != HESSIAN_DTYPE:
        raise ValueError(
            f"accumulator must be {HESSIAN_DTYPE} [{X.shape[1]}, {X.shape[1]}], got {H.dtype} {tuple(H.shape)}"
        )
    with torch.autocast(X.device.type, enabled=False), _gram_precision(X.device.type, bf16_products=exact_bf16):
        _add_gram(H, X)
    return H, n + X.shape[0]


_GRAM_LOCK = threading.Lock()


@contextlib.contextmanager
def _gram_precision(device_type: str, *, bf16_products: bool) -> Iterator[None]:
    """Every CPU Gram product runs under one lock; those of bf16-exact inputs with oneDNN's bf16 GEMM.

    torch offers bf16 × bf16 → float32 matmul on CPU only as the process-wide switch
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``: oneDNN may then convert float32 operands to bf16
    (AMX CPUs do; on this AVX512-BF16 machine it stayed float32-accurate, 4e-7 of √(HᵢᵢHⱼⱼ) at 2× the speed),
    products and sums stay float32. It is exact here because the operands already are bf16 values. It is on
    only for that GEMM and under the lock, so no Gram of float32 operands (which AMX would round) overlaps it.
    What it could still touch is another thread's float32 matmul outside a Gram in that window; quantpipe runs
    none beside a Gram (calibration forwards in threads are under bf16 autocast, whose matmuls are bf16 anyway,
    and layer quantization never overlaps collection: the sharded-sequential barrier runs it alone).
    """
    if device_type != "cpu":
        yield
        return
    with _GRAM_LOCK:
        mm = cast(Any, torch.backends.mkldnn).matmul  # typed stubs lack the per-op precision properties
        before = mm.fp32_precision
        if bf16_products:
            mm.fp32_precision = "bf16"
        try:
            yield
        finally:
            mm.fp32_precision = before


_GRAM_PANELS = 4


def _add_gram(H: Tensor, X: Tensor) -> None:
    """H += Xᵀ X computing only the upper block triangle (panels of columns; 10/16 of the full GEMM's flops at
    4 panels) and mirroring it, which also makes the off-diagonal blocks exactly symmetric."""
    d = X.shape[1]
    edges = [round(i * d / _GRAM_PANELS) for i in range(_GRAM_PANELS + 1)]
    for a, b in itertools.pairwise(edges):
        if a == b:
            continue
        panel = X[:, a:b].T @ X[:, a:]  # rows a:b, columns a: (float32)
        H[a:b, a:].add_(panel)  # float64 += float32, no float64 copy of the panel
        H[b:, a:b].add_(panel[:, b - a :].T)


def finalize(H_sum: Tensor, n: int, *, in_place: bool = False, dtype: torch.dtype = HESSIAN_DTYPE) -> Tensor:
    """H = (2/n) · H_sum — the GPTQ proxy Hessian of ‖W X − Ŵ X‖² per token.

    The product is taken in float64 and rounded to ``dtype``. ``dtype=HELD_DTYPE`` (float32) is how the quantize
    stage holds H: the precision Hessians are stored in (``quant.hessian_store``), half the bytes of float64, while
    every factorization still runs in float64 on a copy (``fixed_hessian``). At a 70B down_proj that is 3.3 GB
    instead of 6.6 GB for as long as a layer is quantized.

    ``in_place``: the caller owns ``H_sum`` and no longer needs it; when it already has ``dtype`` it becomes H (row
    panels, so no second n×n matrix is made). Same bits either way."""
    if n <= 0:
        raise ValueError(f"cannot finalize a Hessian from {n} tokens; collect calibration data first")
    c = 2.0 / n
    if dtype == HESSIAN_DTYPE and H_sum.dtype == HESSIAN_DTYPE:
        return H_sum.mul_(c) if in_place else H_sum * c
    out = H_sum if in_place and H_sum.dtype == dtype else torch.empty(H_sum.shape, dtype=dtype, device=H_sum.device)
    for a in range(0, H_sum.shape[0], _PANEL):
        out[a : a + _PANEL] = H_sum[a : a + _PANEL].to(HESSIAN_DTYPE) * c
    return out


_PANEL = 1024
HELD_DTYPE = torch.float32


_FINITE_BAND = 1024


def check_finite(H: Tensor, name: str) -> None:
    """Raise a one-line ValueError naming the layer if H has NaN/Inf entries.

    Checked in bands of rows: ``isfinite(H).all()`` on the whole matrix allocated temporaries of about 1.8× H
    (measured on a float64 4,096² matrix; a 70B down_proj's sum is 6.6 GB), while the block's every statistic is
    held (benchmarks/RESULTS.md, "70B-class blocks")."""
    if not all(bool(torch.isfinite(H[a : a + _FINITE_BAND]).all()) for a in range(0, H.shape[0], _FINITE_BAND)):
        raise ValueError(
            f"Hessian for {name!r} has NaN/Inf entries; recollect Hessians "
            "(calibration data or model weights contain NaN/Inf)"
        )


def fix_dead_inputs(H: Tensor) -> tuple[Tensor, Tensor]:
    """Dead inputs (H_ii = 0, never activated): set H_ii = 1 so H stays invertible.

    Returns (a float64 copy of H with the fix, bool mask [in] of dead columns); the caller must set
    W[:, dead] = 0 — such columns never affect the output, so zero is as good as any value and exact.
    """
    return fixed_hessian(H), dead_inputs(H)


def dead_inputs(H: Tensor) -> Tensor:
    """bool [in]: inputs never activated in calibration (H_ii = 0)."""
    return torch.diagonal(H) == 0


def fixed_diagonal(H: Tensor) -> Tensor:
    """float64 [in]: diag H with dead inputs' entries set to 1 (the diagonal of ``fixed_hessian(H)``)."""
    d = torch.diagonal(H).to(HESSIAN_DTYPE, copy=True)
    d[d == 0] = 1.0
    return d


def fixed_hessian(H: Tensor, perm: Tensor | None = None, *, panel: int = 512) -> Tensor:
    """A private float64 copy of H with dead inputs fixed (H_ii = 1), rows and columns in ``perm`` order
    (``H[perm][:, perm]``), built in row panels so the result is the only full-size allocation: at a 70B
    down_proj's 28,672 inputs every n×n float64 matrix is 6.6 GB."""
    n = H.shape[0]
    out = torch.empty(n, n, dtype=HESSIAN_DTYPE, device=H.device)
    for a in range(0, n, panel):
        b = min(a + panel, n)
        rows = H[a:b] if perm is None else H[perm[a:b]]
        out[a:b] = rows if perm is None else rows[:, perm]
    dead = dead_inputs(H) if perm is None else dead_inputs(H)[perm]
    out[dead, dead] = 1.0
    return out


def _check_damp(v: float) -> float:
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"damp must be a finite fraction > 0, got {v}")
    return v


DampFraction = Annotated[float, AfterValidator(_check_damp)]
"""Config field type for λ, the damping as a fraction of mean(diag H): finite and > 0."""


def check_damp_max(damp: float, damp_max: float) -> None:
    """Raise unless ``damp_max`` (the end of ``damp_schedule``) is finite and >= ``damp``."""
    if not (damp_max >= damp and math.isfinite(damp_max)):
        raise ValueError(f"damp_max must be finite and >= damp={damp}, got {damp_max}")


def damp_schedule(damp: float, damp_max: float) -> list[float]:
    """λ values to try: damp, 10·damp, 100·damp, ... capped at damp_max (always includes damp_max)."""
    lams = [damp]
    while lams[-1] < damp_max:
        lams.append(min(lams[-1] * _DAMP_GROWTH, damp_max))
    return lams


def add_damping(H: Tensor, lam: float) -> Tensor:
    """H + λ · mean(diag H) · I (a new tensor)."""
    Hd = H.clone()
    diag = torch.diagonal(Hd)
    diag.add_(lam * diag.mean())
    return Hd


def cholesky_failure(name: str, lam: float) -> ValueError:
    """The one-line error for a Hessian that no damping in the schedule makes positive definite."""
    return ValueError(
        f"Cholesky failed for layer {name!r} even at damping λ={lam:g}; "
        "the Hessian is not positive definite — check calibration data"
    )


def proxy_loss(W: Tensor, W_hat: Tensor, H: Tensor, *, panel: int = 2048) -> float:
    """tr((Ŵ − W) H (Ŵ − W)ᵀ) = Σ_r Δ_r H Δ_rᵀ, over panels of rows and of H's columns so that no [out, in] or
    [in, in] temporary is made (a 70B down_proj's Δ alone would be 1.9 GB in float64).

    In float64 when any input is float64 (reference tests); otherwise the products are float32 GEMMs — the
    inputs carry float32 precision anyway (H is held in float32) — summed in float64. At a 70B down_proj that is
    the difference between ~1.4e13 float64 and float32 flops, minutes per block on a CPU."""
    m, n = W.shape
    wide = HESSIAN_DTYPE in (W.dtype, W_hat.dtype, H.dtype)
    dtype = HESSIAN_DTYPE if wide else torch.float32
    total = 0.0
    for r in range(0, m, panel):
        D = W_hat[r : r + panel].to(dtype) - W[r : r + panel].to(dtype)
        for a in range(0, n, panel):
            b = min(a + panel, n)
            total += float(((D @ H[:, a:b].to(dtype)) * D[:, a:b]).sum(dtype=HESSIAN_DTYPE))
    return total
