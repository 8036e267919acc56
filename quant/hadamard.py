"""Hadamard matrices and the fast Walsh–Hadamard transform (QuIP# §3, ALGORITHMS.md §4).

A Hadamard matrix H_n (entries ±1, H Hᵀ = n I) of order n = m·2^k is built as H_m ⊗ H_{2^k}: Sylvester for the
2^k part (H_{2^k} = H_2 ⊗ … ⊗ H_2, natural order, symmetric) and, for m > 1, Paley's constructions (no tables):

  Paley I  (q ≡ 3 mod 4 a prime power, order q+1):   H = I + S,  S = [[0, 1ᵀ], [−1, Q]]
  Paley II (q ≡ 1 mod 4 a prime power, order 2(q+1)): C = [[0, 1ᵀ], [1, Q]],
           H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]

with the Jacobsthal matrix Q[i, j] = χ(a_j − a_i) over GF(q) (χ the quadratic character, a_i the field elements in
base-p digit order). Primes are preferred to prime powers, Paley I to Paley II, and the smallest m to larger ones,
so 12 = 11+1, 20 = 19+1, 28 = 2·(13+1) agree with ``kernels.hadamard.ref``. Examples: 576 = 36·16 (Paley II,
q = 17), 1536 = 12·128, 11008 = 344·32 (Paley I over GF(7³)), 14336 = 28·512.

The transform applied over the last dim is y = x Hᵀ / √n (each row vector x ↦ H x / √n), orthonormal, computed in
O(n log n) for the 2^k factor plus an m×m matmul for the Paley factor; ``transpose=True`` gives x H / √n (the
inverse). The randomized Hadamard transform (RHT) is V = H_n diag(s) / √n with s a random ±1 vector.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

__all__ = [
    "HadamardSizeError",
    "dense_hadamard",
    "fwht",
    "fwht_pow2",
    "hadamard_factorization",
    "hadamard_matrix",
    "paley_matrix",
    "paley_recipe",
    "random_orthogonal",
    "random_signs",
    "rht",
    "rht_inverse",
]

MAX_PALEY_ORDER = 4096  # Jacobsthal tables beyond this get slow to build; 2^k factors absorb the rest


class HadamardSizeError(ValueError):
    """No Hadamard construction for this size (the message names the size and the random-orthogonal fallback)."""


# ---- GF(q) quadratic character -----------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0 or d * d > q)
    p = q if q % p else p
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _polymulmod(a: list[int], b: list[int], f: list[int], p: int) -> list[int]:
    """a·b mod (f, p) for coefficient lists (lowest degree first); f monic of degree k."""
    k = len(f) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):
        c = prod[d]
        if c:
            for t in range(k + 1):
                prod[d - k + t] = (prod[d - k + t] - c * f[t]) % p
    return prod[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (no monic factor of degree ≤ k/2)."""
    for tail in itertools.product(range(p), repeat=k):
        f = [*tail[::-1], 1]
        if f[0] == 0:
            continue
        reducible = False
        for d in range(1, k // 2 + 1):
            for gt in itertools.product(range(p), repeat=d):
                g = [*gt[::-1], 1]
                r = f[:]  # polynomial remainder of f by monic g
                for s in range(len(r) - 1, d - 1, -1):
                    c = r[s]
                    if c:
                        for t in range(d + 1):
                            r[s - d + t] = (r[s - d + t] - c * g[t]) % p
                if not any(r[:d]):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


@functools.cache
def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(a_j − a_i) over GF(q), float64 [q, q]; element a_i has base-p digits of i as coefficients."""
    pk = _prime_power(q)
    assert pk is not None
    p, k = pk
    digits = torch.tensor([[(i // p**t) % p for t in range(k)] for i in range(q)], dtype=torch.int64)
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    if k == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:
        f = _irreducible(p, k)
        squares = set()
        for i in range(1, q):
            a = digits[i].tolist()
            sq = _polymulmod(a, a, f, p)
            squares.add(sum(c * p**t for t, c in enumerate(sq)))
    chi[sorted(squares)] = 1.0
    diff = (digits[None, :, :] - digits[:, None, :]) % p  # a_j − a_i, digit-wise
    index = (diff * torch.tensor([p**t for t in range(k)], dtype=torch.int64)).sum(-1)
    return chi[index]


def paley_recipe(m: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) giving a Hadamard matrix of order m by Paley's constructions, or None."""
    if m < 4 or m % 4 or m > MAX_PALEY_ORDER:
        return None
    candidates = [("I", m - 1)]
    if m % 8 == 4:
        candidates.append(("II", m // 2 - 1))
    for want_prime in (True, False):
        for kind, q in candidates:
            pk = _prime_power(q)
            if pk is None or (pk[1] == 1) != want_prime:
                continue
            if (kind == "I" and q % 4 == 3) or (kind == "II" and q % 4 == 1):
                return kind, q
    return None


@functools.cache
def _paley(m: int) -> Tensor:
    recipe = paley_recipe(m)
    if recipe is None:
        raise HadamardSizeError(f"no Paley construction for order {m}")
    kind, q = recipe
    Q = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    top = torch.cat([torch.zeros(1, dtype=torch.float64), ones])
    if kind == "I":
        S = torch.cat([top[None, :], torch.cat([-ones[:, None], Q], dim=1)], dim=0)
        H = torch.eye(q + 1, dtype=torch.float64) + S
    else:
        C = torch.cat([top[None, :], torch.cat([ones[:, None], Q], dim=1)], dim=0)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        H = torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    if not torch.equal(H @ H.t(), m * torch.eye(m, dtype=torch.float64)):  # construction check, cheap
        raise AssertionError(f"Paley construction for {m} is not Hadamard")
    return H


def paley_matrix(m: int) -> Tensor:
    """Unnormalised ±1 Paley Hadamard matrix of order m (fp64, cached: do not modify in place)."""
    return _paley(m)


# ---- sizes and dense matrices -------------------------------------------------------------------------------


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m·2^k and a Hadamard matrix of order m (m = 1, or Paley), smallest m; None if none."""
    if n < 1:
        return None
    odd, a = n, 0
    while odd % 2 == 0:
        odd //= 2
        a += 1
    if odd == 1:
        return 1, n
    for j in range(a + 1):
        m = odd << j
        if paley_recipe(m) is not None:
            return m, n // m
    return None


def _size_error(n: int) -> HadamardSizeError:
    odd, p = n, 1
    while odd % 2 == 0:
        odd //= 2
        p *= 2
    return HadamardSizeError(
        f"no Hadamard construction for size {n} = {odd}·{p} (needs 2^k or m·2^k with a Paley order m: q+1 for a "
        f"prime power q ≡ 3 mod 4, or 2(q+1) for q ≡ 1 mod 4); fallback: a random orthogonal {odd}×{odd} factor "
        f"⊗ H_{p} (transform.fallback='random_orthogonal')"
    )


def hadamard_matrix(m: int) -> Tensor:
    """Unnormalised ±1 Hadamard matrix of order m = m0·2^k (fp64), H_{m0} ⊗ H_{2^k}."""
    return dense_hadamard(m, normalize=False)


def dense_hadamard(n: int, *, normalize: bool = True, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense H_n = H_m ⊗ H_{2^k} (the matrix that ``fwht`` applies), divided by √n when ``normalize``."""
    fac = hadamard_factorization(n)
    if fac is None:
        raise _size_error(n)
    m, p = fac
    H = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(p.bit_length() - 1):
        H = torch.kron(H, h2)
    if m > 1:
        H = torch.kron(_paley(m), H)
    return (H / math.sqrt(n) if normalize else H).to(dtype)


# ---- fast transform -----------------------------------------------------------------------------------------


RADIX_BITS = 6  # butterfly stages fused into one dense 64-point Hadamard matmul


@functools.lru_cache(maxsize=64)
def _sylvester(f: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return dense_hadamard(f, normalize=False, dtype=dtype).to(device)


def fwht_pow2(x: Tensor) -> Tensor:
    """Unnormalised Sylvester transform x ↦ x H_{2^k} over the last dim (size 2^k), in x's dtype.

    H_{2^k} = H_{2^a} ⊗ H_{2^b} ⊗ …: each factor (≤ 2^RADIX_BITS points) is one dense ±1 matmul over its axis,
    i.e. RADIX_BITS radix-2 butterfly stages fused, ⌈k / RADIX_BITS⌉ passes — O(n log n) with a BLAS-friendly
    constant. Radix-2 butterflies in torch cost a stack/add/sub pass over the whole tensor per stage; fused, a
    2048-token CPU forward of the E8P SmolLM2 model (two transforms per linear) went from 7.06 s to 5.49 s.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht_pow2 needs a power-of-two last dim, got {n}")
    k = n.bit_length() - 1
    if k == 0:
        return x
    passes = -(-k // RADIX_BITS)
    base, extra = divmod(k, passes)
    rows = x.numel() // n
    z = x.reshape(rows, n)
    for bits in reversed([base + (i < extra) for i in range(passes)]):
        f = 1 << bits
        # transform the trailing factor axis, then rotate it to the front: after all passes the order is restored
        z = torch.matmul(z.reshape(rows, n // f, f), _sylvester(f, x.dtype, x.device))
        z = z.transpose(1, 2).reshape(rows, n)
    return z.reshape(x.shape)


def fwht(x: Tensor, *, transpose: bool = False) -> Tensor:
    """y = x Hᵀ / √n (``transpose``: x H / √n) over the last dim n = m·2^k, in x's dtype (fp32 for halves).

    O(n log n + n·m); ``x H / √n`` inverts ``x Hᵀ / √n`` exactly up to rounding.
    """
    n = x.shape[-1]
    fac = hadamard_factorization(n)
    if fac is None:
        raise _size_error(n)
    m, p = fac
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    z = fwht_pow2(x.to(work).reshape(*x.shape[:-1], m, p))  # [..., m, p]
    if m > 1:
        Hm = _paley(m).to(device=x.device, dtype=work)
        z = torch.matmul(Hm.t() if transpose else Hm, z)  # H_m (or H_mᵀ) along the m axis
    return (z.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


def random_signs(n: int, generator: torch.Generator) -> Tensor:
    """s ∈ {−1, +1}^n, float32 [n], from ``generator``."""
    return (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(torch.float32)


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-random orthogonal Q [n, n]: QR of a Gaussian matrix with the signs of diag(R) fixed."""
    G = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(R))[None, :]).to(dtype).contiguous()


def rht(x: Tensor, signs: Tensor) -> Tensor:
    """Randomized Hadamard transform over the last dim: x ↦ V x with V = H_n diag(s) / √n."""
    return fwht(x * signs.to(x.dtype))


def rht_inverse(y: Tensor, signs: Tensor) -> Tensor:
    """Inverse of ``rht``: y ↦ Vᵀ y = diag(s) H_nᵀ y / √n."""
    return fwht(y, transpose=True) * signs.to(y.dtype)
