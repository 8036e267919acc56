"""GPTQT: quantize twice, linear then binary coding (Guo et al. 2024, arXiv 2407.02891, §3) — ALGORITHMS.md §7.

Step 1 — linear n-bit quantization (RTN or GPTQ): q ∈ {0, …, 2^n − 1}, ŵ¹ = s·(q − z) per (row, group).

Step 2 — k-bit binary coding (BCQ) of the 2^n integer levels ℓ: q̂_ℓ = Σ_{i=1..k} α_i b_i(ℓ) + β, b_i ∈ {−1, +1},
so ŵ² = s·(q̂_q − z). α, β and the level→code map A are shared by the whole layer (``share="layer"``, as in
the paper) or fitted per grid (``share="grid"``). They minimise, exactly,

    Σ_ℓ h_ℓ (ℓ − x_{A(ℓ)}ᵀ θ)²,   x_c = (b_1(c), …, b_k(c), 1),  θ = (α, β),
    h_ℓ = Σ_{(r,j): q_rj = ℓ} d_j s_{r,g(j)}²   (d = diag H, or 1 without H),

i.e. the d-weighted distance Σ d_j (ŵ¹ − ŵ²)² between the two steps (``fit_binary_coding``).

Exact search. For a fixed map A the optimum is weighted least squares: cost(A) = Σ h ℓ² − rᵀ M⁺ r with
M = Σ_ℓ h_ℓ x_{A(ℓ)} x_{A(ℓ)}ᵀ, r = Σ_ℓ h_ℓ ℓ x_{A(ℓ)}. Flipping b_i ↔ −b_i (α_i → −α_i) and permuting i
leave the cost unchanged, so some optimum has α_1 ≥ … ≥ α_k ≥ 0; its codes are nearest-point assigned,
hence A is monotone in ℓ with respect to the sorted points β + Σ α_i b_i. With α sorted and non-negative the
point order is fixed for k ≤ 2 (lexicographic in (b_1, …, b_k)); for k = 3 it is lexicographic except that
(−,+,+) and (+,−,−) swap when α_1 < α_2 + α_3 — 2 orders. So searching every non-decreasing map from the
2^n levels to the 2^k ranks of each admissible order (codes may be left unused) is exact. Candidates:
≤ |orders| · C(2^n + 2^k − 1, 2^k − 1) — n=4, k=3: 361,437 distinct maps; n=4, k=2: 969; n=3, k=2: 165.
Branch and bound keeps it cheap: empty levels are dropped (they do not change the cost), maps are grouped by
their level partition (16,384 for 16 levels, ≤ 85 maps each), a partition's within-cluster variance (free
points) bounds its maps' costs from below, and only partitions whose bound beats the best fit are solved.
Measured on 2 CPU cores, n=4: k=3 ≈ 0.3 s per histogram for a layer-shared coding (≈ 5 s for a 576×576
layer with 17 multipliers), ≈ 12 ms per histogram batched (share="grid"), k=2 ≈ 1 ms; one-off table
build ≈ 2 s. Supported: 1 ≤ k ≤ 3, k < n ≤ 4.

Re-exploration: for each multiplier c the step-1 grid becomes s_c = c·s with the zero re-centred on the same
mid-range, z_c = clamp(round(m/2 − (m/2 − z)/c), 0, m), m = 2^n − 1 (symmetric grids keep z); W is re-rounded
to it, step 2 is refitted, and the c minimising the two-step error Σ d_j (w − ŵ²)² is kept (per layer or per
grid). With base "gptq" the final step 1 is a GPTQ sweep on the chosen fixed grids.

Inference (merged, pure binary coding): ŵ = Σ_i α'_i b_i + β' with α'_i = s·α_i, β' = s·(β − z) per (row,
group) and bit-planes B_i (bit 1 ⇔ b_i = +1) — a LUT-GEMM kernel computes Σ_i α'_i ⊙ (B_i x).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import field_validator, model_validator
from torch import Tensor

from quant.gptq import SWEEP_DTYPE, validate_inputs
from quant.grid import fit_group_grids, quantize_codes
from quant.hessian import HESSIAN_DTYPE, proxy_loss
from quant.icquant import GPTQSweepFields, gptq_sweep, pack_bits, unpack_bits
from quant.precision import exact
from quant.types import GridConfig, QuantizedWeight

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "BinaryCodedWeight",
    "BinaryCoding",
    "GPTQTConfig",
    "GPTQTResult",
    "candidate_maps",
    "fit_binary_coding",
    "merge_binary_coding",
    "quantize_gptqt",
]

BCQ_DTYPE = torch.float64
DEFAULT_MULTIPLIERS: tuple[float, ...] = tuple(round(0.8 + 0.025 * i, 3) for i in range(17))  # 0.8 … 1.2
_CHUNK = 1 << 23  # (histogram, partition, level) gathers held at once
_EIG_RTOL = 1e-10


class GPTQTConfig(GPTQSweepFields):
    """GPTQT settings: ``grid`` is the step-1 linear grid (n = grid.bits), ``bits`` the binary-coding k.

    Sample YAML::

        grid: {bits: 4, group_size: 128, sym: false}
        bits: 3
        base: gptq
        share: layer
        multipliers: [0.8, 0.9, 1.0, 1.1, 1.2]
        damp: 0.01
        damp_max: 1.0
        block_size: 128
        act_order: true
        version: 1
    """

    grid: GridConfig
    bits: int
    base: Literal["rtn", "gptq"] = "gptq"
    share: Literal["layer", "grid"] = "layer"
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS

    @field_validator("multipliers")
    @classmethod
    def _multipliers(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or not all(c > 0 and math.isfinite(c) for c in v):
            raise ValueError(f"multipliers must be a non-empty list of finite values > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> GPTQTConfig:
        n, k = self.grid.bits, self.bits
        if not (1 <= k <= 3 and k < n <= 4):
            raise ValueError(f"exact binary coding needs 1 <= bits (k) <= 3 and k < grid.bits (n) <= 4, got {k=}, {n=}")
        return self


# ---------------------------------------------------------------- exact binary coding of integer levels


def _sign_matrix(k: int) -> Tensor:
    """X [2^k, k+1]: row c = (b_1(c), …, b_k(c), 1), b_i = +1 iff bit i−1 of c is set."""
    c = torch.arange(1 << k)
    b = ((c[:, None] >> torch.arange(k)) & 1).to(BCQ_DTYPE) * 2 - 1
    return torch.cat([b, torch.ones(1 << k, 1, dtype=BCQ_DTYPE)], dim=1)


def _orders(k: int) -> list[list[int]]:
    """Code indices sorted by value β + Σ α_i b_i for every order admissible under α_1 ≥ … ≥ α_k ≥ 0."""
    lex = sorted(range(1 << k), key=lambda c: [(c >> i) & 1 for i in range(k)])  # b_1 most significant
    if k < 3:
        return [lex]
    swapped = [*lex[:3], lex[4], lex[3], *lex[5:]]  # α_1 < α_2 + α_3: (+,−,−) below (−,+,+)
    return [lex, swapped]


@functools.lru_cache(maxsize=32)
def candidate_maps(n_levels: int, k: int) -> Tensor:
    """int64 [C, n_levels]: every distinct map from sorted levels to codes that is non-decreasing in some
    admissible point order (C = 361,437 for 16 levels and k = 3)."""
    if not (1 <= k <= 3 and 1 <= n_levels <= 16):
        raise ValueError(f"exact binary coding supports 1 <= k <= 3 and up to 16 levels, got {n_levels=}, {k=}")
    ranks = torch.tensor(list(itertools.combinations_with_replacement(range(1 << k), n_levels)), dtype=torch.int64)
    maps = torch.cat([torch.tensor(order)[ranks] for order in _orders(k)])
    return torch.unique(maps, dim=0)


@functools.lru_cache(maxsize=32)
def _partitions(L: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Maps are monotone, so each map's clusters are level intervals and the maps group by level partition.

    Returns (part_maps [Q, M]: the maps of each partition, padded by repeating its first map;
    part_intervals [Q, L]: ids into the L(L+1)/2 level intervals, padded with that count;
    bounds [L(L+1)/2, 2]: interval (lo, hi + 1)).
    """
    maps = candidate_maps(L, k)
    if L == 1:
        cuts = torch.zeros(maps.shape[0], dtype=torch.int64)
    else:
        cuts = (maps[:, 1:] != maps[:, :-1]).to(torch.int64) @ (1 << torch.arange(L - 1))
    masks, part_of_map = torch.unique(cuts, return_inverse=True)
    bounds = [(lo, hi) for lo in range(L) for hi in range(lo + 1, L + 1)]
    interval_id = {b: i for i, b in enumerate(bounds)}
    rows = []
    for mask in masks.tolist():
        edges = [0] + [j + 1 for j in range(L - 1) if mask >> j & 1] + [L]
        ids = [interval_id[(a, b)] for a, b in itertools.pairwise(edges)]
        rows.append(ids + [len(bounds)] * (L - len(ids)))
    order = torch.argsort(part_of_map, stable=True)
    counts = torch.bincount(part_of_map, minlength=len(rows))
    starts = torch.cumsum(counts, 0) - counts
    j = torch.arange(int(counts.max()))
    part_maps = order[starts[:, None] + torch.where(j[None, :] < counts[:, None], j[None, :], 0)]
    return part_maps, torch.tensor(rows, dtype=torch.int64), torch.tensor(bounds, dtype=torch.int64)


@dataclass(frozen=True, eq=False)
class BinaryCoding:
    """Binary coding of the integer levels 0..2^n − 1, one per histogram p (P = 1 for a shared layer coding).

    Attributes:
        alpha: float64 [P, k]; beta: float64 [P].
        assign: int64 [P, 2^n], level ℓ → code c (b_i = +1 iff bit i−1 of c is set).
        cost: float64 [P], Σ_ℓ h_ℓ (ℓ − q̂_ℓ)² at the optimum.
    """

    alpha: Tensor
    beta: Tensor
    assign: Tensor
    cost: Tensor

    @property
    def k(self) -> int:
        return int(self.alpha.shape[1])

    def levels(self) -> Tensor:
        """q̂ float64 [P, 2^n]: q̂_ℓ = Σ_i α_i b_i(A(ℓ)) + β."""
        X = _sign_matrix(self.k).to(self.alpha.device)
        theta = torch.cat([self.alpha, self.beta[:, None]], dim=1)
        return (X[self.assign] * theta[:, None, :]).sum(-1)


def _centred(h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(y = v − μ [P, L], μ [P, 1]) with μ the h-weighted mean level; centring is exact (θ has an intercept)
    and avoids cancellation in Σ h y² − rᵀ M⁺ r."""
    mu = (h * v).sum(1, keepdim=True) / h.sum(1, keepdim=True).clamp_min(torch.finfo(BCQ_DTYPE).tiny)
    return v - mu, mu


def _cluster_sums(h: Tensor, y: Tensor, maps: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Per candidate and code c: mass Σ_{A(ℓ)=c} h_ℓ and first moment Σ_{A(ℓ)=c} h_ℓ y_ℓ, each [P, C, K]."""
    P, C, L = maps.shape
    mass = torch.zeros(P, C, K, dtype=BCQ_DTYPE, device=h.device)
    mass.scatter_add_(2, maps, h[:, None, :].expand(P, C, L))
    first = torch.zeros_like(mass).scatter_add_(2, maps, (h * y)[:, None, :].expand(P, C, L))
    return mass, first


def _lower_bound(h: Tensor, y: Tensor, part_intervals: Tensor, bounds: Tensor) -> Tensor:
    """[P, Q]: within-cluster variance Σ h y² − Σ_clusters (Σ h y)² / Σ h of every level partition — the cost
    with free points, hence ≤ the binary-coding cost of each of its maps. O(L² + Q·L) per histogram."""
    zero = torch.zeros(h.shape[0], 1, dtype=BCQ_DTYPE, device=h.device)
    cs_h, cs_s = torch.cat([zero, h.cumsum(1)], 1), torch.cat([zero, (h * y).cumsum(1)], 1)
    mass = cs_h[:, bounds[:, 1]] - cs_h[:, bounds[:, 0]]
    first = cs_s[:, bounds[:, 1]] - cs_s[:, bounds[:, 0]]
    fit = torch.where(mass > 0, first * first / mass.clamp_min(torch.finfo(BCQ_DTYPE).tiny), 0.0)
    fit = torch.cat([fit, zero], 1)  # the padding interval contributes 0
    return (h * y * y).sum(1, keepdim=True) - fit[:, part_intervals].sum(-1)


def _wls(h: Tensor, y: Tensor, maps: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """cost [P, C] and θ [P, C, k+1] (fit of the centred levels y) for per-row candidate maps [P, C, L]."""
    P, C, _ = maps.shape
    d = X.shape[1]
    mass, first = _cluster_sums(h, y, maps, X.shape[0])
    M = (mass @ (X[:, :, None] * X[:, None, :]).reshape(-1, d * d)).reshape(P, C, d, d)
    r = first @ X
    lam, V = torch.linalg.eigh(M)
    keep = lam > _EIG_RTOL * lam[..., -1:].clamp_min(torch.finfo(BCQ_DTYPE).tiny)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    Vr = (V.transpose(-1, -2) @ r[..., None])[..., 0]
    theta = (V @ (inv * Vr)[..., None])[..., 0]
    return (h * y * y).sum(1, keepdim=True) - (inv * Vr * Vr).sum(-1), theta


def _fit_levels(h: Tensor, v: Tensor, k: int) -> Tensor:
    """Exact BCQ of L sorted level values v [P, L] with masses h [P, L] > 0: θ = (α, β) [P, k+1]."""
    P, L = h.shape
    maps = candidate_maps(L, k).to(h.device)
    part_maps, part_intervals, bounds = (t.to(h.device) for t in _partitions(L, k))
    X = _sign_matrix(k).to(h.device)
    Q = part_maps.shape[0]
    theta = torch.zeros(P, k + 1, dtype=BCQ_DTYPE, device=h.device)
    step = max(1, _CHUNK // (Q * L))
    for p0 in range(0, P, step):
        hp, vp = h[p0 : p0 + step], v[p0 : p0 + step]
        y, mu = _centred(hp, vp)
        lb = _lower_bound(hp, y, part_intervals, bounds)
        tol = 1e-9 * (hp * y * y).sum(1) + 1e-300
        best_theta = theta[p0 : p0 + step]  # a view, filled in place
        todo, T = torch.arange(hp.shape[0], device=h.device), 8
        while todo.numel():  # fit the maps of the T partitions with the smallest bounds; a row is done
            lb_T, idx = torch.topk(lb[todo], min(T, Q), dim=1, largest=False, sorted=True)  # once its T-th
            cand = maps[part_maps[idx].reshape(todo.numel(), -1)]  # [rows, T·M, L]      # bound reaches its
            c_cost, c_theta = _wls(hp[todo], y[todo], cand, X)  # best cost: unseen maps cost ≥ their bound
            val, arg = c_cost.min(dim=1)
            sel = torch.arange(todo.numel(), device=h.device)
            best_theta[todo] = c_theta[sel, arg]
            todo = todo[(lb_T[:, -1] < val - tol[todo]) & (T < Q)]
            T *= 4
        best_theta[:, k] += mu[:, 0]
    return theta


def fit_binary_coding(hist: Tensor, k: int) -> BinaryCoding:
    """Exact min over α, β, A of Σ_ℓ h_ℓ (ℓ − Σ_i α_i b_i(A(ℓ)) − β)² for each histogram row h [P, 2^n] ≥ 0.

    Levels with h_ℓ = 0 do not change the cost: the search runs over the occupied levels only (grouped by
    their count) and empty levels are then mapped to their nearest point. Branch and bound over
    ``candidate_maps`` grouped by level partition: a partition's within-cluster variance (free points)
    bounds the cost of each of its maps from below; the maps of the partitions with the smallest bounds are
    fitted until the next bound reaches the best cost (minus 1e-9·Σ h y²) — typically 8–32 of the 16,384
    partitions (≤ 85 maps each) for 16 levels and k = 3 — so the result equals the full search to that tolerance.
    """
    if hist.dim() != 2 or hist.shape[1] & (hist.shape[1] - 1) or hist.shape[1] < 2:
        raise ValueError(f"hist must be [P, 2^n], got {tuple(hist.shape)}")
    if not bool(torch.isfinite(hist).all()) or bool((hist < 0).any()):
        raise ValueError("level histogram must be finite and non-negative")
    P, L = hist.shape
    if not (1 <= k <= 3 and k < L.bit_length() - 1 <= 4):
        raise ValueError(f"exact binary coding supports 1 <= k <= 3 and k < n <= 4, got n={L.bit_length() - 1}, {k=}")
    h = hist.to(BCQ_DTYPE)
    X = _sign_matrix(k).to(h.device)
    theta = torch.zeros(P, k + 1, dtype=BCQ_DTYPE, device=h.device)
    occupied = h > 0
    count = occupied.sum(1)
    for Lp in count.unique().tolist():
        if Lp == 0:
            continue  # an empty histogram: any coding is optimal, keep θ = 0
        rows = (count == Lp).nonzero()[:, 0]
        lv = occupied[rows].nonzero()[:, 1].reshape(-1, Lp)  # occupied levels, ascending
        theta[rows] = _fit_levels(h[rows].gather(1, lv), lv.to(BCQ_DTYPE), k)
    points = theta @ X.T  # [P, 2^k]
    levels = torch.arange(L, dtype=BCQ_DTYPE, device=h.device)
    assign = (levels[None, :, None] - points[:, None, :]).abs().argmin(-1)  # nearest point; optimal for the
    qhat = points.gather(1, assign)  # occupied levels too, since the fitted map's cost is the minimum
    cost = (h * (levels - qhat) ** 2).sum(1)
    return BinaryCoding(theta[:, :k], theta[:, k], assign, cost)


# ---------------------------------------------------------------- merged representation


@dataclass(frozen=True, eq=False)
class BinaryCodedWeight:
    """Pure binary-coded weight [out, in]: ŵ_rj = Σ_i α'_{r,g(j),i} (2·B_i[r, j] − 1) + β'_{r,g(j)}.

    Attributes:
        planes: uint8 [k, out, ⌈in/8⌉], bit-plane B_i packed LSB-first along the input dim (bit 1 ⇔ b = +1).
        alpha: float32 [out, G, k] (α' = s·α); beta: float32 [out, G] (β' = s·(β − z)).
        in_features, group_size: input width and effective group size (g(j) = j // group_size).
    """

    planes: Tensor
    alpha: Tensor
    beta: Tensor
    in_features: int
    group_size: int

    def bit_planes(self) -> Tensor:
        """bool [k, out, in] (True ⇔ b = +1)."""
        k, m, nb = self.planes.shape
        bits = unpack_bits(self.planes.reshape(-1), 1, k * m * nb * 8).reshape(k, m, nb * 8)
        return bits[:, :, : self.in_features].bool()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        g = torch.arange(self.in_features, device=self.planes.device) // self.group_size
        b = self.bit_planes().to(torch.float32) * 2 - 1
        W_hat = (self.alpha[:, g, :].permute(2, 0, 1) * b).sum(0) + self.beta[:, g]
        return W_hat.to(dtype)

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """k + (k + 1)·scale_bits / group_size (bit-planes plus α', β' per group)."""
        k = self.planes.shape[0]
        return k + (k + 1) * scale_bits * self.alpha.shape[1] / self.in_features


def merge_binary_coding(q: QuantizedWeight, coding: BinaryCoding) -> BinaryCodedWeight:
    """Fold the step-1 grid into the coding: B_i = b_i(A(q)), α'_i = s·α_i, β' = s·(β − z) per (row, group)."""
    m, n = q.codes.shape
    G = q.n_groups
    if q.g_idx is not None:
        raise ValueError("merging needs contiguous groups (g_idx None)")
    grid_of = _grid_ids(m, G, coding.alpha.shape[0] == m * G, q.codes.device)
    g = q.group_index()
    codes = coding.assign[grid_of[:, g], q.codes.long()]  # [m, n] code per weight
    s, z = q.scales.to(BCQ_DTYPE), q.zeros.to(BCQ_DTYPE)
    alpha = (s[:, :, None] * coding.alpha[grid_of]).to(torch.float32)
    beta = (s * (coding.beta[grid_of] - z)).to(torch.float32)
    k = coding.k
    nb = math.ceil(n / 8)
    bits = (codes[None] >> torch.arange(k, device=codes.device)[:, None, None]) & 1  # [k, m, n]
    bits = torch.nn.functional.pad(bits, (0, nb * 8 - n))
    planes = pack_bits(bits.reshape(-1), 1).reshape(k, m, nb)
    return BinaryCodedWeight(planes, alpha, beta, n, q.group_size)


# ---------------------------------------------------------------- driver


@dataclass(frozen=True, eq=False)
class GPTQTResult:
    """weight: merged binary-coded weight (what inference stores); step1: the n-bit linear quantization at the
    chosen scale; coding: integer-domain BCQ (P = 1 for share="layer", else out·G); multiplier: float32 [P];
    stats: two_step_error, proxy_loss_exact (two-step, if H), step1_proxy_loss_exact, multiplier_mean, bpw."""

    weight: BinaryCodedWeight
    step1: QuantizedWeight
    coding: BinaryCoding
    multiplier: Tensor
    stats: dict[str, float] = field(default_factory=dict)

    def two_step(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ŵ² = s·(q̂_q − z) computed in float64 from step 1 and the coding (the reference for ``weight``)."""
        return _two_step(self.step1, self.coding).to(dtype)


def _grid_ids(m: int, G: int, per_grid: bool, device: torch.device) -> Tensor:
    if per_grid:
        return torch.arange(m * G, device=device).reshape(m, G)
    return torch.zeros(m, G, dtype=torch.long, device=device)


def _two_step(q: QuantizedWeight, coding: BinaryCoding) -> Tensor:
    m, G = q.scales.shape
    ids = _grid_ids(m, G, coding.alpha.shape[0] == m * G, q.codes.device)
    g = q.group_index()
    lut = coding.levels()
    qhat = lut[ids[:, g], q.codes.long()]
    return q.scales.to(BCQ_DTYPE)[:, g] * (qhat - q.zeros.to(BCQ_DTYPE)[:, g])


def _level_hist(q: Tensor, weight: Tensor, ids: Tensor, P: int, L: int) -> Tensor:
    """h [P, L]: Σ weight over elements of each (histogram id, level)."""
    flat = (ids * L + q.long()).reshape(-1)
    return torch.zeros(P * L, dtype=BCQ_DTYPE, device=q.device).index_add_(0, flat, weight.reshape(-1)).reshape(P, L)


def _step2(q: Tensor, s_el: Tensor, d: Tensor, ids_el: Tensor, P: int, L: int, k: int) -> BinaryCoding:
    return fit_binary_coding(_level_hist(q, d[None, :] * s_el**2, ids_el, P, L), k)


@exact
def quantize_gptqt(
    W: Tensor, H: Tensor | None, cfg: GPTQTConfig, *, name: str = "layer", sweep_dtype: torch.dtype = SWEEP_DTYPE
) -> GPTQTResult:
    """GPTQT-quantize W [out, in]: re-explored n-bit linear step, exact k-bit binary coding, merged weight.

    ``H`` [in, in] (undamped) is required for base "gptq"; when given, diag(H) weights the step-2 histogram and
    the re-exploration error, and ``proxy_loss_exact`` = tr((Ŵ − W) H (Ŵ − W)ᵀ) of the two-step weights.
    """
    if W.dim() != 2:
        raise ValueError(f"W for {name!r} must be 2-D [out, in], got {tuple(W.shape)}")
    if H is None and cfg.base == "gptq":
        raise ValueError(f"GPTQT with base 'gptq' needs the Hessian of {name!r}")
    grid, k = cfg.grid, cfg.bits
    n_bits, maxq, L = grid.bits, grid.maxq, 1 << grid.bits
    m, n = W.shape
    W32 = W.to(torch.float32, copy=True)
    d = torch.ones(n, dtype=BCQ_DTYPE, device=W.device)
    if H is not None:
        validate_inputs(W, H, name)
        d = torch.diagonal(H).to(BCQ_DTYPE).clone()
        W32[:, d == 0] = 0
    gs, G = grid.effective_group_size(n), grid.n_groups(n)
    g = torch.arange(n, device=W.device) // gs
    per_grid = cfg.share == "grid"
    P = m * G if per_grid else 1
    ids = _grid_ids(m, G, per_grid, W.device)
    ids_el = ids[:, g]
    s0, z0 = fit_group_grids(W32, grid)

    def grid_at(c: float) -> tuple[Tensor, Tensor]:
        z = z0 if grid.sym else torch.round(maxq / 2 - (maxq / 2 - z0) / c).clamp_(0, maxq)
        return s0 * c, z

    best_err = torch.full((P,), torch.inf, dtype=BCQ_DTYPE, device=W.device)
    best_c = torch.ones(P, dtype=torch.float32, device=W.device)
    for c in cfg.multipliers:
        s, z = grid_at(c)
        q = quantize_codes(W32, s[:, g], z[:, g], n_bits)
        qw = QuantizedWeight(q.to(torch.uint8), s, z, n_bits, gs)
        coding = _step2(q, s[:, g].to(BCQ_DTYPE), d, ids_el, P, L, k)
        sq = (W32.to(BCQ_DTYPE) - _two_step(qw, coding)) ** 2 * d[None, :]
        err = torch.zeros(P, dtype=BCQ_DTYPE, device=W.device).index_add_(0, ids_el.reshape(-1), sq.reshape(-1))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, torch.tensor(c, dtype=torch.float32), best_c)

    c_grid = best_c.reshape(m, G) if per_grid else best_c.expand(m, G)
    s = s0 * c_grid
    z = z0 if grid.sym else torch.round(maxq / 2 - (maxq / 2 - z0) / c_grid).clamp_(0, maxq)
    stats: dict[str, float] = {}
    if cfg.base == "gptq":
        assert H is not None
        sw = gptq_sweep(
            W, H, s[:, g], z[:, g], n_bits, damp=cfg.damp, damp_max=cfg.damp_max, block_size=cfg.block_size,
            act_order=cfg.act_order, name=name, sweep_dtype=sweep_dtype,
        )  # fmt: skip
        codes = sw.codes
        stats.update(damp=sw.damp, n_dead=float(sw.n_dead))
    else:
        codes = quantize_codes(W32, s[:, g], z[:, g], n_bits).to(torch.uint8)
    step1 = QuantizedWeight(codes, s.contiguous(), z.contiguous(), n_bits, gs)
    coding = _step2(codes, s[:, g].to(BCQ_DTYPE), d, ids_el, P, L, k)
    merged = merge_binary_coding(step1, coding)
    W2 = _two_step(step1, coding)
    stats["two_step_error"] = float((((W32.to(BCQ_DTYPE) - W2) ** 2) * d[None, :]).sum())
    if H is not None:
        stats["proxy_loss_exact"] = proxy_loss(W, W2, H)
        stats["step1_proxy_loss_exact"] = proxy_loss(W, step1.dequantize(HESSIAN_DTYPE), H)
    stats["multiplier_mean"] = float(best_c.mean())
    stats["bpw"] = merged.bits_per_weight()
    return GPTQTResult(merged, step1, coding, best_c, stats)
