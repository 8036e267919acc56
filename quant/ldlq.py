"""LDLQ (QuIP, Chee et al. 2023, §3) — ALGORITHMS.md §4.

Factor the damped proxy Hessian as H = Lᵀ D L with L unit lower triangular (so Lᵀ = I + Ú is unit upper)
and round columns in order with linear feedback from the earlier rounding errors:

    Ŵ = Q(W + (W − Ŵ)(Lᵀ − I)),   i.e.   x_k = W_k + (W − Ŵ)_{:, :k} · Ú_{:k, k},   Ŵ_k = Q(x_k).

Then W − Ŵ = (x − Ŵ) L⁻ᵀ, so tr((Ŵ − W) H (Ŵ − W)ᵀ) = Σ_k D_k ‖x_k − Ŵ_k‖² (``stats["proxy_loss"]``).
QuIP Thm 6: this is exactly GPTQ without act-order — with U = chol(H⁻¹) upper, Lᵀ = U⁻¹·diag(U) and
D_k = 1/U_kk², and x_k equals GPTQ's error-updated column — so both paths give the same codes.

Here the factorization is computed independently of GPTQ: the reversal P turns H = Lᵀ D L into the
ordinary Cholesky P H P = C Cᵀ, giving Lᵀ = P (C·diag(C)⁻¹) P and D = P diag(C)² P.

Group grids: ``static_groups=True`` fits all grids upfront on W. ``static_groups=False`` fits group
[k, k2) when column k is reached, on GPTQ's error-updated weights for those columns:
x_{k:k2} = W_{k:k2} + Δ_{:, :k} Lᵀ_{:k, k:k2} (Lᵀ_{k:k2, k:k2})⁻¹  (Δ = W − Ŵ so far), which for a
single column reduces to the LDLQ feedback above. No act-order (columns are rounded in their own order).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor

from quant.gptq import SWEEP_DTYPE, start_sweep, with_sweep_stats
from quant.grid import dequantize_codes, fit_grid, quantize_codes
from quant.hessian import (
    HESSIAN_DTYPE,
    DampFraction,
    add_damping,
    check_damp_max,
    cholesky_failure,
    damp_schedule,
    fixed_hessian,
)
from quant.precision import exact
from quant.types import ConfigVersion, GridConfig, QuantizedWeight

__all__ = ["LDLQConfig", "ldl_upper", "quantize_ldlq"]


class LDLQConfig(BaseModel):
    """LDLQ settings; damping as in GPTQConfig (λ·mean(diag H), ×10 on failure up to ``damp_max``).

    Sample YAML::

        grid: {bits: 2, group_size: -1, sym: true}
        damp: 0.01
        damp_max: 1.0
        static_groups: true
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid: GridConfig
    damp: DampFraction = 0.01
    damp_max: float = 1.0
    static_groups: bool = True
    version: ConfigVersion = 1

    @model_validator(mode="after")
    def _check_damp_max(self) -> LDLQConfig:
        check_damp_max(self.damp, self.damp_max)
        return self


def ldl_upper(H: Tensor, damp: float, damp_max: float, name: str) -> tuple[Tensor, Tensor, float]:
    """(Lᵀ [n, n] unit upper, D [n], λ) with H + λ·mean(diag H)·I = Lᵀ diag(D) L, all float64.

    λ escalates through ``damp_schedule`` until the (reversed) Cholesky succeeds.
    """
    for lam in damp_schedule(damp, damp_max):
        Hd = add_damping(H.to(HESSIAN_DTYPE), lam)
        C, info = torch.linalg.cholesky_ex(torch.flip(Hd, dims=(0, 1)))
        if int(info) != 0:
            continue
        c = torch.diagonal(C)
        Lt = torch.flip(C / c[None, :], dims=(0, 1))
        return Lt, torch.flip(c * c, dims=(0,)), lam
    raise cholesky_failure(name, damp_max)


@exact
def quantize_ldlq(
    W: Tensor, H: Tensor, cfg: LDLQConfig, *, name: str = "layer", sweep_dtype: torch.dtype = SWEEP_DTYPE
) -> QuantizedWeight:
    """LDLQ-quantize W [out, in] against the undamped proxy Hessian H [in, in].

    Dead inputs (H_ii = 0) as in GPTQ: H_ii = 1, W[:, i] = 0. stats: proxy_loss (Σ_k D_k‖x_k − Ŵ_k‖²,
    damped H), proxy_loss_exact (undamped H), damp (λ used), n_dead.
    """
    grid = cfg.grid
    W_in = W
    W, _, dead, gs, scales, zeros = start_sweep(
        W_in, H, grid, static_groups=cfg.static_groups, name=name, sweep_dtype=sweep_dtype
    )
    H_fixed = fixed_hessian(H)
    m, n = W.shape
    Lt64, D64, lam = ldl_upper(H_fixed, cfg.damp, cfg.damp_max, name)
    Lt, D = Lt64.to(sweep_dtype), D64.to(sweep_dtype)
    A = Lt - torch.eye(n, dtype=sweep_dtype, device=W.device)  # Ú = Lᵀ − I, strictly upper

    Delta = torch.zeros_like(W)  # W − Ŵ for the columns rounded so far
    codes = torch.zeros_like(W)
    losses = torch.zeros(m, dtype=sweep_dtype, device=W.device)
    for k in range(n):
        g = k // gs
        if not cfg.static_groups and k % gs == 0:
            k2 = min(k + gs, n)
            Y = Delta[:, :k] @ Lt[:k, k:k2]
            X = W[:, k:k2] + torch.linalg.solve_triangular(Lt[k:k2, k:k2], Y, upper=True, left=False)
            scales[:, g], zeros[:, g] = fit_grid(X, grid)
        s, z = scales[:, g], zeros[:, g]
        x = W[:, k] + Delta[:, :k] @ A[:k, k]
        c = quantize_codes(x, s, z, grid.bits)
        q = dequantize_codes(c, s, z).to(sweep_dtype)
        codes[:, k] = c
        Delta[:, k] = W[:, k] - q
        losses += D[k] * (x - q) ** 2

    qw = QuantizedWeight(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, bits=grid.bits, group_size=gs)
    return with_sweep_stats(qw, losses, W_in, H, lam, dead)
