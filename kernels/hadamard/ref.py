"""Reference fast Walsh–Hadamard transform (FWHT) along the last dim, normalised: y = x @ H_n / sqrt(n).

Sizes: n = 2^k (Sylvester H_{2^k} = H_2 ⊗ ... ⊗ H_2, natural order), and n = m·2^k with m ∈ {12, 20, 28}:
H_n = H_m ⊗ H_{2^k}, where the small H_m are built in code by Paley's constructions (no tables):

  Paley I  (q ≡ 3 mod 4 prime, order q+1):  H = I + S,  S = [[0, 1ᵀ], [−1, Q]]
  Paley II (q ≡ 1 mod 4 prime, order 2(q+1)): C = [[0, 1ᵀ], [1, Q]],
           H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]
  with the Jacobsthal matrix Q[i, j] = χ(j − i), χ the Legendre symbol mod q.
  12 = 11+1 (Paley I), 20 = 19+1 (Paley I), 28 = 2·(13+1) (Paley II); built by ``quant.hadamard`` (which also
  covers the other Paley orders, e.g. 36 for 576 = 36·16, used by the quantizer's CPU transforms).

Sylvester H_{2^k} is symmetric, the Paley H_m are not, so the convention matters: the transform applied is
y[..., i] = Σ_j H[i, j] x[..., j] / sqrt(n), i.e. y = x Hᵀ / sqrt(n); it is orthonormal, the inverse is y H / sqrt(n).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quant.hadamard import dense_hadamard, fwht_pow2, paley_matrix

__all__ = [
    "PALEY_SIZES",
    "fwht_ref",
    "hadamard_matrix",
    "paley_hadamard",
    "split_hadamard_size",
]

PALEY_SIZES = (12, 20, 28)


def _paley(m: int) -> Tensor:
    """The Paley H_m of ``quant.hadamard`` (one construction for quantizer and kernels)."""
    if m not in PALEY_SIZES:
        raise ValueError(f"no Paley construction here for order {m}; supported: {PALEY_SIZES}")
    return paley_matrix(m)


def paley_hadamard(m: int) -> Tensor:
    """Unnormalised ±1 Hadamard matrix of order m ∈ {12, 20, 28} (fp64), via Paley I/II."""
    return _paley(m).clone()


def split_hadamard_size(n: int) -> tuple[int, int]:
    """n = m · 2^k with m ∈ {1, 12, 20, 28}; returns (m, 2^k). Raises a helpful ValueError otherwise."""
    for m in (1, *PALEY_SIZES):
        if n >= m and n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    raise ValueError(
        f"unsupported Hadamard size {n}: need 2^k or m·2^k with m in {PALEY_SIZES} "
        "(e.g. 12·2^k covers 3072, 20·2^k covers 5120, 28·2^k covers 14336)"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, normalize: bool = True) -> Tensor:
    """Dense H_n = H_m ⊗ H_{2^k} (Sylvester for the 2^k part), optionally divided by sqrt(n).

    Sizes are those of ``split_hadamard_size``; the matrix is ``quant.hadamard.dense_hadamard`` (the same
    factorization n = m·2^k for these sizes), so quantizer and kernels apply one construction.
    """
    split_hadamard_size(n)  # the kernels' size contract: refuse what the Triton transform cannot do
    return dense_hadamard(n, normalize=normalize, dtype=dtype)


def fwht_ref(x: Tensor) -> Tensor:
    """y = x @ H_nᵀ / sqrt(n) over the last dim (n = 2^k or m·2^k), computed in fp32 (fp64 stays fp64)."""
    n = x.shape[-1]
    m, p = split_hadamard_size(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = fwht_pow2(x.to(work).reshape(*x.shape[:-1], m, p))  # [..., m, p]
    if m > 1:
        z = torch.matmul(_paley(m).to(work), z)  # H_m along the m axis
    return (z.reshape(x.shape) / math.sqrt(n)).to(x.dtype)
