"""Bit allocation: exact DP vs brute force, budget, monotonicity, uniform fallback, Hessian sensitivity."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch

from quant.bitalloc import BitAllocConfig, Sensitivity, allocate_bits, hessian_sensitivity
from quant.rtn import quantize_rtn
from quant.types import GridConfig
from tests.quant.reference import random_spd, random_weight

BITS = (2, 3, 4, 8)


def random_items(count: int, seed: int, max_params: int = 12) -> list[Sensitivity]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        n = int(torch.randint(1, max_params + 1, (1,), generator=gen))
        scale = float(torch.rand(1, generator=gen)) * 10 + 0.1
        noise = torch.rand(len(BITS), generator=gen).tolist()  # not always convex or 4^-b shaped
        loss = {b: scale * 4.0 ** (-b) * (1 + 0.8 * e) for b, e in zip(BITS, noise, strict=True)}
        items.append(Sensitivity(f"layer{i}", n, loss))
    return items


def brute_force(items: list[Sensitivity], avg_bits: float) -> float:
    N = sum(it.n_params for it in items)
    best = math.inf
    for picks in itertools.product(BITS, repeat=len(items)):
        if sum(it.n_params * b for it, b in zip(items, picks, strict=True)) <= avg_bits * N + 1e-6:
            best = min(best, math.fsum(it.loss[b] for it, b in zip(items, picks, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed: int) -> None:
    items = random_items(5, seed)
    for avg in (2.0, 2.3, 2.5, 3.0, 3.7, 5.0, 8.0):
        res = allocate_bits(items, BitAllocConfig(avg_bits=avg))
        assert res.exact
        assert res.total_loss == pytest.approx(brute_force(items, avg), rel=1e-12)
        N = sum(it.n_params for it in items)
        assert res.avg_bits == sum(it.n_params * res.bits[it.name] for it in items) / N


@pytest.mark.parametrize("method", ["dp", "greedy"])
def test_budget_monotone_and_never_worse_than_uniform(method: str) -> None:
    items = random_items(40, 7, max_params=500)
    prev = math.inf
    for avg in [2.0 + 0.25 * i for i in range(25)]:
        res = allocate_bits(items, BitAllocConfig(avg_bits=avg, method=method))  # type: ignore[arg-type]
        assert res.avg_bits <= avg + 1e-9
        assert res.total_loss <= res.uniform_loss
        for b in BITS:  # every uniform bit-width within budget is a feasible point
            if b <= avg:
                assert res.total_loss <= math.fsum(it.loss[b] for it in items) * (1 + 1e-12)
        if method == "dp":
            assert res.total_loss <= prev * (1 + 1e-12)  # more budget is never worse
            prev = res.total_loss


def test_greedy_is_feasible_and_not_better_than_exact() -> None:
    items = random_items(12, 8, max_params=50)
    for avg in (2.25, 2.5, 3.0, 4.5):
        dp = allocate_bits(items, BitAllocConfig(avg_bits=avg))
        gr = allocate_bits(items, BitAllocConfig(avg_bits=avg, method="greedy"))
        assert gr.avg_bits <= avg + 1e-9 and not gr.exact
        assert gr.total_loss >= dp.total_loss * (1 - 1e-12)


def test_coarse_units_still_respect_the_budget() -> None:
    items = random_items(30, 9, max_params=10**6)
    exact = allocate_bits(items, BitAllocConfig(avg_bits=2.5))
    coarse = allocate_bits(items, BitAllocConfig(avg_bits=2.5, max_states=50))
    assert not coarse.exact and coarse.avg_bits <= 2.5
    assert coarse.total_loss >= exact.total_loss * (1 - 1e-12)


def test_smollm2_shapes_are_exact_and_fast() -> None:
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576)}
    shapes |= {"gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    gen = torch.Generator().manual_seed(10)
    items = [
        Sensitivity(f"model.layers.{i}.{p}", m * n, {b: float(torch.rand(1, generator=gen)) * 4.0**-b for b in BITS})
        for i in range(30)
        for p, (m, n) in shapes.items()
    ]
    for avg in (2.5, 3.0):
        res = allocate_bits(items, BitAllocConfig(avg_bits=avg))
        assert res.exact and res.avg_bits <= avg and res.total_loss < res.uniform_loss
        assert res.avg_bits > avg - 0.05  # the budget is (nearly) used up


def test_budget_below_minimum_and_missing_losses_raise() -> None:
    items = random_items(3, 11)
    with pytest.raises(ValueError, match="budget of 1.9 average bits is below the minimum candidate bit-width 2"):
        allocate_bits(items, BitAllocConfig(avg_bits=1.9))
    partial = [Sensitivity("a", 4, {2: 1.0, 3: 0.5})]
    with pytest.raises(ValueError, match=r"'a': no loss estimate for candidate bits \[4, 8\]"):
        allocate_bits(partial, BitAllocConfig(avg_bits=3))
    with pytest.raises(ValueError, match="n_params must be > 0"):
        allocate_bits([Sensitivity("z", 0, dict.fromkeys(BITS, 1.0))], BitAllocConfig(avg_bits=3))
    with pytest.raises(pydantic.ValidationError, match="candidate_bits must be distinct"):
        BitAllocConfig(avg_bits=3, candidate_bits=(2, 2))


def test_hessian_sensitivity_formula_and_rtn_agreement() -> None:
    W, H = random_weight(32, 128, 12), random_spd(128, 12)
    sens = hessian_sensitivity("mlp.down", W, H, BITS, group_size=32)
    assert sens.n_params == 32 * 128
    rng = W.double().reshape(32, 4, 32)
    rng = rng.amax(-1).clamp(min=0) - rng.amin(-1).clamp(max=0)
    d = torch.diagonal(H).reshape(4, 32).sum(-1)
    assert sens.loss[3] == pytest.approx(float((rng**2 * d).sum()) / 12 / 49, rel=1e-12)
    assert [sens.loss[b] for b in BITS] == sorted((sens.loss[b] for b in BITS), reverse=True)
    for b in (3, 4, 8):  # the uniform-noise proxy tracks measured RTN proxy losses (measured ratio 0.97–1.02)
        measured = quantize_rtn(W, GridConfig(bits=b, group_size=32), H).stats["proxy_loss"]
        assert 0.5 < measured / sens.loss[b] < 2.0


def test_relative_sensitivity_is_scale_invariant_and_normalised_by_output_energy() -> None:
    """Relative L(b) = absolute L(b) / tr(W H Wᵀ): scaling the layer's inputs (as depth does to the residual
    stream) changes every absolute loss but no relative one, so an allocation cannot be driven by scale alone."""
    W, H = random_weight(32, 128, 13), random_spd(128, 13)
    absolute = hessian_sensitivity("l", W, H, BITS, group_size=32)
    relative = hessian_sensitivity("l", W, H, BITS, group_size=32, relative=True)
    energy = float(((W.double() @ H.double()) * W.double()).sum())
    for b in BITS:
        assert relative.loss[b] == pytest.approx(absolute.loss[b] / energy, rel=1e-12)
    scaled = hessian_sensitivity("l", W, 100.0 * H, BITS, group_size=32, relative=True)
    for b in BITS:
        assert scaled.loss[b] == pytest.approx(relative.loss[b], rel=1e-12)
        assert hessian_sensitivity("l", W, 100.0 * H, BITS, group_size=32).loss[b] == pytest.approx(
            100.0 * absolute.loss[b], rel=1e-12
        )
