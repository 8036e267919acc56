"""LDLQ ≡ GPTQ (QuIP Thm 6; cf. QuIP's optq_ldlq_equiv.py), and the H = Lᵀ D L factorization."""

from __future__ import annotations

import itertools

import pytest
import torch

from quant.gptq import GPTQConfig, inverse_cholesky, quantize_gptq
from quant.ldlq import LDLQConfig, ldl_upper, quantize_ldlq
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight

F64 = torch.float64


def test_ldl_upper_factorizes_damped_hessian() -> None:
    H = random_spd(40, 0)
    Lt, D, lam = ldl_upper(H, 0.01, 1.0, "layer")
    assert lam == 0.01
    assert torch.equal(torch.diagonal(Lt), torch.ones(40, dtype=F64))
    assert torch.equal(Lt, torch.triu(Lt))
    H_damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(40, dtype=F64)
    torch.testing.assert_close(Lt @ torch.diag(D) @ Lt.T, H_damped, rtol=1e-10, atol=1e-10)
    # the link to GPTQ: Lᵀ = U⁻¹ diag(U), D = 1/U_ii², with U = chol(H⁻¹) upper
    U, _ = inverse_cholesky(H, 0.01, 1.0, "layer")
    torch.testing.assert_close(Lt, torch.linalg.inv(U) @ torch.diag(torch.diagonal(U)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D, 1 / torch.diagonal(U) ** 2, rtol=1e-9, atol=0)


CASES = list(itertools.product([2, 4], [-1, 16, 24], [False, True], [True, False]))


@pytest.mark.parametrize(("bits", "group_size", "sym", "static"), CASES, ids=str)
def test_ldlq_equals_gptq_without_act_order(bits: int, group_size: int, sym: bool, static: bool) -> None:
    for seed in range(2):
        W, H = random_weight(32, 96, seed), random_spd(96, seed)
        grid = GridConfig(bits=bits, group_size=group_size, sym=sym)
        g = quantize_gptq(
            W, H, GPTQConfig(grid=grid, act_order=False, static_groups=static, block_size=32), sweep_dtype=F64
        )
        ld = quantize_ldlq(W, H, LDLQConfig(grid=grid, static_groups=static), sweep_dtype=F64)
        assert torch.equal(g.codes, ld.codes)
        assert torch.equal(g.zeros, ld.zeros)
        torch.testing.assert_close(g.scales, ld.scales, rtol=2e-7, atol=0)  # dynamic grids: ≤ 1 ulp apart
        assert ld.stats["proxy_loss"] == pytest.approx(g.stats["proxy_loss"], rel=1e-9)
        assert ld.stats["proxy_loss_exact"] == pytest.approx(g.stats["proxy_loss_exact"], rel=1e-9)


def test_ldlq_float32_sweep_close_to_gptq() -> None:
    W, H = random_weight(32, 128, 5), random_spd(128, 5)
    grid = GridConfig(bits=3, group_size=32)
    g = quantize_gptq(W, H, GPTQConfig(grid=grid, act_order=False))
    ld = quantize_ldlq(W, H, LDLQConfig(grid=grid))
    assert (g.codes != ld.codes).float().mean() <= 0.01  # measured 0.0


def test_ldlq_dead_input_and_damping() -> None:
    W, H = random_weight(8, 32, 6), random_spd(32, 6)
    # indefinite: λ_min(H) = −0.03·mean(diag H), so λ=0.01 fails and λ=0.1 succeeds
    H = H - (torch.linalg.eigvalsh(H)[0] + 0.03 * torch.diagonal(H).mean()) * torch.eye(32, dtype=F64)
    H[4, :] = 0
    H[:, 4] = 0
    ld = quantize_ldlq(W, H, LDLQConfig(grid=GridConfig(bits=4)))
    g = quantize_gptq(W, H, GPTQConfig(grid=GridConfig(bits=4), act_order=False))
    assert torch.all(ld.dequantize()[:, 4] == 0) and ld.stats["n_dead"] == 1.0
    assert ld.stats["damp"] == g.stats["damp"] == pytest.approx(0.1)
