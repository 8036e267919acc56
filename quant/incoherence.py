"""Incoherence processing (QuIP, Chee et al. 2023, §4; QuIP# §3) — ALGORITHMS.md §4.

Random orthogonal U [m, m] (outputs) and V [n, n] (inputs) make W and H incoherent before rounding:

    W̃ = U W diag(s) Vᵀ,        H̃ = V diag(s)⁻¹ H diag(s)⁻¹ Vᵀ · n / tr(·)        (H is rotated, never recollected)

so tr((Ŵ̃ − W̃) H̃ (Ŵ̃ − W̃)ᵀ) is the original proxy loss up to the normalisation, and the layer becomes
y = W x ≈ Uᵀ Ŵ̃ V diag(s)⁻¹ x. The optional diagonal rescale is s = (diag H / diag WᵀW)^{1/4} (QuIP); without it
s = 1. The normalised H̃ has mean diagonal 1, so the quantizer's relative damping λ adds exactly λ·I.

Each of U, V is an :class:`OrthogonalTransform` V = K · P · diag(σ) with σ an optional ±1 vector, P an optional
permutation and K = F_1 ⊗ … ⊗ F_r a Kronecker product of small orthogonal factors, each either a normalised Hadamard
matrix (applied by the fast transform of :mod:`quant.hadamard`, never stored) or an explicit small matrix:

* ``kind="kron"`` (QuIP): P random, K = A ⊗ B with Haar-random A [p, p], B [n/p, n/p], p ≈ √n.
* ``kind="hadamard"`` (QuIP#'s RHT): σ random, K = H_n / √n; if n has no Hadamard construction, K = Q ⊗ H_{2^k}/√2^k
  with a Haar-random Q of the odd part (``fallback="random_orthogonal"``) or a clear error (``fallback="error"``).

What is stored (``IncoherenceTransforms.to_dict``) is never a dense n×n matrix. With the seed of the layer's
generator known (:meth:`IncoherenceTransforms.with_seed`, what the pack stage does), only the seed, σ (1 bit each)
and the Kronecker layout are stored, plus a fingerprint of each transform: P and the explicit factors are drawn
again from the seed on load and checked against it, so a torch whose random generators differ fails loudly instead
of applying the wrong rotation. (QuIP's int64 permutations and fp32 factors cost 0.42 bits/weight on SmolLM2.)
Without a seed, P and the explicit factors (fp32, at most a few hundred KB per layer) are stored as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from quant.hadamard import HadamardSizeError, fwht, hadamard_factorization, random_orthogonal, random_signs
from quant.hessian import HELD_DTYPE, HESSIAN_DTYPE, proxy_loss
from quant.precision import exact
from quant.types import ConfigVersion, QuantizedWeight

if TYPE_CHECKING:
    from quant.e8p import E8PWeight

_Q = TypeVar("_Q", "QuantizedWeight", "E8PWeight")  # what an inner quantizer returns (codes + stats + transforms)

__all__ = [
    "TRANSFORM_DTYPE",
    "IncoherenceConfig",
    "IncoherenceTransforms",
    "OrthogonalTransform",
    "Preprocessed",
    "check_transform_size",
    "dequantize_original",
    "incoherence_postprocess",
    "incoherence_preprocess",
    "is_transform_key",
    "make_transform",
    "quantize_incoherent",
    "transforms_from_seed",
]

TRANSFORM_DTYPE = torch.float32  # storage dtype of sign vectors, rescale and explicit factors
_KIND_HADAMARD, _KIND_MATRIX = 0, 1
_KEY = re.compile(r"^(s[uv]|perm_[uv]|kron_[uv]|fac_[uv]\d+|rescale|tseed|tcheck)$")
TransformKind = Literal["kron", "hadamard"]
_KINDS: tuple[TransformKind, ...] = ("hadamard", "kron")  # tseed[1] codes


class IncoherenceConfig(BaseModel):
    """Which random orthogonal transforms to use.

    Sample YAML::

        kind: hadamard            # or kron (QuIP: Kronecker of two random orthogonal factors + permutation)
        rescale: false            # QuIP's s = (diag H / diag WᵀW)^(1/4)
        fallback: random_orthogonal   # sizes with no Hadamard construction; "error" refuses them
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TransformKind = "hadamard"
    rescale: bool = False
    fallback: Literal["error", "random_orthogonal"] = "random_orthogonal"
    version: ConfigVersion = 1


def is_transform_key(key: str) -> bool:
    """True for the tensor names of ``IncoherenceTransforms.to_dict`` (su, sv, perm_u, kron_v, fac_v0, rescale,
    tseed, tcheck)."""
    return bool(_KEY.match(key))


def _odd_split(n: int) -> tuple[int, int]:
    odd, p = n, 1
    while odd % 2 == 0:
        odd //= 2
        p *= 2
    return odd, p


def check_transform_size(n: int, cfg: IncoherenceConfig) -> None:
    """Raise ``HadamardSizeError`` (naming n and the random-orthogonal fallback) if ``cfg`` cannot transform n."""
    if cfg.kind == "hadamard" and cfg.fallback == "error" and hadamard_factorization(n) is None:
        odd, p = _odd_split(n)
        raise HadamardSizeError(
            f"no Hadamard construction for size {n} = {odd}·{p}; set transform.fallback: random_orthogonal "
            f"(a random orthogonal {odd}×{odd} factor ⊗ H_{p}) or use transform kind 'kron'"
        )


@dataclass(frozen=True, eq=False)
class OrthogonalTransform:
    """V = (F_1 ⊗ … ⊗ F_r) · P · diag(σ) on vectors of size n = Π n_i.

    Attributes:
        n: size.
        signs: σ, float32 [n] of ±1, or None.
        perm: int64 [n], P x = x[perm], or None.
        factors: ((n_i, F_i), …); F_i an orthogonal float32 [n_i, n_i], or None for the normalised Hadamard H_{n_i}.
    """

    n: int
    signs: Tensor | None
    perm: Tensor | None
    factors: tuple[tuple[int, Tensor | None], ...]

    def __post_init__(self) -> None:
        if math.prod(size for size, _ in self.factors) != self.n:
            raise ValueError(f"Kronecker factor sizes {[s for s, _ in self.factors]} do not multiply to {self.n}")

    def _kron(self, x: Tensor, transpose: bool) -> Tensor:
        """x [..., n] ↦ x Kᵀ (``transpose``: x K), one factor at a time on a [L, n_i, R] view of x."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.n)
        left, right = x.shape[0], self.n
        for size, F in self.factors:
            right //= size
            x = x.reshape(left, size, right)
            if F is None:
                x = fwht(x.transpose(1, 2), transpose=transpose).transpose(1, 2)
            else:
                F = F.to(device=x.device, dtype=x.dtype)
                x = torch.einsum("ij,ljr->lir", F.t() if transpose else F, x)  # one GEMM, any L and R
            left *= size
        return x.reshape(*lead, self.n)

    def apply(self, x: Tensor) -> Tensor:
        """x [..., n] ↦ x Vᵀ (each row vector x ↦ V x), in x's dtype (float32/float64)."""
        if self.signs is not None:
            x = x * self.signs.to(device=x.device, dtype=x.dtype)
        if self.perm is not None:
            x = x[..., self.perm.to(x.device)]
        return self._kron(x, transpose=False)

    def apply_t(self, y: Tensor) -> Tensor:
        """y [..., n] ↦ y V (each row vector y ↦ Vᵀ y), the inverse of ``apply``."""
        y = self._kron(y, transpose=True)
        if self.perm is not None:
            y = y[..., torch.argsort(self.perm.to(y.device))]
        if self.signs is not None:
            y = y * self.signs.to(device=y.device, dtype=y.dtype)
        return y

    def fingerprint(self) -> float:
        """⟨V p, q⟩ for two fixed probe vectors (float64): changes with any sign, permutation entry or factor."""
        i = torch.arange(self.n, dtype=torch.float64)
        return float(self.apply(torch.cos(0.7 * i + 0.3)[None])[0] @ torch.sin(1.3 * i + 0.1))

    def same_as(self, other: OrthogonalTransform) -> bool:
        """Same layout, signs and permutation, factors equal to 1e-6 (what a re-draw from the same seed gives)."""

        def same(a: Tensor | None, b: Tensor | None, tol: float = 0.0) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=0, atol=tol))

        return (
            self.n == other.n
            and [n for n, _ in self.factors] == [n for n, _ in other.factors]
            and same(self.signs, other.signs)
            and same(self.perm, other.perm)
            and all(same(a, b, 1e-6) for (_, a), (_, b) in zip(self.factors, other.factors, strict=True))
        )

    def to(self, device: torch.device | str) -> OrthogonalTransform:
        """The same transform with its tensors on ``device``."""
        return OrthogonalTransform(
            self.n,
            None if self.signs is None else self.signs.to(device),
            None if self.perm is None else self.perm.to(device),
            tuple((n, None if F is None else F.to(device)) for n, F in self.factors),
        )

    def layout(self) -> list[list[int]]:
        """[[n_i, 0 Hadamard / 1 matrix], …]: the ``kron_<side>`` tensor's rows."""
        return [[size, _KIND_HADAMARD if F is None else _KIND_MATRIX] for size, F in self.factors]

    def has_drawn_parts(self) -> bool:
        """A permutation or an explicit factor: what a seed saves storing."""
        return self.perm is not None or any(F is not None for _, F in self.factors)

    def to_tensors(self, side: str, *, seeded: bool = False) -> dict[str, Tensor]:
        """Small tensors: s<side> (σ, bit-packed by :func:`pack_signs`), perm_<side>, kron_<side> int32 [r, 2]
        (size, 0 Hadamard / 1 matrix), fac_<side>i.

        ``side`` is "u" (outputs) or "v" (inputs); ``seeded`` leaves out P and the explicit factors (drawn again
        from the seed on load).
        """
        out: dict[str, Tensor] = {}
        if self.signs is not None:
            out[f"s{side}"] = pack_signs(self.signs)
        if self.perm is not None and not seeded:
            out[f"perm_{side}"] = self.perm
        out[f"kron_{side}"] = torch.tensor(self.layout(), dtype=torch.int32)
        for i, (_, F) in enumerate(self.factors):
            if F is not None and not seeded:
                out[f"fac_{side}{i}"] = F
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], side: str) -> OrthogonalTransform:
        kron = tensors[f"kron_{side}"].tolist()
        factors = tuple(
            (int(size), None if kind == _KIND_HADAMARD else tensors[f"fac_{side}{i}"])
            for i, (size, kind) in enumerate(kron)
        )
        n = math.prod(size for size, _ in factors)
        signs = tensors.get(f"s{side}")
        if signs is not None and signs.dtype == torch.uint8:
            signs = unpack_signs(signs, n)
        return cls(n, signs, tensors.get(f"perm_{side}"), factors)


def pack_signs(signs: Tensor) -> Tensor:
    """σ ∈ {−1, +1}^n → uint8 [⌈n/8⌉], bit i (LSB first) set where σ_i = −1: 1 bit per sign in the checkpoint
    instead of 32 (at 2 bits/weight the fp32 sign vectors of SmolLM2's layers cost 0.09 bits/weight)."""
    neg = torch.nn.functional.pad((signs < 0).to(torch.int32), (0, (-signs.numel()) % 8)).reshape(-1, 8)
    return (neg << torch.arange(8, device=signs.device)).sum(1).to(torch.uint8)


def unpack_signs(data: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_signs`: float32 [n] of ±1 (float sign tensors of older artifacts are read as they are)."""
    if data.numel() * 8 < n:
        raise ValueError(f"packed sign vector of {data.numel()} bytes is too short for {n} signs")
    bits = (data.to(torch.int32)[:, None] >> torch.arange(8, device=data.device)) & 1
    return (1 - 2 * bits.reshape(-1)[:n]).to(torch.float32)


def make_transform(n: int, cfg: IncoherenceConfig, generator: torch.Generator) -> OrthogonalTransform:
    """A random orthogonal transform of size n for ``cfg.kind`` (draws from ``generator``)."""
    if cfg.kind == "hadamard":
        check_transform_size(n, cfg)
        signs = random_signs(n, generator)
        if hadamard_factorization(n) is not None:
            return OrthogonalTransform(n, signs, None, ((n, None),))
        odd, p = _odd_split(n)
        Q = random_orthogonal(odd, generator).to(TRANSFORM_DTYPE)
        factors: tuple[tuple[int, Tensor | None], ...] = ((odd, Q),) if p == 1 else ((odd, Q), (p, None))
        return OrthogonalTransform(n, signs, None, factors)
    perm = torch.randperm(n, generator=generator)
    p = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    A = random_orthogonal(p, generator).to(TRANSFORM_DTYPE)
    if p == 1:  # n prime: one dense n×n factor (small n only)
        return OrthogonalTransform(n, None, perm, ((n, random_orthogonal(n, generator).to(TRANSFORM_DTYPE)),))
    B = random_orthogonal(n // p, generator).to(TRANSFORM_DTYPE)
    return OrthogonalTransform(n, None, perm, ((p, A), (n // p, B)))


def transforms_from_seed(
    seed: int, kind: TransformKind, m: int, n: int
) -> tuple[OrthogonalTransform, OrthogonalTransform]:
    """(U [m], V [n]) as :func:`incoherence_preprocess` draws them from a fresh generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    cfg = IncoherenceConfig(kind=kind, fallback="random_orthogonal")
    V = make_transform(n, cfg, g)
    return make_transform(m, cfg, g), V


@dataclass(frozen=True, eq=False)
class IncoherenceTransforms:
    """U (outputs, size m), V (inputs, size n) and the optional input rescale s (float32 [n])."""

    U: OrthogonalTransform
    V: OrthogonalTransform
    rescale: Tensor | None = None
    seed: tuple[int, TransformKind] | None = None  # (generator seed, kind) that draws V then U: stored instead

    def to_dict(self) -> dict[str, Tensor]:
        """The checkpoint tensors (names satisfy ``is_transform_key``): seed + signs + layout when seeded."""
        seeded = self.seed is not None
        out = {**self.U.to_tensors("u", seeded=seeded), **self.V.to_tensors("v", seeded=seeded)}
        if self.rescale is not None:
            out["rescale"] = self.rescale
        if self.seed is not None:
            seed, kind = self.seed
            out["tseed"] = torch.tensor([seed, _KINDS.index(kind)], dtype=torch.int64)
            out["tcheck"] = torch.tensor([self.U.fingerprint(), self.V.fingerprint()], dtype=torch.float32)
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> IncoherenceTransforms:
        """Read ``to_dict``'s tensors; seeded ones draw P and the factors again and check them (ValueError)."""
        if "tseed" not in tensors:
            return cls(
                OrthogonalTransform.from_tensors(tensors, "u"),
                OrthogonalTransform.from_tensors(tensors, "v"),
                tensors.get("rescale"),
            )
        seed, code = (int(v) for v in tensors["tseed"].tolist())
        if not 0 <= code < len(_KINDS) or "tcheck" not in tensors:
            raise ValueError(f"transform seed tensor {tensors['tseed'].tolist()} is not [seed, kind 0/1] with a tcheck")
        kind = _KINDS[code]
        sizes = {side: math.prod(int(r[0]) for r in tensors[f"kron_{side}"].tolist()) for side in "uv"}
        U, V = transforms_from_seed(seed, kind, sizes["u"], sizes["v"])
        for side, T, check in (("u", U, 0), ("v", V, 1)):
            signs = tensors.get(f"s{side}")
            want = float(tensors["tcheck"][check])
            if (
                T.layout() != tensors[f"kron_{side}"].tolist()
                or (signs is None) != (T.signs is None)
                or (
                    signs is not None
                    and T.signs is not None
                    and not torch.equal(unpack_signs(signs.cpu(), T.n), T.signs)
                )
                or abs(T.fingerprint() - want) > 1e-5 * (1 + abs(want))
            ):
                raise ValueError(
                    f"{'UV'[check]} transform (size {T.n}) drawn from its stored seed does not match the packer's "
                    f"fingerprint: this torch {torch.__version__} draws different random numbers; re-pack the model "
                    "with this torch (the quantize artifact keeps the explicit transforms)"
                )
        return cls(U, V, tensors.get("rescale"), (seed, kind))

    def to(self, device: torch.device | str) -> IncoherenceTransforms:
        """The same transforms with their tensors on ``device`` (seeded ones are drawn on the CPU)."""
        rescale = None if self.rescale is None else self.rescale.to(device)
        return IncoherenceTransforms(self.U.to(device), self.V.to(device), rescale, self.seed)

    def with_seed(self, seed: int, kind: TransformKind) -> IncoherenceTransforms:
        """Store as ``seed`` if drawing V then U from it with ``kind`` gives exactly these transforms (the pack stage
        knows each layer's seed); unchanged otherwise, so nothing is ever lost."""
        if self.seed is not None or not (self.U.has_drawn_parts() or self.V.has_drawn_parts()):
            return self
        U, V = transforms_from_seed(seed, kind, self.U.n, self.V.n)
        if not (U.same_as(self.U) and V.same_as(self.V)):
            return self
        return IncoherenceTransforms(U, V, self.rescale, (seed, kind))

    def input(self, x: Tensor) -> Tensor:
        """x [..., n] ↦ V diag(s)⁻¹ x (rows): what the quantized weight Ŵ̃ multiplies."""
        if self.rescale is not None:
            x = x / self.rescale.to(device=x.device, dtype=x.dtype)
        return self.V.apply(x)

    def output(self, y: Tensor) -> Tensor:
        """y [..., m] ↦ Uᵀ y (rows)."""
        return self.U.apply_t(y)


class Preprocessed(NamedTuple):
    """W̃ [m, n], H̃ [n, n] (mean diag 1), in the dtype asked for; the transforms; h_scale = tr(H_rot)/n."""

    W: Tensor
    H: Tensor
    transforms: IncoherenceTransforms
    h_scale: float


_PANEL = 1024


def _rotate_hessian_(H: Tensor, V: OrthogonalTransform) -> None:
    """H ← (V H Vᵀ + (V H Vᵀ)ᵀ)/2 in place on a private float64 H (symmetric), one panel of rows or columns at a
    time: a 28,672-wide Hessian is 6.6 GB in float64, and the out-of-place chain held four such matrices. The
    arithmetic per entry is the out-of-place chain's: rows first (M = H Vᵀ), then each column panel of M becomes
    the rows of R = V M, written transposed (the buffer holds Rᵀ, whose symmetrization equals R's)."""
    n = H.shape[0]
    for a in range(0, n, _PANEL):
        H[a : a + _PANEL] = V.apply(H[a : a + _PANEL])
    for a in range(0, n, _PANEL):
        H[:, a : a + _PANEL] = V.apply(H[:, a : a + _PANEL].t().contiguous()).t()
    for a in range(0, n, _PANEL):
        b = min(a + _PANEL, n)
        for c in range(a, n, _PANEL):
            d = min(c + _PANEL, n)
            avg = (H[a:b, c:d] + H[c:d, a:b].t()) / 2
            H[a:b, c:d] = avg
            H[c:d, a:b] = avg.t()


def incoherence_preprocess(
    W: Tensor,
    H: Tensor,
    cfg: IncoherenceConfig,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = HESSIAN_DTYPE,
    out: Tensor | None = None,
) -> Preprocessed:
    """W̃ = U W diag(s) Vᵀ, H̃ = V diag(s)⁻¹ H diag(s)⁻¹ Vᵀ · n/tr, computed in float64 (V drawn first, then U) and
    returned in ``dtype``: the quantizers take float32 (``quant.hessian.HELD_DTYPE``), so a rotated 70B down_proj
    Hessian is held in 3.3 GB, and the only full float64 matrix made is the one H is rotated in.

    ``out`` (an [n, n] ``dtype`` matrix, which may be H itself: H is only read before H̃ is written) receives H̃
    instead of a new matrix, so a caller done with H holds one n×n matrix through the sweep instead of two.

    W̃ is made before the float64 H: its float64 temporaries (three m×n, 5.6 GB at a 70B down_proj) and the
    float64 H (6.6 GB) are never alive together."""
    m, n = W.shape
    if out is not None and (tuple(out.shape) != (n, n) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} [{n}, {n}] matrix, got {out.dtype} {tuple(out.shape)}")
    W64 = W.to(HESSIAN_DTYPE)
    V = make_transform(n, cfg, generator)
    U = make_transform(m, cfg, generator)
    s = s64 = None
    if cfg.rescale:
        d = torch.diagonal(H).to(HESSIAN_DTYPE)
        dH = d.clamp_min(1e-8 * float(d.mean()) + 1e-30)
        dW = (W64 * W64).sum(0)
        dW = dW.clamp_min(1e-8 * float(dW.mean()) + 1e-30)
        s = (dH / dW).pow(0.25).to(TRANSFORM_DTYPE)
        s64 = s.to(HESSIAN_DTYPE)
        W64 = W64 * s64[None, :]
    W_t = U.apply(V.apply(W64).t()).t().to(dtype)  # U (W Vᵀ)
    del W64
    H64 = H.to(HESSIAN_DTYPE, copy=True)
    if s64 is not None:
        H64.div_(s64[None, :]).div_(s64[:, None])
    _rotate_hessian_(H64, V)  # V H Vᵀ (H symmetric), symmetrized
    h_scale = float(torch.diagonal(H64).mean())
    if not h_scale > 0:
        raise ValueError("Hessian has zero trace; collect calibration data first")
    if out is not None:
        H_t = out
        for a in range(0, n, _PANEL):
            H_t[a : a + _PANEL] = H64[a : a + _PANEL] / h_scale
        del H64
    elif dtype == HESSIAN_DTYPE:
        H_t = H64.div_(h_scale)
    else:
        H_t = torch.empty(n, n, dtype=dtype, device=H64.device)
        for a in range(0, n, _PANEL):
            H_t[a : a + _PANEL] = H64[a : a + _PANEL] / h_scale
        del H64
    return Preprocessed(W_t, H_t, IncoherenceTransforms(U, V, s), h_scale)


def incoherence_postprocess(W_tilde: Tensor, transforms: IncoherenceTransforms) -> Tensor:
    """W = Uᵀ W̃ V diag(s)⁻¹ (float64 for float64 input): undo ``incoherence_preprocess`` on a weight."""
    W = transforms.U.apply_t(transforms.V.apply_t(W_tilde).t()).t()
    if transforms.rescale is not None:
        W = W / transforms.rescale.to(device=W.device, dtype=W.dtype)[None, :]
    return W


def dequantize_original(q: QuantizedWeight | E8PWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The fake-quantized weight in the original basis: Ŵ for plain weights, Uᵀ Ŵ̃ V diag(s)⁻¹ with transforms."""
    if q.transforms is None:
        return q.dequantize(dtype)
    W = incoherence_postprocess(q.dequantize(HESSIAN_DTYPE), IncoherenceTransforms.from_dict(q.transforms))
    return W.to(dtype)


@exact
def quantize_incoherent(
    W: Tensor,
    H: Tensor,
    cfg: IncoherenceConfig,
    quantizer: Callable[[Tensor, Tensor], _Q],
    *,
    generator: torch.Generator,
    consume_h: bool = False,
) -> _Q:
    """Quantize W [out, in] as ``quantizer(W̃, H̃)`` (e.g. LDLQ, GPTQ or E8P block LDLQ) in the incoherent basis.

    Returns the inner codes/grids (of Ŵ̃) with ``transforms`` set. stats: the inner ones, with proxy_loss
    rescaled to the un-normalised H̃, proxy_loss_exact = tr((Ŵ − W) H (Ŵ − W)ᵀ), and proxy_loss_rotated_exact
    from the inner quantizer (normalised H̃, mean diag 1).

    ``consume_h``: the caller is done with H (a float32 matrix of its own), so H̃ is written into H's memory
    (``incoherence_preprocess(out=H)``) and H is not read afterwards. Through the sweep this holds H̃, not H and H̃:
    one n×n float32 matrix less, 3.3 GB at a 70B down_proj. proxy_loss_exact is then h_scale · tr(ΔW̃ H̃ ΔW̃ᵀ),
    equal to the original basis's trace because U and V are orthogonal and diag(s) cancels between W̃ and H̃ (the
    same codes either way; the loss agrees to float32 rounding, tested).
    """
    consume = consume_h and H.dtype == HELD_DTYPE and H.is_contiguous()
    pre = incoherence_preprocess(W, H, cfg, generator=generator, dtype=HELD_DTYPE, out=H if consume else None)
    q = quantizer(pre.W, pre.H)
    stats = dict(q.stats)
    if "proxy_loss" in stats:
        stats["proxy_loss"] = stats["proxy_loss"] * pre.h_scale
    if "proxy_loss_exact" in stats:
        stats["proxy_loss_rotated_exact"] = stats["proxy_loss_exact"]
    if consume:  # H now holds H̃: the trace in the rotated basis
        rotated = stats.get("proxy_loss_rotated_exact")
        if rotated is None:
            rotated = proxy_loss(pre.W, q.dequantize(torch.float32), pre.H)
        stats["proxy_loss_exact"] = rotated * pre.h_scale
    else:
        W_hat = incoherence_postprocess(q.dequantize(HESSIAN_DTYPE), pre.transforms)
        stats["proxy_loss_exact"] = proxy_loss(W, W_hat, H)
    return replace(q, stats=stats, transforms={k: v.cpu() for k, v in pre.transforms.to_dict().items()})
