"""Hadamard constructions and the fast Walsh–Hadamard transform against dense matrices built independently."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.hadamard import (
    HadamardSizeError,
    dense_hadamard,
    fwht,
    fwht_pow2,
    hadamard_factorization,
    paley_matrix,
    paley_recipe,
    random_orthogonal,
    random_signs,
    rht,
    rht_inverse,
)

F64 = torch.float64

# order → (construction, q): primes, and prime powers through GF(p^k) (25 = 5², 27 = 3³, 343 = 7³)
PALEY = {
    4: ("I", 3),
    8: ("I", 7),
    12: ("I", 11),
    20: ("I", 19),
    24: ("I", 23),
    28: ("II", 13),
    36: ("II", 17),
    52: ("II", 25),
    108: ("I", 107),
    344: ("I", 343),
}


@pytest.mark.parametrize("m", list(PALEY))
def test_paley_matrices_are_hadamard(m: int) -> None:
    assert paley_recipe(m) == PALEY[m]
    H = paley_matrix(m)
    assert H.shape == (m, m) and bool(((H == 1) | (H == -1)).all())
    torch.testing.assert_close(H @ H.t(), m * torch.eye(m, dtype=F64), rtol=0, atol=0)


def test_prime_power_fields() -> None:
    # Paley I over GF(27) exists; 28 still uses the prime construction (agreement with kernels.hadamard.ref)
    assert paley_recipe(28) == ("II", 13)
    assert paley_recipe(56) is None and hadamard_factorization(56) == (28, 2)


# The sizes of SmolLM2 (576 hidden, 1536 MLP, 192 k/v) and Llama (4096, 11008, 14336, 28672).
MODEL_SIZES = {
    64: (1, 64),
    192: (12, 16),
    576: (36, 16),
    1536: (12, 128),
    4096: (1, 4096),
    11008: (344, 32),
    14336: (28, 512),
    28672: (28, 1024),
}


@pytest.mark.parametrize(("n", "split"), MODEL_SIZES.items(), ids=str)
def test_model_sizes_have_constructions(n: int, split: tuple[int, int]) -> None:
    assert hadamard_factorization(n) == split


@pytest.mark.parametrize("n", [3, 9, 10, 18, 54, 172])
def test_unsupported_sizes_name_the_fallback(n: int) -> None:
    assert hadamard_factorization(n) is None
    with pytest.raises(HadamardSizeError, match=rf"size {n} .*random orthogonal"):
        fwht(torch.zeros(n))


def sylvester_kron(n: int) -> torch.Tensor:
    """Normalised H_n built the slow way: Sylvester doubling by concatenation, then ⊗ with the Paley factor."""
    m, p = hadamard_factorization(n) or (0, 0)
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if m > 1:
        H = torch.kron(paley_matrix(m), H)
    return H / math.sqrt(n)


DENSE_SIZES = [1, 2, 4, 8, 64, 12, 24, 36, 72, 192, 576, 688, 1536]


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_fwht_equals_dense_product(n: int) -> None:
    H = sylvester_kron(n)
    torch.testing.assert_close(dense_hadamard(n), H, rtol=0, atol=0)
    torch.testing.assert_close(H @ H.t(), torch.eye(n, dtype=F64), rtol=0, atol=1e-12)  # orthonormal
    x = torch.randn(3, 5, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fwht(x), x @ H.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(x, transpose=True), x @ H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x), transpose=True), x, rtol=1e-12, atol=1e-12)  # inverse


def butterfly(x: torch.Tensor) -> torch.Tensor:
    """x H_{2^k} by radix-2 butterflies, one stage at a time: the textbook FWHT."""
    n, h = x.shape[-1], 1
    while h < n:
        y = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(x.shape)
        h *= 2
    return x


@pytest.mark.parametrize("k", range(15))  # 1 … 3 fused passes of up to RADIX_BITS stages, even and uneven splits
def test_fwht_pow2_equals_butterflies(k: int) -> None:
    n = 1 << k
    x = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(fwht_pow2(x), butterfly(x), rtol=1e-12, atol=1e-9)
    strided = torch.randn(n, 2, dtype=F64).t()  # non-contiguous rows
    torch.testing.assert_close(fwht_pow2(strided), butterfly(strided.contiguous()), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(fwht_pow2(x[0]), butterfly(x[0]), rtol=1e-12, atol=1e-9)  # 1-D
    x32 = x.float()
    torch.testing.assert_close(fwht_pow2(x32), butterfly(x).float(), rtol=1e-5, atol=1e-5 * math.sqrt(n))


def test_fwht_pow2_refuses_other_sizes() -> None:
    with pytest.raises(ValueError, match="power-of-two last dim, got 12"):
        fwht_pow2(torch.zeros(2, 12))


@pytest.mark.parametrize("n", [12, 24, 80, 112, 512])
def test_matches_kernels_reference(n: int) -> None:
    from kernels.hadamard.ref import fwht_ref

    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fwht(x), fwht_ref(x), rtol=1e-6, atol=1e-6)


def test_fwht_dtypes() -> None:
    x = torch.randn(2, 576, dtype=torch.float32)
    assert fwht(x).dtype == torch.float32
    y = fwht(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fwht(x.to(torch.bfloat16).float()).to(torch.bfloat16).float())


SUPPORTED = [n for n in range(1, 700) if hadamard_factorization(n) is not None]


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(SUPPORTED), seed=st.integers(0, 2**31 - 1))
def test_rht_is_orthogonal_and_inverted(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s = random_signs(n, g)
    assert bool(((s == 1) | (s == -1)).all())
    x = torch.randn(3, n, dtype=F64, generator=g)
    y = rht(x, s)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)  # norm-preserving
    torch.testing.assert_close(rht_inverse(y, s), x, rtol=1e-12, atol=1e-12)
    V = dense_hadamard(n) * s.to(F64)[None, :]  # V = H diag(s) / √n
    torch.testing.assert_close(y, x @ V.t(), rtol=1e-11, atol=1e-11)


def test_random_orthogonal_is_orthogonal_and_seeded() -> None:
    Q = random_orthogonal(9, torch.Generator().manual_seed(1))
    torch.testing.assert_close(Q @ Q.t(), torch.eye(9, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(Q, random_orthogonal(9, torch.Generator().manual_seed(1)))
