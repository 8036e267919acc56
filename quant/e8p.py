"""E8P: QuIP#'s 2-bit lattice codebook (Tseng et al. 2024, §4) and block LDLQ over it — ALGORITHMS.md §4.

After incoherence processing a weight's entries are close to i.i.d. Gaussian, and a scalar grid wastes the
"shape" of that distribution: rounding groups of 8 weights to a point of a ball-shaped piece of the E8
lattice has lower mean squared error at the same rate. Measured on N(0, 1) samples: 0.0912 at 2.00 bits/weight
(best scale 1.03) against 0.1193 for the best 4-level uniform scalar grid — 24 % less noise with no per-group
grid at all.

The codebook (65,536 = 2^16 points of E8 + 1/4, i.e. 16 bits per 8 weights):

* ``A``: 256 "absolute" vectors with half-odd entries — the 227 distinct |x| of the points x of D8 + 1/2
  (half-odd entries, even sum) with ‖x‖² ≤ 10, plus 29 of the 56 vectors with five 3/2 and three 1/2
  (‖x‖² = 12; the first 29 in lexicographic order, to fill 8 bits);
* a point is s ⊙ a + t for a ∈ A, signs s with the parity that keeps s ⊙ a in D8 + 1/2 (sum even: the number
  of negative signs ≡ Σa mod 2, so 7 free sign bits), and a shift t = ±1/4.

Index layout (int16, read as uint16): bits 0..6 the signs of entries 0..6 (1 = negative; entry 7's sign is
implied by the parity), bit 7 the shift (0: +1/4, 1: −1/4), bits 8..15 the row of ``A``. Decoding is one
table lookup; encoding is exact nearest-point search (:func:`e8p_nearest`) using the sign structure:
for a fixed a and shift t, the best signs are those of y = x − t, and if their parity is wrong the cheapest
fix flips the entry with the smallest a_i·|y_i|. That is 2 × 256 candidates per vector instead of 65,536.

Block LDLQ (QuIP# §4.1): columns are quantized 8 at a time, the block's error fed forward exactly as
GPTQ's lazy batch update does for one column. With U the upper Cholesky factor of H⁻¹ and b the current
8 columns, E_b = (X_b − Q(X_b)) U_bb⁻¹ and X_r −= E_b U_br for every later column r. This is the optimal
(OBS) update of all not-yet-quantized columns given the fixed ones (tested against that closed form), and
tr(ΔHΔᵀ) = Σ_b ‖E_b‖² (``stats["proxy_loss"]``). Columns are taken in order (no act-order: after incoherence
processing diag(H̃) is nearly flat).

3 bits (QuIP#'s residual vector quantization): after the E8P codeword c₁, the residual r = x/s − c₁ is rounded,
scaled by ρ = ``RESID_SCALE``, to one of 256 points of E8 itself (``e8_residual_grid``: the 240 roots, the origin
and 15 of the 16 points ±2eᵢ; 8 more bits per 8 weights), x̂ = s·(c₁ + c₂/ρ). Measured on N(0, 1): 0.0296 against
0.0377 for the best 8-level uniform scalar grid (ρ = 2 is the best of 1.8 … 4.0).

Scale: one fp16 scale per output row, s_r = RMS(W_r) / ``scale``, rounded to fp16 before coding so packing is
lossless. 1.03 minimises the squared error of plain rounding of Gaussian inputs; under LDLQ the rounded inputs
carry the fed-back errors too, and on SmolLM2-135M (W2, 16 windows) scale 0.9 / 0.95 / 1.0 / 1.03 gave ppl
67.0 / 54.7 / 53.7 / 57.1, hence the default 1.0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import cache

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from quant.gptq import SWEEP_DTYPE, sweep_factor, validate_inputs
from quant.hessian import HESSIAN_DTYPE, DampFraction, check_damp_max, dead_inputs, proxy_loss
from quant.precision import exact
from quant.types import ConfigVersion

__all__ = [
    "E8P_BITS",
    "E8P_DIM",
    "RESID_SCALE",
    "E8PConfig",
    "E8PWeight",
    "check_e8p_width",
    "e8_residual_grid",
    "e8_residual_nearest",
    "e8p_abs_grid",
    "e8p_codebook",
    "e8p_decode",
    "e8p_nearest",
    "quantize_e8p_ldlq",
]

E8P_DIM = 8  # weights per codeword
E8P_BITS = 2  # code bits per weight: 16-bit index / 8 weights
RESID_SCALE = 2.0  # ρ: the residual codeword is divided by ρ (3-bit codes)
_SHIFT = 0.25
_CHUNK = 4096  # vectors per nearest-point batch (bounds the rare full [chunk, 256, 8] fallback to 32 MiB)


class E8PConfig(BaseModel):
    """Block LDLQ over the E8P codebook.

    Sample YAML::

        bits: 2            # 2: E8P; 3: E8P + an 8-bit E8 residual codeword per 8 weights
        scale: 1.0         # s_r = RMS(W_r) / scale
        damp: 0.01
        damp_max: 1.0
        block_size: 128    # lazy-batch width (a multiple of 8)
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(default=2, ge=2, le=3)
    scale: float = Field(default=1.0, gt=0, le=4.0)
    damp: DampFraction = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    version: ConfigVersion = 1

    @model_validator(mode="after")
    def _check(self) -> E8PConfig:
        check_damp_max(self.damp, self.damp_max)
        if self.block_size < E8P_DIM or self.block_size % E8P_DIM:
            raise ValueError(f"block_size must be a positive multiple of {E8P_DIM}, got {self.block_size}")
        return self


@cache
def e8p_abs_grid() -> Tensor:
    """float32 [256, 8]: the absolute vectors ``A`` (see the module docstring), rows in a fixed order."""
    half = torch.cartesian_prod(*[torch.arange(-4, 4, dtype=torch.float32)] * E8P_DIM) + 0.5
    keep = (half.sum(-1) % 2 == 0) & (half.pow(2).sum(-1) <= 10)
    inner = torch.unique(half[keep].abs(), dim=0)  # 227 rows, lexicographic
    norm12 = sorted(set(itertools.permutations((1.5, 1.5, 1.5, 1.5, 1.5, 0.5, 0.5, 0.5))))[:29]
    grid = torch.cat([inner, torch.tensor(norm12, dtype=torch.float32)])
    if grid.shape != (256, E8P_DIM):  # pragma: no cover - a construction bug, not an input error
        raise AssertionError(f"E8P absolute grid has shape {tuple(grid.shape)}, expected (256, 8)")
    return grid


@cache
def _abs_parity() -> Tensor:
    """int64 [256]: Σa mod 2 — the parity the number of negative signs must have."""
    return (e8p_abs_grid().sum(-1).round().long()) % 2


def e8p_decode(idx: Tensor) -> Tensor:
    """Codeword of each index (int16/int32/int64, any shape) → float32 [..., 8]."""
    i = idx.long() & 0xFFFF
    a = e8p_abs_grid().to(idx.device)[i >> 8]
    bits = (i[..., None] >> torch.arange(E8P_DIM - 1, device=idx.device)) & 1  # signs of entries 0..6
    neg7 = (bits.sum(-1) + _abs_parity().to(idx.device)[i >> 8]) % 2  # implied sign of entry 7
    neg = torch.cat([bits, neg7[..., None]], dim=-1)
    shift = torch.where((i >> 7) & 1 == 1, -_SHIFT, _SHIFT)
    return a * (1 - 2 * neg).to(torch.float32) + shift[..., None].to(torch.float32)


@cache
def e8p_codebook() -> Tensor:
    """float32 [65536, 8]: every codeword, row i = ``e8p_decode(i)`` (for tests and brute-force checks)."""
    return e8p_decode(torch.arange(1 << 16))


@cache
def e8_residual_grid() -> Tensor:
    """float32 [256, 8]: the residual codebook of 3-bit codes — the 240 roots of E8 (norm² 2), the origin, and
    the first 15 (lexicographic) of the 16 points ±2eᵢ (norm² 4)."""
    pts = []
    for i, j in itertools.combinations(range(E8P_DIM), 2):
        for a, b in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * E8P_DIM
            v[i], v[j] = a, b
            pts.append(v)
    pts += [list(s) for s in itertools.product((0.5, -0.5), repeat=E8P_DIM) if sum(x < 0 for x in s) % 2 == 0]
    pts.append([0.0] * E8P_DIM)
    twos = sorted([2.0 * s if k == i else 0.0 for k in range(E8P_DIM)] for i in range(E8P_DIM) for s in (1, -1))
    return torch.tensor(pts + twos[:15], dtype=torch.float32)


@cache
def _residual_on(device: torch.device) -> Tensor:
    return e8_residual_grid().to(device)


def e8_residual_nearest(r: Tensor) -> Tensor:
    """Index (int64 [...]) of the nearest ``e8_residual_grid`` point to each row of r [..., 8] (brute force)."""
    g = _residual_on(r.device)
    flat = r.reshape(-1, E8P_DIM).to(torch.float32)
    return (flat @ g.t() - g.pow(2).sum(-1) / 2).argmax(-1).reshape(r.shape[:-1])


@cache
def _codebook_on(device: torch.device) -> Tensor:
    return e8p_codebook().to(device)


_TOPK = 8  # wrong-parity candidates whose sign-flip penalty is computed exactly (others fall back, rarely)


def _candidates(y: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Penalised distances ‖y − s⊙a‖² (best valid signs) of y [N, 8] to the rows ``idx`` [N, k] of ``A`` (all
    256 rows when None): (dist [N, k], negative-sign masks bool [N, k, 8] that reach them, the rows of ``A``)."""
    A = e8p_abs_grid().to(y.device)
    rows = A[None].expand(y.shape[0], -1, -1) if idx is None else A[idx]  # [N, k, 8]
    ay, neg = y.abs(), y < 0
    prod = ay[:, None, :] * rows  # a_i |y_i|
    pen, arg = prod.min(-1)
    par = _abs_parity().to(y.device)
    wrong = (neg.sum(-1, keepdim=True) % 2) != (par[None] if idx is None else par[idx])
    dist = y.pow(2).sum(-1, keepdim=True) + rows.pow(2).sum(-1) - 2 * (prod.sum(-1) - 2 * pen * wrong)
    flip = wrong[..., None] & (torch.arange(E8P_DIM, device=y.device) == arg[..., None])
    return dist, neg[:, None, :] ^ flip, torch.arange(rows.shape[1], device=y.device) if idx is None else idx


def _nearest_one_shift(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest s⊙a to each row of y: (distance [N], abs row [N], negative-sign mask [N, 8]).

    For every a the best signs are sign(y) and, if their parity is wrong, the cheapest flip costs 4·min a_i|y_i|.
    Unpenalised distances come from one matmul; only the _TOPK closest wrong-parity rows get their penalty
    computed, which is exact unless a wrong-parity row beyond them could still win (then that vector is redone
    over all 256 rows)."""
    A = e8p_abs_grid().to(y.device)
    par = _abs_parity().to(y.device)
    ay = y.abs()
    d0 = y.pow(2).sum(-1, keepdim=True) + A.pow(2).sum(-1)[None] - 2 * (ay @ A.t())  # [N, 256]
    wrong = ((y < 0).sum(-1, keepdim=True) % 2) != par[None]
    inf = torch.tensor(float("inf"), device=y.device)
    d_valid, j_valid = torch.where(wrong, inf, d0).min(-1)
    d_wrong0, j_wrong = torch.where(wrong, d0, inf).topk(_TOPK, dim=-1, largest=False)
    d_pen, neg_pen, rows = _candidates(y, j_wrong)
    k = d_pen.argmin(-1, keepdim=True)
    d_w = d_pen.gather(1, k).squeeze(1)
    use_w = d_w < d_valid
    dist = torch.where(use_w, d_w, d_valid)
    row = torch.where(use_w, rows.gather(1, k).squeeze(1), j_valid)
    neg = torch.where(use_w[:, None], neg_pen[torch.arange(y.shape[0], device=y.device), k.squeeze(1)], y < 0)
    redo = (d_wrong0[:, -1] < dist).nonzero().squeeze(1)  # an unchecked wrong-parity row might be closer
    if redo.numel():
        d_all, neg_all, _ = _candidates(y[redo], None)
        d_r, j_r = d_all.min(-1)
        dist[redo], row[redo] = d_r, j_r
        neg[redo] = neg_all[torch.arange(redo.numel(), device=y.device), j_r]
    return dist, row, neg


def _nearest_chunk(x: Tensor) -> Tensor:
    best_d = torch.full(x.shape[:1], float("inf"), device=x.device)
    best = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    bit = 1 << torch.arange(7, device=x.device)
    for shift_bit, t in ((0, _SHIFT), (1, -_SHIFT)):
        d, row, neg = _nearest_one_shift(x - t)
        code = (row << 8) | (shift_bit << 7) | (neg[:, :7].long() * bit).sum(-1)
        better = d < best_d
        best_d = torch.where(better, d, best_d)
        best = torch.where(better, code, best)
    return best


def e8p_nearest(x: Tensor) -> Tensor:
    """Index (int64 [...]) of the codeword nearest to each row of x [..., 8] (float; exact search, ties to
    the lower shift-bit/abs index)."""
    if x.shape[-1] != E8P_DIM:
        raise ValueError(f"E8P quantizes vectors of {E8P_DIM}, got last dim {x.shape[-1]}")
    flat = x.reshape(-1, E8P_DIM).to(torch.float32)
    out = [_nearest_chunk(flat[i : i + _CHUNK]) for i in range(0, flat.shape[0], _CHUNK)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).reshape(x.shape[:-1])


@dataclass(frozen=True, eq=False)
class E8PWeight:
    """One linear weight [out, in] on the E8P codebook: Ŵ[r, 8c:8c+8] = scales[r] · codeword(codes[r, c])
    (+ residual(codes2[r, c]) / ρ for 3-bit codes).

    codes int16 [out, in / 8] (16-bit indices, see the module docstring); codes2 uint8 [out, in / 8] or None;
    scales float32 [out], fp16-exact. ``transforms``: the incoherence transforms (``quant.incoherence``) when the
    codes hold Ŵ̃ = U W Vᵀ.
    """

    codes: Tensor
    scales: Tensor
    stats: dict[str, float] = field(default_factory=dict)
    transforms: dict[str, Tensor] | None = None
    codes2: Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.int16:
            raise ValueError(f"E8P codes must be 2-D int16, got {self.codes.dtype} {tuple(self.codes.shape)}")
        if tuple(self.scales.shape) != (self.codes.shape[0],) or self.scales.dtype != torch.float32:
            raise ValueError(f"E8P scales must be float32 [{self.codes.shape[0]}], got {tuple(self.scales.shape)}")
        c2 = self.codes2
        if c2 is not None and (c2.dtype != torch.uint8 or c2.shape != self.codes.shape):
            want = tuple(self.codes.shape)
            raise ValueError(f"E8P residual codes must be uint8 {want}, got {c2.dtype} {tuple(c2.shape)}")

    @property
    def bits(self) -> int:
        return E8P_BITS + (1 if self.codes2 is not None else 0)

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1]) * E8P_DIM

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ (in the basis the codes were taken in), computed in float32, then cast. One gather from the 2 MiB
        table of all codewords (``e8p_codebook``, equal to ``e8p_decode`` by construction)."""
        table = _codebook_on(self.codes.device)
        W = table[self.codes.long() & 0xFFFF]
        if self.codes2 is not None:
            W = W + _residual_on(self.codes.device)[self.codes2.long()] / RESID_SCALE
        W = W.reshape(self.out_features, self.in_features)
        return (W * self.scales[:, None].to(torch.float32)).to(dtype)


def check_e8p_width(n: int, name: str) -> None:
    if n % E8P_DIM:
        raise ValueError(
            f"{name!r}: E8P quantizes groups of {E8P_DIM} input columns, but in_features={n} is not a multiple "
            f"of {E8P_DIM}; use a scalar method (hadamard-gptq) for this model"
        )


def row_scales(W: Tensor, scale: float) -> Tensor:
    """fp16-exact float32 [m]: RMS(W_r) / scale (rows of zeros get 1)."""
    rms = W.to(torch.float32).pow(2).mean(1).sqrt()
    s = (rms / scale).to(torch.float16).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


@exact
def quantize_e8p_ldlq(
    W: Tensor, H: Tensor, cfg: E8PConfig, *, name: str = "layer", sweep_dtype: torch.dtype = SWEEP_DTYPE
) -> E8PWeight:
    """Block-LDLQ-quantize W [out, in] to E8P against the proxy Hessian H [in, in] (undamped).

    stats: proxy_loss (Σ_b ‖E_b‖², damped H), proxy_loss_exact (undamped H), damp (λ used), n_dead.
    """
    validate_inputs(W, H, name)
    m, n = W.shape
    check_e8p_width(n, name)
    dead = dead_inputs(H)
    W_in = W
    W = W.to(sweep_dtype, copy=True)
    W[:, dead] = 0
    scales = row_scales(W, cfg.scale).to(W.device)
    inv_s = (1 / scales)[:, None].to(sweep_dtype)
    s_col = scales[:, None].to(sweep_dtype)
    factor = sweep_factor(H, None, cfg.damp, cfg.damp_max, name, sweep_dtype)
    codes = torch.zeros(m, n // E8P_DIM, dtype=torch.long, device=W.device)
    codes2 = torch.zeros_like(codes) if cfg.bits == 3 else None
    losses = torch.zeros(m, dtype=sweep_dtype, device=W.device)
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Ub = factor.band(i1, i2)  # U[i1:i2, i1:]
        for j in range(0, i2 - i1, E8P_DIM):
            j2 = j + E8P_DIM
            x = W1[:, j:j2]
            c = e8p_nearest(x * inv_s)
            v = _codebook_on(c.device)[c].to(sweep_dtype)
            codes[:, (i1 + j) // E8P_DIM] = c
            if codes2 is not None:  # 3 bits: round the residual to the E8 residual codebook too
                c2 = e8_residual_nearest((x * inv_s - v) * RESID_SCALE)
                v = v + _residual_on(c.device)[c2].to(sweep_dtype) / RESID_SCALE
                codes2[:, (i1 + j) // E8P_DIM] = c2
            q = v * s_col
            Ubb = Ub[j:j2, j:j2]
            E = torch.linalg.solve_triangular(Ubb, x - q, upper=True, left=False)  # E U_bb = X − Q
            losses += E.pow(2).sum(1)
            W1[:, j2:] -= E @ Ub[j:j2, j2 : i2 - i1]
            Err1[:, j:j2] = E
        W[:, i2:] -= Err1 @ Ub[:, i2 - i1 :]
    lam = factor.lam
    del factor, W  # the float64 factor and the swept copy are done before the exact proxy loss
    q_w = E8PWeight(
        torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16).cpu(),  # uint16 bits as int16
        scales.cpu(),
        codes2=None if codes2 is None else codes2.to(torch.uint8).cpu(),
    )
    stats = {
        "proxy_loss": float(losses.to(HESSIAN_DTYPE).sum()),
        "proxy_loss_exact": proxy_loss(W_in, q_w.dequantize(torch.float32), H),  # per panel
        "damp": float(lam),
        "n_dead": float(dead.sum()),
    }
    return replace(q_w, stats=stats)
