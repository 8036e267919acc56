"""GPTQ against the OBQ reference, its invariants (proxy loss, grids, damping, dead inputs), determinism."""

from __future__ import annotations

import pydantic
import pytest
import torch

from quant.gptq import GPTQConfig, quantize_gptq
from quant.hessian import add_damping, fix_dead_inputs, proxy_loss
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight, ref_obq

F64 = torch.float64

OBQ_CASES = [
    # (bits, group_size, sym, static_groups, seed)
    (4, -1, False, True, 0),
    (2, -1, True, False, 1),
    (3, 16, False, True, 2),
    (3, 16, False, False, 3),
    (4, 24, True, True, 4),  # ragged last group (64 = 2·24 + 16), group straddles a 32-block
    (2, 24, False, False, 5),
]


@pytest.mark.parametrize(("bits", "group_size", "sym", "static", "seed"), OBQ_CASES, ids=str)
@pytest.mark.parametrize("sweep_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_obq_reference(
    bits: int, group_size: int, sym: bool, static: bool, seed: int, sweep_dtype: torch.dtype
) -> None:
    W, H = random_weight(16, 64, seed), random_spd(64, seed)
    grid = GridConfig(bits=bits, group_size=group_size, sym=sym)
    cfg = GPTQConfig(grid=grid, act_order=False, static_groups=static, block_size=32)
    qw = quantize_gptq(W, H, cfg, sweep_dtype=sweep_dtype)
    ref = ref_obq(W, H, grid, damp=0.01, static_groups=static)
    mismatch = (qw.codes.long() != ref).float().mean().item()
    if sweep_dtype == F64:
        assert mismatch == 0.0
    else:  # float32 sweep: a rounding tie may flip; measured 0.0 on all cases
        assert mismatch <= 0.01


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_proxy_loss_equals_damped_trace_and_beats_rtn(act_order: bool, static: bool) -> None:
    grid = GridConfig(bits=3, group_size=32)
    cfg = GPTQConfig(grid=grid, act_order=act_order, static_groups=static, block_size=16)
    for seed in range(4):
        W, H = random_weight(24, 96, seed), random_spd(96, seed)
        qw = quantize_gptq(W, H, cfg, sweep_dtype=F64)
        W_hat = qw.dequantize(F64)
        H_damped = add_damping(fix_dead_inputs(H)[0], qw.stats["damp"])
        assert qw.stats["proxy_loss"] == pytest.approx(proxy_loss(W, W_hat, H_damped), rel=1e-9)
        assert qw.stats["proxy_loss_exact"] == pytest.approx(proxy_loss(W, W_hat, H), rel=1e-12)
        rtn = quantize_rtn(W, grid, H)
        # measured: GPTQ/RTN proxy-loss ratio 0.44–0.55 on these correlated Hessians
        assert qw.stats["proxy_loss_exact"] < 0.8 * rtn.stats["proxy_loss"]


def test_act_order_static_groups_use_rtn_contiguous_grids() -> None:
    W, H = random_weight(16, 80, 7), random_spd(80, 7)
    grid = GridConfig(bits=4, group_size=32)
    qw = quantize_gptq(W, H, GPTQConfig(grid=grid, act_order=True, static_groups=True))
    rtn = quantize_rtn(W, grid)
    assert qw.g_idx is None
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
    assert not torch.equal(qw.codes, rtn.codes)


def test_act_order_dynamic_groups_record_g_idx() -> None:
    W, H = random_weight(16, 80, 8), random_spd(80, 8)
    H = H * torch.linspace(0.5, 2.0, 80, dtype=F64)[:, None] * torch.linspace(0.5, 2.0, 80, dtype=F64)[None, :]
    qw = quantize_gptq(W, H, GPTQConfig(grid=GridConfig(bits=4, group_size=32), act_order=True, static_groups=False))
    assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(80) // 32)  # groups = runs in sweep order
    assert torch.bincount(qw.g_idx.long()).tolist() == [32, 32, 16]
    W_hat = qw.dequantize()
    assert qw.stats["proxy_loss_exact"] == pytest.approx(proxy_loss(W, W_hat, H), rel=1e-12)


def test_block_size_does_not_change_the_result() -> None:
    W, H = random_weight(8, 200, 9), random_spd(200, 9)
    grid = GridConfig(bits=3, group_size=48)
    for static in (True, False):
        runs = [
            quantize_gptq(
                W, H, GPTQConfig(grid=grid, act_order=True, static_groups=static, block_size=bs), sweep_dtype=F64
            )
            for bs in (1, 7, 128, 200, 256)
        ]
        for r in runs[1:]:
            assert torch.equal(r.codes, runs[0].codes) and torch.equal(r.scales, runs[0].scales)


def test_ragged_576_g128() -> None:
    W, H = random_weight(8, 576, 10), random_spd(576, 10, n_tokens=700)
    for static in (True, False):
        qw = quantize_gptq(W, H, GPTQConfig(grid=GridConfig(bits=4, group_size=128), static_groups=static))
        assert qw.codes.shape == (8, 576) and qw.scales.shape == (8, 5) and qw.group_size == 128
        assert qw.stats["proxy_loss_exact"] < quantize_rtn(W, qw_grid(4, 128), H).stats["proxy_loss"]


def qw_grid(bits: int, group_size: int) -> GridConfig:
    return GridConfig(bits=bits, group_size=group_size)


def test_dead_input_gives_zero_weight_column() -> None:
    W, H = random_weight(8, 32, 11), random_spd(32, 11)
    H[5, :] = 0
    H[:, 5] = 0
    qw = quantize_gptq(W, H, GPTQConfig(grid=GridConfig(bits=4, group_size=16)))
    assert torch.all(qw.dequantize()[:, 5] == 0)
    assert qw.stats["n_dead"] == 1.0 and qw.stats["damp"] == 0.01


def test_damping_escalates_on_indefinite_hessian() -> None:
    H = torch.eye(16, dtype=F64)
    H[3, 3] = -0.05  # mean diag ≈ 0.93: λ=0.01 leaves it negative, λ=0.1 makes it positive definite
    qw = quantize_gptq(random_weight(4, 16, 12), H, GPTQConfig(grid=GridConfig(bits=4)))
    assert qw.stats["damp"] == pytest.approx(0.1)
    assert qw.stats["damp"] > 0.01


def test_hopeless_hessian_raises_clear_error() -> None:
    H = -torch.eye(8, dtype=F64)
    with pytest.raises(ValueError, match=r"Cholesky failed for layer 'blk.0.q' even at damping λ=1; the Hessian"):
        quantize_gptq(random_weight(4, 8, 0), H, GPTQConfig(grid=GridConfig(bits=4)), name="blk.0.q")


def test_nan_hessian_raises_naming_layer() -> None:
    H = random_spd(8, 0)
    H[2, 2] = float("nan")
    with pytest.raises(ValueError, match="Hessian for 'model.layers.3.mlp.down_proj' has NaN/Inf"):
        quantize_gptq(
            random_weight(4, 8, 0), H, GPTQConfig(grid=GridConfig(bits=4)), name="model.layers.3.mlp.down_proj"
        )


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"H for 'layer' must be \[8, 8\]"):
        quantize_gptq(random_weight(4, 8, 0), random_spd(9, 0), GPTQConfig(grid=GridConfig(bits=4)))


def test_deterministic_bit_identical() -> None:
    W, H = random_weight(32, 200, 13).to(torch.bfloat16), random_spd(200, 13)
    cfg = GPTQConfig(grid=GridConfig(bits=4, group_size=64, mse_clip=True), static_groups=False)
    a, b = quantize_gptq(W, H, cfg), quantize_gptq(W, H, cfg)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert a.g_idx is not None and b.g_idx is not None and torch.equal(a.g_idx, b.g_idx)
    assert a.stats == b.stats and set(a.stats) == {"proxy_loss", "proxy_loss_exact", "damp", "n_dead"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damp": 0.0}, "damp must be a finite fraction > 0, got 0.0"),
        ({"damp": 0.1, "damp_max": 0.05}, "damp_max must be finite and >= damp=0.1, got 0.05"),
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
        ({"version": 3}, "GPTQConfig version must be 1, got 3"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        GPTQConfig(grid=GridConfig(bits=4), **kwargs)  # type: ignore[arg-type]


def test_sweep_ignores_a_callers_bf16_autocast() -> None:
    """The shipped sequential recipe ran the whole block loop under a bf16 autocast, and the sweep's ``Err1 @ U``
    update dropped to bf16 (6.6 % of codes differed at n = 1536): the sweep must be fp32 whatever its caller."""
    torch.manual_seed(0)
    n = 512
    W, H = random_weight(256, n, 0), random_spd(n, 1)
    cfg = GPTQConfig(grid=qw_grid(4, 64))
    plain = quantize_gptq(W, H, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = quantize_gptq(W, H, cfg)
    assert torch.equal(plain.codes, under.codes)
    assert torch.equal(plain.scales, under.scales)


def _spd_with_dead(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    H = X.T @ X / (3 * n)
    H[7, :] = 0
    H[:, 7] = 0  # a dead input
    return H


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reversed_factor_is_the_papers_chain(dtype: torch.dtype) -> None:
    """sweep_factor (reversed Cholesky + triangular inverse, in place) against the GPTQ paper's chain
    (fix dead → permute → damp → chol → cholesky_inverse → chol): the same U to float64 rounding, upper
    triangular, and its bands are exactly the rows of that U in the sweep dtype, row-major."""
    from quant.gptq import inverse_cholesky, sweep_factor
    from quant.hessian import fix_dead_inputs

    H = _spd_with_dead(300, 1).to(torch.float32)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    for p in (None, perm):
        H_fixed, _ = fix_dead_inputs(H)
        if p is not None:
            H_fixed = H_fixed[p][:, p]
        ref, ref_lam = inverse_cholesky(H_fixed, 0.01, 1.0, "layer")
        factor = sweep_factor(H, p, 0.01, 1.0, "layer", dtype)
        U = factor.upper()
        assert factor.lam == ref_lam
        assert torch.equal(U, torch.triu(U)) and bool((torch.diagonal(U) > 0).all())
        torch.testing.assert_close(U, ref, rtol=1e-11, atol=1e-11 * float(ref.abs().max()))
        damped = H_fixed.double() + ref_lam * torch.diagonal(H_fixed.double()).mean() * torch.eye(300, dtype=F64)
        torch.testing.assert_close(U.T @ U @ damped, torch.eye(300, dtype=F64), rtol=0, atol=1e-9)
        for i1, i2 in ((0, 128), (128, 256), (256, 300)):  # the bands a sweep reads
            band = factor.band(i1, i2)
            assert band.dtype == dtype and band.is_contiguous()
            assert torch.equal(band, U[i1:i2, i1:].to(dtype))


@pytest.mark.parametrize("n", [1, 7, 512, 513, 1100])
def test_tril_inverse_in_place_both_paths(n: int) -> None:
    """LAPACK's dtrtri on the buffer's own memory and the blocked fallback (GPUs) both invert a lower-triangular
    matrix in place, ignoring whatever the strict upper triangle held."""
    from quant.gptq import tril_inverse_

    g = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(n, n, generator=g, dtype=F64)) * 0.1
    L.diagonal().copy_(torch.rand(n, generator=g, dtype=F64) + 1.0)
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=F64), upper=False)
    for lapack in (True, False):
        A = (L + torch.triu(torch.randn(n, n, generator=g, dtype=F64), 1)).mT.contiguous().mT  # column-major
        ptr = A.data_ptr()
        tril_inverse_(A, lapack=lapack)
        assert A.data_ptr() == ptr
        torch.testing.assert_close(A, ref, rtol=1e-12, atol=1e-12)


def test_in_place_factor_retries_on_a_rebuilt_matrix() -> None:
    """An indefinite H fails at the first λ; the in-place path, whose failed attempt overwrote its copy,
    rebuilds it and lands on the same λ and the same U as the paper's chain."""
    from quant.gptq import inverse_cholesky, sweep_factor

    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    eig = torch.rand(120, generator=g, dtype=torch.float64) + 1.0
    eig[0] = -0.05  # mean diag ≈ 1.5: λ = 0.01 adds 0.015 (still indefinite), λ = 0.1 adds 0.15
    H = (Q * eig) @ Q.T
    H = (H + H.T) / 2
    ref, ref_lam = inverse_cholesky(H.clone(), 0.01, 1.0, "layer")
    factor = sweep_factor(H, None, 0.01, 1.0, "layer", torch.float64)
    assert ref_lam == factor.lam == pytest.approx(0.1)
    torch.testing.assert_close(factor.upper(), ref, rtol=1e-10, atol=1e-10)
