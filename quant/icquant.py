"""ICQuant: index-coded outliers (Li et al. 2025, arXiv 2505.00850, §3–4) — ALGORITHMS.md §6.

Per output row r the top γ·n weights by |w| are outliers (mask O). Outliers and inliers are quantized as two
sets, each with its own affine grid at the same b bits (per row, or per (row, group)):

    ŵ_rj = s^o_{r,g(j)} · (q_rj − z^o_{r,g(j)})  if O_rj   else   s^i_{r,g(j)} · (q_rj − z^i_{r,g(j)})

so the inlier grid spans only the bulk of the row (≈ one extra bit of resolution). Both grids follow
ALGORITHMS.md §1 (range contains 0, zero ∈ [0, 2^b − 1]); a set with no members gets scale 1.

Outlier positions are stored by index coding (§3 of the paper), tile by tile. A tile is R = ``group_rows``
rows × L = ``segment`` columns (L = cols when ``segment`` is 0; the last row group / column segment ragged),
read row-major as one sequence of rows_tile·width positions; tiles are ordered row-major over (row group,
column segment). Inside a tile the sorted positions p_1 < p_2 < ... give gaps d_t = p_t − p_{t−1} − 1
(p_0 = −1); gaps run across the tile's row boundaries, so rows need no terminator and no offset of their own.
Each gap is a fixed B-bit code d mod 2^B plus ⌊d / 2^B⌋ escapes, each advancing the cursor 2^B columns;
an escape costs one bit: the escape stream holds, per outlier, ⌊d / 2^B⌋ one-bits then a zero (stop) bit.

    data    = [remainder stream: n B-bit codes, LSB-first][escape stream: U bits, LSB-first]  (uint8, each
              byte-padded)
    offsets = int32 [2, tiles + 1]: outliers before each tile, escape bits before each tile

Parallel decode (one GPU block per tile, no serial parse): remainder t sits at bit t·B; the escape count of
outlier t is z_t − z_{t−1} − 1 with z_t the t-th zero of the escape stream (a select: per-word popcounts and a
prefix sum); positions are the tile's prefix sum of d + 1. Bits per outlier B + 1 + ⌊d / 2^B⌋, B chosen per
layer as argmin_B Σ_t (B + 1 + ⌊d_t / 2^B⌋) over the actual gaps (1..16, smallest on ties).

Why this layout (measured, γ = 5 % top-|w| outliers of Laplace weights; stream + offset table, bits/weight):

    layout                                    576×576        192×576        1536×576       576×1536
    §6 B-bit escape codes, per-row int32      0.311+0.056    0.312+0.056    0.310+0.056    0.312+0.021
    B-bit escapes, R = 16 tiles, 1 int32      0.313+0.004    0.314+0.004    0.313+0.004    0.313+0.001
    1-bit escapes, R = 16 tiles, 2 int32      0.291+0.007    0.290+0.008    0.291+0.007    0.290+0.003

A B-bit escape code wastes B − 1 bits per escape; 1-bit escapes (B = 4 at γ = 5 %: γ·(B + 1 + q/(1 − q)),
q = (1 − γ)^(2^B), = 0.289; measured 0.290–0.291) sit within 0.005 of the entropy floor H₂(γ) = 0.286, and
the per-row int32 table (32/cols bits per weight, 0.056 on 576 columns) shrinks R-fold when a block decodes R
rows. R = 16 keeps the
table ≤ 0.008 on every SmolLM2 shape at 16 × cols positions per tile (~9k, ~460 outliers, one block). A
per-tile choice of B (4 bits per tile to store it) measured 0.0002–0.0005 bit/weight *worse* than one B per
layer; 16-bit tile-relative offsets would save ≤ 0.004 at R = 16 and are not used.

Base quantizers: RTN (round each element to its own grid) or GPTQ with error feedback where column i's
quantizer picks, per element, the grid selected by the mask (``gptq_sweep`` takes per-element grids; grids
and mask are fixed on the original W before the sweep, like GPTQ's static groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, Self

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import Tensor

from quant.gptq import SWEEP_DTYPE, sweep_factor, validate_inputs
from quant.grid import GRID_DTYPE, MSE_CLIP_FACTORS, MSE_NORM, dequantize_codes, quantize_codes
from quant.hessian import HESSIAN_DTYPE, check_finite, dead_inputs, fixed_diagonal, proxy_loss
from quant.precision import exact
from quant.types import ConfigVersion, GridConfig

__all__ = [
    "DEFAULT_GROUP_ROWS",
    "GPTQSweepFields",
    "MAX_INDEX_BITS",
    "STREAM_VERSION",
    "ICQuantConfig",
    "ICQuantWeight",
    "IndexStream",
    "SweepResult",
    "choose_index_bits",
    "decode_positions",
    "encode_positions",
    "entropy_floor",
    "expected_overhead",
    "expected_stream_overhead",
    "fit_masked_grids",
    "gptq_sweep",
    "index_code_count",
    "pack_bits",
    "quantize_icquant",
    "select_outliers",
    "unpack_bits",
]

MAX_INDEX_BITS = 16
DEFAULT_GROUP_ROWS = 16  # R: rows per tile of the index stream (one int32 pair per tile)
STREAM_VERSION = 2  # 2: tiles of R rows, 1-bit escapes (1: per-row-segment offsets, B-bit escape codes)
OFFSET_DTYPE = torch.int32
_MAX_STREAM_CODES = 2**31 - 1  # offsets are int32
_TINY = torch.finfo(GRID_DTYPE).tiny


def _check_gamma(gamma: float) -> float:
    if not (0.0 < gamma < 0.5):
        raise ValueError(f"gamma (outlier fraction) must be in (0, 0.5), got {gamma}")
    return gamma


class GPTQSweepFields(BaseModel):
    """GPTQ error-feedback fields shared by the configs whose base quantizer is ``gptq_sweep`` (ICQuant, GPTQT):
    damp / damp_max (λ schedule), block_size (lazy batch), act_order, and the schema ``version``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    damp: float = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    act_order: bool = True
    version: ConfigVersion = 1

    @model_validator(mode="after")
    def _damping(self) -> Self:
        if not (0 < self.damp <= self.damp_max and math.isfinite(self.damp_max)) or self.block_size < 1:
            raise ValueError(
                f"need 0 < damp <= damp_max < inf and block_size >= 1, got damp={self.damp}, "
                f"damp_max={self.damp_max}, block_size={self.block_size}"
            )
        return self


class ICQuantConfig(GPTQSweepFields):
    """ICQuant settings: ``grid`` gives b (both sets), group size, sym, mse_clip and scale dtype.

    Index-stream tiles are ``group_rows`` rows × ``segment`` columns (0 = whole rows); ``index_bits`` None =
    choose B per layer. ``base`` picks RTN or GPTQ (GPTQ fields as in GPTQConfig; grids are always static).

    Sample YAML::

        grid: {bits: 2, group_size: -1, sym: false, scale_dtype: float16}
        gamma: 0.05
        segment: 0
        group_rows: 16
        index_bits: null
        base: gptq
        damp: 0.01
        damp_max: 1.0
        block_size: 128
        act_order: true
        version: 1
    """

    grid: GridConfig
    gamma: float = 0.05
    segment: int = 0
    group_rows: int = DEFAULT_GROUP_ROWS
    index_bits: int | None = None
    base: Literal["rtn", "gptq"] = "gptq"

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        return _check_gamma(v)

    @field_validator("segment")
    @classmethod
    def _segment(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"segment must be 0 (whole row) or >= 1 columns, got {v}")
        return v

    @field_validator("group_rows")
    @classmethod
    def _group_rows(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"group_rows must be >= 1 rows per index-stream tile, got {v}")
        return v

    @field_validator("index_bits")
    @classmethod
    def _index_bits(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_INDEX_BITS:
            raise ValueError(f"index_bits must be 1..{MAX_INDEX_BITS} or null, got {v}")
        return v


# ---------------------------------------------------------------- index coding


def expected_overhead(gamma: float, index_bits: int) -> float:
    """E[bits/weight] of the §6 B-bit gap codes with B-bit escapes on i.i.d. Bernoulli(γ) positions:
    γ·B / (1 − (1 − γ)^(2^B − 1)). (The stored stream uses 1-bit escapes, ``expected_stream_overhead``.)"""
    return gamma * index_bits / (1.0 - (1.0 - gamma) ** ((1 << index_bits) - 1))


def expected_stream_overhead(gamma: float, index_bits: int) -> float:
    """E[bits/weight] of the stored stream (B-bit remainder + 1-bit escapes + 1 stop bit per outlier) on i.i.d.
    Bernoulli(γ) positions: γ·(B + 1 + q/(1 − q)), q = (1 − γ)^(2^B)  (γ = 5 %, B = 4: 0.2893)."""
    q = (1.0 - gamma) ** (1 << index_bits)
    return gamma * (index_bits + 1 + q / (1.0 - q))


def entropy_floor(gamma: float) -> float:
    """H₂(γ) = −γ log₂ γ − (1 − γ) log₂(1 − γ): no position code does better on i.i.d. positions."""
    return -gamma * math.log2(gamma) - (1 - gamma) * math.log2(1 - gamma)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints [N] (< 2^bits) LSB-first into uint8 [⌈N·bits/8⌉]; value t holds stream bits
    [t·bits, (t+1)·bits), bit k of a byte is stream bit 8·byte + k."""
    planes = ((values.to(torch.int64)[:, None] >> torch.arange(bits, device=values.device)) & 1).to(torch.uint8)
    flat = planes.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)
    weights = (1 << torch.arange(8, device=values.device)).to(torch.int32)
    return (flat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values, int64 [count]."""
    if data.numel() * 8 < count * bits:
        raise ValueError(f"stream of {data.numel()} bytes is too short for {count} codes of {bits} bits")
    flat = ((data.to(torch.int64)[:, None] >> torch.arange(8, device=data.device)) & 1).reshape(-1)
    planes = flat[: count * bits].reshape(count, bits)
    return (planes << torch.arange(bits, device=data.device)).sum(dim=1)


class _Tiling(NamedTuple):
    """Tiles of R rows × L columns, row-major over (row group, column segment); the last ones ragged."""

    rows: int
    cols: int
    L: int  # segment length (≤ cols)
    R: int  # rows per group (≤ rows)
    S: int  # column segments per row
    G: int  # row groups

    @property
    def n_tiles(self) -> int:
        return self.G * self.S

    def tile_of(self, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(tile id, position inside the tile, row-major over the tile's own width) of elements (r, c)."""
        g, s = r // self.R, c // self.L
        width = (self.cols - s * self.L).clamp(max=self.L)
        return g * self.S + s, (r - g * self.R) * width + (c - s * self.L)

    def origin(self, tile: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(first row, first column, rows, width) of each tile id."""
        g, s = tile // self.S, tile % self.S
        return (
            g * self.R,
            s * self.L,
            (self.rows - g * self.R).clamp(max=self.R),
            (self.cols - s * self.L).clamp(max=self.L),
        )


def _tiling(rows: int, cols: int, segment: int, group_rows: int) -> _Tiling:
    if group_rows < 1:
        raise ValueError(f"group_rows must be >= 1, got {group_rows}")
    L = cols if segment <= 0 else min(segment, cols)
    R = min(group_rows, rows)
    S = math.ceil(cols / L) if cols else 0
    G = math.ceil(rows / R) if rows else 0
    return _Tiling(rows, cols, max(L, 1), max(R, 1), S, G)


def _gaps(mask: Tensor, segment: int, group_rows: int) -> tuple[Tensor, Tensor, _Tiling]:
    """(gaps d_t int64, tile id of each outlier, tiling), outliers in stream order (tile, then position)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"outlier mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    rows, cols = mask.shape
    t = _tiling(rows, cols, segment, group_rows)
    r, c = mask.nonzero(as_tuple=True)
    tile, pos = t.tile_of(r, c)
    if t.S > 1:  # row-major nonzero order is already stream order when tiles span whole rows
        order = torch.argsort(tile * (t.R * t.L) + pos)
        tile, pos = tile[order], pos[order]
    prev = torch.full_like(pos, -1)
    if pos.numel() > 1:
        prev[1:] = torch.where(tile[1:] == tile[:-1], pos[:-1], -1)
    return pos - prev - 1, tile, t


def _stream_bits(gaps: Tensor, index_bits: Tensor | int) -> Tensor:
    """Stream bits Σ_t (B + 1 + ⌊d_t / 2^B⌋) for each B (broadcast over a [K] tensor of B)."""
    B = torch.as_tensor(index_bits, device=gaps.device)
    return B * gaps.numel() + (gaps[:, None] >> B.reshape(1, -1)).sum(dim=0) + gaps.numel()


def _best_index_bits(gaps: Tensor) -> int:
    costs = _stream_bits(gaps, torch.arange(1, MAX_INDEX_BITS + 1, device=gaps.device))
    return 1 + int(torch.argmin(costs))  # first minimum: smallest B on ties


def index_code_count(gaps: Tensor, index_bits: int) -> int:
    """Stored bits of these gaps at B = ``index_bits``: Σ_t (B + 1 + ⌊d_t / 2^B⌋) (both streams, unpadded)."""
    return int(_stream_bits(gaps, index_bits)[0])


def choose_index_bits(mask: Tensor, segment: int = 0, group_rows: int = DEFAULT_GROUP_ROWS) -> int:
    """argmin_B of the stream bits over B = 1..MAX_INDEX_BITS (smallest B on ties)."""
    return _best_index_bits(_gaps(mask, segment, group_rows)[0])


@dataclass(frozen=True, eq=False)
class IndexStream:
    """Index-coded outlier positions of a [rows, cols] bitmap (layout in the module docstring).

    Attributes:
        data: uint8, the remainder stream (⌈n·B/8⌉ bytes: n B-bit codes d_t mod 2^B) followed by the escape
            stream (⌈U/8⌉ bytes: per outlier ⌊d_t / 2^B⌋ one-bits then a zero-bit), both LSB-first.
        offsets: int32 [2, n_tiles + 1]: row 0 = outliers before each tile (index into the remainder stream),
            row 1 = escape-stream bits before each tile; column n_tiles holds the totals n and U.
        index_bits: B; rows, cols: bitmap shape; segment: tile width L (≤ cols); group_rows: tile height R.
    """

    data: Tensor
    offsets: Tensor
    index_bits: int
    rows: int
    cols: int
    segment: int
    group_rows: int = DEFAULT_GROUP_ROWS

    @property
    def n_outliers(self) -> int:
        return int(self.offsets[0, -1])

    @property
    def escape_bits(self) -> int:
        return int(self.offsets[1, -1])

    @property
    def n_tiles(self) -> int:
        return int(self.offsets.shape[-1]) - 1

    def split(self) -> tuple[Tensor, Tensor]:
        """(remainder bytes, escape bytes) of ``data``."""
        cut = math.ceil(self.n_outliers * self.index_bits / 8)
        return self.data[:cut], self.data[cut:]

    def stored_bits(self) -> dict[str, int]:
        """Bits actually stored: ``positions`` = both byte-padded streams (``data``), ``offsets`` = the int32
        tile table (B, L and R are three fields of the packed layer metadata, counted there)."""
        return {"positions": 8 * int(self.data.numel()), "offsets": 32 * int(self.offsets.numel())}


def encode_positions(
    mask: Tensor, *, segment: int = 0, group_rows: int = DEFAULT_GROUP_ROWS, index_bits: int | None = None
) -> IndexStream:
    """Index-code a bool bitmap [rows, cols]; B = ``choose_index_bits`` when ``index_bits`` is None."""
    gaps, tile, t = _gaps(mask, segment, group_rows)
    B = _best_index_bits(gaps) if index_bits is None else index_bits
    if not 1 <= B <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be 1..{MAX_INDEX_BITS}, got {B}")
    dev = mask.device
    esc = gaps >> B
    steps = esc + 1  # escape bits of each outlier, its stop bit included
    total = int(steps.sum())
    if max(total, gaps.numel()) > _MAX_STREAM_CODES:
        raise ValueError(
            f"index stream needs {total} escape bits for {gaps.numel()} outliers at B = {B}, overflowing the "
            f"int32 offset field (max {_MAX_STREAM_CODES}); use more index bits or smaller tiles"
        )
    escapes = torch.ones(total, dtype=torch.int64, device=dev)
    escapes[torch.cumsum(steps, 0) - 1] = 0
    zero = torch.zeros(t.n_tiles, dtype=torch.int64, device=dev)
    count = zero.index_add(0, tile, torch.ones_like(tile))
    ebits = zero.index_add(0, tile, steps)
    offsets = torch.cat([torch.zeros(2, 1, dtype=torch.int64, device=dev), torch.stack([count, ebits]).cumsum(1)], 1)
    data = torch.cat([pack_bits(gaps & ((1 << B) - 1), B), pack_bits(escapes, 1)])
    return IndexStream(data, offsets.to(OFFSET_DTYPE), B, t.rows, t.cols, t.L, t.R)


def decode_positions(stream: IndexStream) -> Tensor:
    """Bool bitmap [rows, cols] from an ``IndexStream``; raises ValueError on a corrupt stream.

    Vectorised like the parallel kernel: remainders at fixed offsets, escape counts from the stop-bit positions
    (a select over the escape stream), positions by a prefix sum of d + 1 restarted at each tile."""
    B, rows, cols = stream.index_bits, stream.rows, stream.cols
    if not 1 <= B <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be 1..{MAX_INDEX_BITS}, got {B}")
    t = _tiling(rows, cols, stream.segment, stream.group_rows)
    if tuple(stream.offsets.shape) != (2, t.n_tiles + 1):
        raise ValueError(
            f"stream has an offset table of shape {tuple(stream.offsets.shape)}, expected (2, {t.n_tiles + 1}) "
            f"tiles for {rows}x{cols} in tiles of {t.R}x{t.L}"
        )
    dev = stream.data.device
    off = stream.offsets.to(torch.int64)
    per_tile = off.diff(dim=1)
    if bool((off[:, 0] != 0).any()) or bool((per_tile < 0).any()):
        raise ValueError("corrupt index stream: offsets are not non-decreasing from 0")
    n, U = stream.n_outliers, stream.escape_bits
    low, high = stream.split()
    if high.numel() != math.ceil(U / 8):
        raise ValueError(f"stream of {stream.data.numel()} bytes is too short or too long for {n} codes + {U} bits")
    rem = unpack_bits(low, B, n)
    stops = (unpack_bits(high, 1, U) == 0).nonzero()[:, 0]
    nonempty = per_tile[0] > 0
    if (
        stops.numel() != n
        or not torch.equal(stops[off[0, 1:][nonempty] - 1], off[1, 1:][nonempty] - 1)
        or bool((per_tile[1][~nonempty] != 0).any())
    ):
        raise ValueError("corrupt index stream: the escape stream does not match the tile table")
    gaps = ((stops.diff(prepend=stops.new_full((1,), -1)) - 1) << B) + rem
    tile = torch.repeat_interleave(torch.arange(t.n_tiles, device=dev), per_tile[0])
    cum = torch.cumsum(gaps + 1, 0)
    pos = cum - torch.cat([cum.new_zeros(1), cum])[off[0, :-1]][tile] - 1  # position inside its tile
    r0, c0, height, width = t.origin(tile)
    if bool((pos >= height * width).any()):
        raise ValueError("corrupt index stream: a tile decodes past its length (index field overflow)")
    out = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
    out[r0 + pos // width, c0 + pos % width] = True
    return out


# ---------------------------------------------------------------- outliers and grids


def select_outliers(W: Tensor, gamma: float) -> Tensor:
    """Bool mask [out, in]: per row the k = ⌊γ·n + ½⌋ largest |w| (stable order breaks ties to lower j)."""
    _check_gamma(gamma)
    m, n = W.shape
    k = math.floor(gamma * n + 0.5)
    mask = torch.zeros(m, n, dtype=torch.bool, device=W.device)
    if k:
        idx = torch.argsort(W.abs(), dim=1, descending=True, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def _round_scale(scale: Tensor, scale_dtype: str) -> Tensor:
    if scale_dtype == "float16":
        scale = scale.clamp(6.103515625e-05, 65504.0).to(torch.float16).to(GRID_DTYPE)
    return scale


def _grid_from_range(lo: Tensor, hi: Tensor, cfg: GridConfig) -> tuple[Tensor, Tensor]:
    """Asym: s = (hi − lo)/(2^b − 1), z = round(−lo/s); sym: s = hi/(2^(b−1) − 1), z = 2^(b−1); s < tiny → 1."""
    if cfg.sym:
        half = 1 << (cfg.bits - 1)
        scale = hi / (half - 1)
        scale = _round_scale(torch.where(scale >= _TINY, scale, torch.ones_like(scale)), cfg.scale_dtype)
        return scale, torch.full_like(scale, float(half))
    scale = (hi - lo) / cfg.maxq
    scale = _round_scale(torch.where(scale >= _TINY, scale, torch.ones_like(scale)), cfg.scale_dtype)
    return scale, torch.round(-lo / scale).clamp_(0, cfg.maxq)


def fit_masked_grids(W: Tensor, mask: Tensor, cfg: GridConfig) -> tuple[Tensor, Tensor]:
    """Grids [out, G] fitted on the elements of each (row, group) where ``mask`` is True (others ignored).

    Range [min(w, 0), max(w, 0)] over the selected elements (sym: max|w|); with ``cfg.mse_clip`` the range
    shrinks by p ∈ MSE_CLIP_FACTORS keeping argmin_p Σ_selected |w − ŵ|^2.4. Returns float32 (scales, zeros).
    """
    out, n = W.shape
    gs, G = cfg.effective_group_size(n), cfg.n_groups(n)
    Wg = torch.nn.functional.pad(W.to(GRID_DTYPE), (0, G * gs - n)).reshape(out * G, gs)
    Mg = torch.nn.functional.pad(mask, (0, G * gs - n)).reshape(out * G, gs)
    if cfg.sym:
        hi = torch.where(Mg, Wg.abs(), 0.0).amax(dim=1)
        lo = -hi
    else:
        lo = torch.where(Mg, Wg, torch.inf).amin(dim=1).clamp(max=0.0)
        hi = torch.where(Mg, Wg, -torch.inf).amax(dim=1).clamp(min=0.0)

    def error(s: Tensor, z: Tensor) -> Tensor:
        W_hat = dequantize_codes(quantize_codes(Wg, s[:, None], z[:, None], cfg.bits), s[:, None], z[:, None])
        return torch.where(Mg, (Wg - W_hat).abs().pow(MSE_NORM), 0.0).sum(dim=1)

    scale, zero = _grid_from_range(lo, hi, cfg)
    if cfg.mse_clip:
        best = error(scale, zero)
        for p in MSE_CLIP_FACTORS[1:]:
            s, z = _grid_from_range(p * lo, p * hi, cfg)
            err = error(s, z)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale.reshape(out, G), zero.reshape(out, G)


# ---------------------------------------------------------------- GPTQ with per-element grids


class SweepResult(NamedTuple):
    """codes uint8 [out, in]; proxy_loss = Σ (w_i − q_i)²/U_ii² (damped H); damp = λ used; n_dead."""

    codes: Tensor
    proxy_loss: float
    damp: float
    n_dead: int


def gptq_sweep(
    W: Tensor,
    H: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    *,
    damp: float = 0.01,
    damp_max: float = 1.0,
    block_size: int = 128,
    act_order: bool = True,
    name: str = "layer",
    sweep_dtype: torch.dtype = SWEEP_DTYPE,
) -> SweepResult:
    """GPTQ (quant/gptq.py, same update and damping) with a fixed grid per *element*: scales/zeros [out, in].

    q_i = clamp(round(w_i / s_{:,i}) + z_{:,i}), e = (w_i − ŵ_i)/U_ii, W[:, i+1:] −= e ⊗ U[i, i+1:].
    With s, z expanded from static group grids this is exactly ``quantize_gptq(static_groups=True)``.
    """
    validate_inputs(W, H, name)
    m, n = W.shape
    if tuple(scales.shape) != (m, n) or tuple(zeros.shape) != (m, n):
        raise ValueError(f"per-element scales/zeros must be [{m}, {n}], got {tuple(scales.shape)}")
    dead = dead_inputs(H)
    W = W.to(sweep_dtype, copy=True)
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(fixed_diagonal(H), descending=True, stable=True)
        W, scales, zeros = W[:, perm], scales[:, perm], zeros[:, perm]
    else:
        perm = torch.arange(n, device=W.device)
    factor = sweep_factor(H, perm if act_order else None, damp, damp_max, name, sweep_dtype)
    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)  # ≤ 8-bit codes
    losses = torch.zeros(m, dtype=sweep_dtype, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Ub = factor.band(i1, i2)  # U[i1:i2, i1:]
        U1 = Ub[:, : i2 - i1]
        for i in range(i2 - i1):
            s, z = scales[:, i1 + i], zeros[:, i1 + i]
            w, d = W1[:, i], U1[i, i]
            c = quantize_codes(w, s, z, bits)
            q = dequantize_codes(c, s, z).to(sweep_dtype)
            codes[:, i1 + i] = c
            losses += (w - q) ** 2 / d**2
            err = (w - q) / d
            W1[:, i + 1 :] -= err[:, None] * U1[i, i + 1 :][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Ub[:, i2 - i1 :]
    codes_u8 = codes[:, torch.argsort(perm)].to(torch.uint8)
    return SweepResult(codes_u8, float(losses.to(HESSIAN_DTYPE).sum()), factor.lam, int(dead.sum()))


# ---------------------------------------------------------------- result type and driver


@dataclass(frozen=True, eq=False)
class ICQuantWeight:
    """ICQuant-packed weight [out, in]: codes plus two grids per (row, group) and the outlier index stream.

    Attributes:
        codes: uint8 [out, in], each in 0..2^bits − 1 on the element's own grid.
        inlier_scales, inlier_zeros, outlier_scales, outlier_zeros: float32 [out, n_groups].
        positions: the outlier bitmap as an ``IndexStream``.
        bits: b; group_size: effective group size; scale_bits: 16 or 32 (stored scale width).
        stats: proxy_loss(_exact), damp, n_dead, n_outliers, index_bits and the measured bpw_* breakdown.
    """

    codes: Tensor
    inlier_scales: Tensor
    inlier_zeros: Tensor
    outlier_scales: Tensor
    outlier_zeros: Tensor
    positions: IndexStream
    bits: int
    group_size: int
    scale_bits: int = 16
    sym: bool = False
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be 2-D uint8, got {self.codes.dtype} {tuple(self.codes.shape)}")
        m, n = self.codes.shape
        top = int(self.codes.max()) if self.codes.numel() else 0
        if not 1 <= self.bits <= 8 or top >> self.bits:
            raise ValueError(f"codes overflow the {self.bits}-bit code field (max code {top})")
        G = math.ceil(n / self.group_size)
        for t in (self.inlier_scales, self.inlier_zeros, self.outlier_scales, self.outlier_zeros):
            if tuple(t.shape) != (m, G) or t.dtype != torch.float32:
                raise ValueError(f"grids must be float32 [{m}, {G}], got {t.dtype} {tuple(t.shape)}")
        if (self.positions.rows, self.positions.cols) != (m, n):
            raise ValueError(f"position stream is {self.positions.rows}x{self.positions.cols}, codes are {m}x{n}")

    def outlier_mask(self) -> Tensor:
        """bool [out, in], decoded from the index stream."""
        return decode_positions(self.positions)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ŵ = s_sel · (q − z_sel), the grid selected per element by the decoded outlier bitmap."""
        g = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        O = self.outlier_mask()
        s = torch.where(O, self.outlier_scales[:, g], self.inlier_scales[:, g])
        z = torch.where(O, self.outlier_zeros[:, g], self.inlier_zeros[:, g])
        return dequantize_codes(self.codes, s, z).to(dtype)

    def bits_per_weight(self) -> dict[str, float]:
        """Measured storage per weight: codes + positions (both streams, byte-padded) + offsets (int32 tile table)
        + scales (2 grids × (scale + zero))."""
        numel = self.codes.numel()
        idx = self.positions.stored_bits()
        zero_bits = 0 if self.sym else self.bits
        scales = 2 * self.inlier_scales.numel() * (self.scale_bits + zero_bits)
        bpw = {
            "bpw_codes": float(self.bits),
            "bpw_positions": idx["positions"] / numel,
            "bpw_offsets": idx["offsets"] / numel,
            "bpw_scales": scales / numel,
        }
        bpw["bpw_total"] = sum(bpw.values())
        return bpw


@exact
def quantize_icquant(
    W: Tensor, H: Tensor | None, cfg: ICQuantConfig, *, name: str = "layer", sweep_dtype: torch.dtype = SWEEP_DTYPE
) -> ICQuantWeight:
    """ICQuant-quantize W [out, in]: outliers = top γ|w| per row, two grids, RTN or GPTQ base, index-coded mask.

    ``H`` [in, in] (undamped) is required for base "gptq"; with base "rtn" it only adds ``proxy_loss``.
    Dead inputs (H_ii = 0) are zeroed before outlier selection.
    """
    if W.dim() != 2:
        raise ValueError(f"W for {name!r} must be 2-D [out, in], got {tuple(W.shape)}")
    grid = cfg.grid
    n = W.shape[1]
    W32 = W.to(torch.float32, copy=True)
    if H is not None:
        validate_inputs(W, H, name)
        W32[:, torch.diagonal(H) == 0] = 0
    elif cfg.base == "gptq":
        raise ValueError(f"ICQuant with base 'gptq' needs the Hessian of {name!r}")
    O = select_outliers(W32, cfg.gamma)
    s_in, z_in = fit_masked_grids(W32, ~O, grid)
    s_out, z_out = fit_masked_grids(W32, O, grid)
    gs = grid.effective_group_size(n)
    g = torch.arange(n, device=W.device) // gs
    S = torch.where(O, s_out[:, g], s_in[:, g])
    Z = torch.where(O, z_out[:, g], z_in[:, g])
    stats: dict[str, float] = {}
    if cfg.base == "gptq":
        assert H is not None
        sw = gptq_sweep(
            W, H, S, Z, grid.bits, damp=cfg.damp, damp_max=cfg.damp_max, block_size=cfg.block_size,
            act_order=cfg.act_order, name=name, sweep_dtype=sweep_dtype,
        )  # fmt: skip
        codes = sw.codes
        stats.update(proxy_loss=sw.proxy_loss, damp=sw.damp, n_dead=float(sw.n_dead))
    else:
        codes = quantize_codes(W32, S, Z, grid.bits).to(torch.uint8)
    stream = encode_positions(O, segment=cfg.segment, group_rows=cfg.group_rows, index_bits=cfg.index_bits)
    qw = ICQuantWeight(
        codes, s_in, z_in, s_out, z_out, stream, grid.bits, gs,
        scale_bits=16 if grid.scale_dtype == "float16" else 32, sym=grid.sym,
    )  # fmt: skip
    if H is not None:
        check_finite(H, name)
        stats["proxy_loss_exact"] = proxy_loss(W, dequantize_codes(codes, S, Z), H)  # per panel
    bpw = qw.bits_per_weight()
    stats.update(n_outliers=float(O.sum()), index_bits=float(stream.index_bits), **bpw)
    stats["bpw_position_overhead"] = bpw["bpw_positions"] + bpw["bpw_offsets"]
    return replace(qw, stats=stats)
