"""GPTQ / OPTQ (Frantar et al. 2023, Alg. 1) — ALGORITHMS.md §3.

Quantize W [m, n] column by column, compensating each rounding error on the not-yet-quantized columns
with the inverse proxy Hessian. With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U):

    q_i = Q(w_i),   e = (w_i − q_i) / U_ii,   W[:, i+1:] −= e ⊗ U[i, i+1:]

which is OBQ's update w −= (w_i − q_i)/[H_F⁻¹]_ii · [H_F⁻¹]_{i,:} with H_F⁻¹ downdated for free. Columns are
swept in blocks of ``block_size``: inside a block updates are applied eagerly; the block's errors reach all
later columns with one matmul W[:, i2:] −= Err1 · U[i1:i2, i2:] (lazy batch update).

The step loss (w_i − q_i)²/U_ii² sums exactly to tr((Ŵ − W) H_damped (Ŵ − W)ᵀ) (``stats["proxy_loss"]``);
``stats["proxy_loss_exact"]`` uses the undamped H.

Group grids: ``static_groups=True`` fits every grid on the original contiguous groups before the sweep
(so with act-order inference needs no reordering and g_idx is None). ``static_groups=False`` fits a group's
grid when the sweep reaches its first column, on the error-updated weights of the whole group (including
updates still pending in the lazy batch — slightly more exact than the reference repo, which reads stale
weights when the group size does not divide the block size). With act-order and dynamic groups, groups are
runs of ``group_size`` columns in permuted order and ``g_idx`` records the group of each original column.

Precision: H is kept in float64 for dead-input fixing, damping, Cholesky and inverse; the sweep runs in
``sweep_dtype`` (float32 by default; float64 for reference tests). Deterministic: no randomness, no timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import Tensor

from quant.grid import GRID_DTYPE, fit_grid, fit_group_grids
from quant.hessian import (
    HESSIAN_DTYPE,
    DampFraction,
    add_damping,
    check_damp_max,
    check_finite,
    cholesky_failure,
    damp_schedule,
    dead_inputs,
    fixed_diagonal,
    fixed_hessian,
    proxy_loss,
)
from quant.mixed import check_group_bits, fit_mixed_group_grids
from quant.precision import exact
from quant.types import ConfigVersion, GridConfig, QuantizedWeight

__all__ = [
    "SWEEP_DTYPE",
    "GPTQConfig",
    "SweepStart",
    "inverse_cholesky",
    "tril_inverse_",
    "quantize_gptq",
    "start_sweep",
    "SweepFactor",
    "sweep_factor",
    "validate_inputs",
    "with_sweep_stats",
]

SWEEP_DTYPE = torch.float32


class GPTQConfig(BaseModel):
    """GPTQ settings. ``damp`` is λ as a fraction of mean(diag H); on Cholesky failure λ grows ×10 up to
    ``damp_max``.

    Sample YAML::

        grid: {bits: 4, group_size: 128, sym: false, mse_clip: false}
        damp: 0.01
        damp_max: 1.0
        block_size: 128
        act_order: true
        static_groups: true
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid: GridConfig
    damp: DampFraction = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    version: ConfigVersion = 1

    @field_validator("block_size")
    @classmethod
    def _check_block_size(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"block_size must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_damp_max(self) -> GPTQConfig:
        check_damp_max(self.damp, self.damp_max)
        return self


def inverse_cholesky(H: Tensor, damp: float, damp_max: float, name: str) -> tuple[Tensor, float]:
    """U = chol(H_λ⁻¹) upper, with H_λ = H + λ·mean(diag H)·I; λ escalates on failure. The reference chain.

    The GPTQ paper's three lines: L = chol(H_λ); H_λ⁻¹ = cholesky_inverse(L); U = chol(H_λ⁻¹, upper). Returns
    (U float64 [n, n], λ used). Sweeps use :func:`sweep_factor`, which gets the same U at half the cost.
    """
    for lam in damp_schedule(damp, damp_max):
        L, info = torch.linalg.cholesky_ex(add_damping(H, lam))
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0:
            return U, lam
    raise cholesky_failure(name, damp_max)


TRIL_INVERSE_BLOCK = 512


def tril_inverse_(A: Tensor, *, lapack: bool | None = None) -> None:
    """A ← A⁻¹ in place for a lower-triangular A (its strict upper triangle is ignored and zeroed).

    On the CPU in float64 this is LAPACK's ``dtrtri`` on A's own memory (A must be column-major, as the
    factor's buffer is); elsewhere, or with ``lapack=False``, a blocked inverse from the bottom right whose only
    allocations are one column panel: with X₂₂ = A₂₂⁻¹ already in place, A₂₁ ← −X₂₂ A₂₁ A₁₁⁻¹.
    """
    A.tril_()
    if lapack is None:
        lapack = A.device.type == "cpu" and A.dtype == torch.float64 and A.mT.is_contiguous()
    if lapack:
        import numpy as np
        from scipy.linalg import lapack as scipy_lapack

        arr = A.numpy()
        out, info = scipy_lapack.dtrtri(arr, lower=1, overwrite_c=1)
        if int(info) != 0:
            raise ValueError(f"triangular inverse failed: zero pivot {int(info)} (the Cholesky factor is singular)")
        if not np.shares_memory(out, arr):
            A.copy_(torch.from_numpy(out))
        return
    n = A.shape[0]
    for j in reversed(range(0, n, TRIL_INVERSE_BLOCK)):
        e = min(j + TRIL_INVERSE_BLOCK, n)
        eye = torch.eye(e - j, dtype=A.dtype, device=A.device)
        inv = torch.linalg.solve_triangular(A[j:e, j:e], eye, upper=False)
        if e < n:
            A[e:, j:e] = (A[e:, e:] @ A[e:, j:e]) @ inv.neg()
        A[j:e, j:e] = inv


class SweepFactor(NamedTuple):
    """U = chol(H_λ⁻¹) (upper, float64) for a column sweep, handed out one band of rows at a time.

    U is held as R⁻¹ with R = chol(P H_λ P), P the order reversal: then H_λ⁻¹ = (P R⁻¹ P)ᵀ (P R⁻¹ P) and
    P R⁻¹ P is upper triangular with a positive diagonal, so it *is* U (Uᵢⱼ = R⁻¹[n−1−i, n−1−j]). That costs one
    Cholesky and one triangular inverse (≈ 2n³/3 flops) instead of the paper's Cholesky, ``cholesky_inverse``
    and second Cholesky (≈ 4n³/3), and never forms H_λ⁻¹ explicitly. A sweep only ever reads U[i1:i2, i1:]
    for its current block of columns, so the bands are flipped out of R⁻¹ and converted to the sweep dtype as
    they are needed instead of keeping a full sweep-dtype copy beside the float64 factor: at a 70B down_proj
    (28,672 inputs) that copy is 3.3 GB.
    """

    Rinv: Tensor  # float64 [n, n], lower triangular (a column-major view of the factored buffer)
    dtype: torch.dtype
    lam: float

    def band(self, i1: int, i2: int) -> Tensor:
        """U[i1:i2, i1:] in the sweep dtype, row-major: columns 0:i2-i1 are the block's own U, the rest its
        lazy update to the columns after it."""
        n = self.Rinv.shape[0]
        rows = self.Rinv[n - i2 : n - i1, : n - i1].flip((0, 1))
        return torch.empty(rows.shape, dtype=self.dtype, device=self.Rinv.device).copy_(rows)

    def upper(self) -> Tensor:
        """The whole U, float64 (a new n×n matrix: for tests and small layers)."""
        return self.Rinv.flip((0, 1))


def sweep_factor(
    H: Tensor, perm: Tensor | None, damp: float, damp_max: float, name: str, dtype: torch.dtype
) -> SweepFactor:
    """The factor of a column sweep in ``perm`` order: U = chol(H_λ⁻¹) of the dead-input-fixed, permuted H
    (:class:`SweepFactor` says how). One float64 copy of H is built in reversed sweep order and factored in
    place on its column-major view (LAPACK's own layout, so nothing is copied), so a sweep holds the caller's H
    and that one matrix. A failed Cholesky has overwritten the copy; it is rebuilt for the next λ."""
    n = H.shape[0]
    order = (perm if perm is not None else torch.arange(n, device=H.device)).flip(0)
    F = fixed_hessian(H, order)
    V = F.mT  # == F (symmetric), Fortran-contiguous
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for attempt, lam in enumerate(damp_schedule(damp, damp_max)):
        if attempt:
            F.copy_(fixed_hessian(H, order))
        diag = torch.diagonal(V)
        diag.add_(lam * diag.mean())  # add_damping's arithmetic, in place
        torch.linalg.cholesky_ex(V, out=(V, info))
        if int(info) == 0:
            tril_inverse_(V)
            return SweepFactor(V, dtype, lam)
    raise cholesky_failure(name, damp_max)


def validate_inputs(W: Tensor, H: Tensor, name: str) -> None:
    """Shape and finiteness checks shared by GPTQ and LDLQ (fail before any work)."""
    if W.dim() != 2:
        raise ValueError(f"W for {name!r} must be 2-D [out, in], got {tuple(W.shape)}")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H for {name!r} must be [{n}, {n}] to match W {tuple(W.shape)}, got {tuple(H.shape)}")
    check_finite(H, name)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"weight of {name!r} has NaN/Inf entries")


class SweepStart(NamedTuple):
    """What a column sweep (GPTQ, LDLQ) starts from, as built by :func:`start_sweep`."""

    W: Tensor  # [m, n] sweep_dtype copy of the weight, dead input columns zeroed
    hdiag: Tensor  # [n] float64 diag H with dead inputs fixed (H_ii = 1): act-order's key
    dead: Tensor  # [n] bool, inputs with H_ii = 0
    group_size: int  # effective group size (n for per-channel grids)
    scales: Tensor  # [m, G] GRID_DTYPE: fitted on W (static groups) or zeros the sweep fills in
    zeros: Tensor  # [m, G] GRID_DTYPE, likewise


def start_sweep(
    W: Tensor,
    H: Tensor,
    grid: GridConfig,
    *,
    static_groups: bool,
    name: str,
    sweep_dtype: torch.dtype,
    group_bits: Tensor | None = None,
) -> SweepStart:
    """Validate W [m, n] and H [n, n], fix dead inputs (H_ii = 0 → H_ii = 1, W[:, i] = 0), allocate the grids
    (static grids of group g at ``group_bits[g]`` bits when given)."""
    validate_inputs(W, H, name)
    m, n = W.shape
    dead = dead_inputs(H)
    W = W.to(sweep_dtype, copy=True)
    W[:, dead] = 0
    if group_bits is not None:
        scales, zeros = fit_mixed_group_grids(W, grid, group_bits)
    elif static_groups:
        scales, zeros = fit_group_grids(W, grid)
    else:
        scales = torch.zeros(m, grid.n_groups(n), dtype=GRID_DTYPE, device=W.device)
        zeros = torch.zeros_like(scales)
    return SweepStart(W, fixed_diagonal(H), dead, grid.effective_group_size(n), scales, zeros)


def with_sweep_stats(
    qw: QuantizedWeight, losses: Tensor, W: Tensor, H: Tensor, lam: float, dead: Tensor
) -> QuantizedWeight:
    """``qw`` with stats: proxy_loss (Σ of the sweep's per-row ``losses``, damped H), proxy_loss_exact
    (tr((Ŵ − W) H (Ŵ − W)ᵀ) for the original W and undamped H), damp (λ used), n_dead."""
    stats = {
        "proxy_loss": float(losses.to(HESSIAN_DTYPE).sum()),
        "proxy_loss_exact": proxy_loss(W, qw.dequantize(torch.float32), H),  # per panel
        "damp": float(lam),
        "n_dead": float(dead.sum()),
    }
    return replace(qw, stats=stats)


@exact
def quantize_gptq(
    W: Tensor,
    H: Tensor,
    cfg: GPTQConfig,
    *,
    name: str = "layer",
    sweep_dtype: torch.dtype = SWEEP_DTYPE,
    group_bits: Sequence[int] | Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize W [out, in] (any float dtype) against the proxy Hessian H [in, in] (undamped).

    stats: proxy_loss (Σ (w_i − q_i)²/U_ii², damped H), proxy_loss_exact (undamped H), damp (λ used),
    n_dead (count of inputs with H_ii = 0, whose weight columns are set to zero).

    ``group_bits`` [n_groups] (static groups only): group g is rounded on a ``group_bits[g]``-bit grid — the
    sweep's error feedback is unchanged — and the result's ``bits`` is the widest; split it with
    ``quant.mixed.split_by_bits``.
    """
    grid = cfg.grid
    W_in = W
    gb = None
    if group_bits is not None:
        if not cfg.static_groups:
            raise ValueError(f"{name!r}: per-group bit-widths need static_groups (grids fixed before the sweep)")
        gb = check_group_bits(group_bits, grid.n_groups(W.shape[1]), name)
    W, hdiag, dead, gs, scales, zeros = start_sweep(
        W_in, H, grid, static_groups=cfg.static_groups, name=name, sweep_dtype=sweep_dtype, group_bits=gb
    )
    m, n = W.shape
    bits_of = [grid.bits] * scales.shape[1] if gb is None else gb.tolist()

    if cfg.act_order:
        perm = torch.argsort(hdiag, descending=True, stable=True)
        W = W[:, perm]
    else:
        perm = torch.arange(n, device=W.device)
    # group_of[p]: the grid used at sweep position p
    group_of = (perm // gs if cfg.static_groups else torch.arange(n, device=W.device) // gs).tolist()

    factor = sweep_factor(H, perm if cfg.act_order else None, cfg.damp, cfg.damp_max, name, sweep_dtype)
    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)  # ≤ 8-bit codes: a quarter of a float32 matrix
    losses = torch.zeros(m, dtype=sweep_dtype, device=W.device)

    # The block's columns are held transposed (W1t [block, m]): every per-column op then reads and writes one
    # contiguous row, and the column step is a handful of in-place kernels (it runs n times, serially).
    q = torch.empty(m, dtype=torch.promote_types(sweep_dtype, GRID_DTYPE), device=W.device)  # codes, as floats
    q_hat = torch.empty(m, dtype=GRID_DTYPE, device=W.device)  # ŵ, in dequantize_codes' dtype
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1t = W[:, i1:i2].T.contiguous()
        Err1t = torch.zeros_like(W1t)
        Ub = factor.band(i1, i2)  # U[i1:i2, i1:]
        U1 = Ub[:, : i2 - i1]
        for i in range(i2 - i1):
            col = i1 + i
            if not cfg.static_groups and col % gs == 0:
                c2 = min(col + gs, n)
                block = W1t[i : min(c2, i2) - i1].T
                if c2 > i2:  # rest of the group lies beyond this block: apply the pending lazy update
                    rest = W[:, i2:c2] - Err1t[:i].T @ Ub[:i, i2 - i1 : c2 - i1]  # U[i1:col, i2:c2]
                    block = torch.cat([block, rest], dim=1)
                scales[:, col // gs], zeros[:, col // gs] = fit_grid(block, grid)
            g = group_of[col]
            s, z = scales[:, g], zeros[:, g]
            w, err = W1t[i], Err1t[i]
            # quantize_codes then dequantize_codes, op for op, into the two reused buffers
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, (1 << bits_of[g]) - 1)
            codes[:, col] = q
            q_hat.copy_(q).sub_(z).mul_(s)
            torch.sub(w, q_hat, out=err).div_(U1[i, i])  # (w − ŵ) / U_ii
            losses.addcmul_(err, err)  # (w − ŵ)² / U_ii²
            W1t[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        W[:, i2:].addmm_(Err1t.T, Ub[:, i2 - i1 :], alpha=-1)

    lam = factor.lam
    del factor, W  # the float64 factor (6.6 GB at a 70B down_proj) and the swept copy are done before the stats
    inv = torch.argsort(perm)
    codes_u8 = codes[:, inv].to(torch.uint8)
    g_idx = None
    if cfg.act_order and not cfg.static_groups:
        g_idx = (inv // gs).to(torch.int32)  # original column j sits at sweep position inv[j]
    qw = QuantizedWeight(codes=codes_u8, scales=scales, zeros=zeros, bits=max(bits_of), group_size=gs, g_idx=g_idx)
    return with_sweep_stats(qw, losses, W_in, H, lam, dead)
