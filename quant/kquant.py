"""GPTQ error feedback onto llama.cpp's block grids: k-quants (Q2_K … Q6_K) and the legacy 32-weight types.

llama.cpp's ``llama-quantize --imatrix`` rounds every weight to the nearest point of a grid it picks per block with
an importance-weighted search (``make_qkx2_quants`` / ``make_qx_quants`` weighted by the imatrix, i.e. the
diagonal of the proxy Hessian H = E[x xᵀ]). It never feeds a rounding error forward. Here the same grids are
chosen the same way, per 256-column super-block (32 for legacy types) *when the GPTQ sweep reaches it*, on the
error-updated weights, and then the column sweep of :mod:`quant.gptq` runs with the grid fixed: each column is
rounded on its sub-block's grid and its error is spread over the not-yet-quantized columns through the upper
Cholesky factor U of H⁻¹. The result is a set of integer fields that ggml stores exactly
(:mod:`kernels.formats.kquants` packs them), so the file dequantizes to precisely the weights the sweep
accounted for.

Every type is "per sub-block j of a row: x = a_j · u + b_j" with u the unsigned code and (a_j, b_j) float32
numbers computed from the stored fields exactly as ggml computes them (``dequantize_row_*`` in ggml-quants.c):

======  =====  ====  ====  ===============================================  ==============================
type    block  sub   bits  stored                                           a, b
======  =====  ====  ====  ===============================================  ==============================
Q2_K    256    16    2     fp16 d, dmin; 4-bit sc, m                        a = d·sc, b = −dmin·m
Q3_K    256    16    3     fp16 d; 6-bit sc (signed sc − 32)                a = d·(sc − 32), b = −4a
Q4_K    256    32    4     fp16 d, dmin; 6-bit sc, m                        a = d·sc, b = −dmin·m
Q5_K    256    32    5     fp16 d, dmin; 6-bit sc, m                        a = d·sc, b = −dmin·m
Q6_K    256    16    6     fp16 d; int8 sc                                  a = d·sc, b = −32a
Q4_0    32     32    4     fp16 d                                           a = d, b = −8a
Q4_1    32     32    4     fp16 d, m                                        a = d, b = m
Q5_0    32     32    5     fp16 d                                           a = d, b = −16a
Q5_1    32     32    5     fp16 d, m                                        a = d, b = m
Q8_0    32     32    8     fp16 d                                           a = d, b = −128a
======  =====  ====  ====  ===============================================  ==============================

In every case a·u is exact in float32 (≤ 24 significant bits) and a·u + b is rounded once, as in ggml, so
:func:`dequantize` reproduces llama.cpp's (and the ``gguf`` package's) dequantization bit for bit.

Grid choice, per block, is llama.cpp's own with the imatrix h = diag H (``quantize_row_*_impl`` in
ggml-quants.c, transcribed in :func:`fit_blocks` and checked against scalar transcriptions in the tests):

* importance w_i = h_i·sqrt(σ² + x_i²), σ² per type (2·mean x² of the 256-block for Q3_K/Q4_K/Q5_K, mean x² for
  Q2_K, mean x² of the whole row for the legacy types; Q6_K weights by h alone);
* types with a min: per sub-block, the weighted least-squares (scale, min ≤ 0) over ``make_qkx3_quants``'s
  candidate inverse scales (nmax − 0.9 + 0.05·k)/(max − min), k = 0…36;
* symmetric types: per sub-block, the weighted least-squares scale over ``make_qx_quants``'s candidates
  −(nmax + k/10)/max_signed;
* k-quants then put the sub-block scales (and mins) on the super-block's integer grid with an fp16 super-scale:
  weighted ``make_qp_quants`` for Q2_K/Q4_K/Q5_K, weighted ``make_qx_quants`` over the signed scales for Q3_K,
  −128/max_signed for Q6_K; legacy types store the scale (and min) as fp16, Q8_0 absmax/127.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from quant.gptq import sweep_factor, validate_inputs
from quant.hessian import dead_inputs, fixed_diagonal, proxy_loss
from quant.precision import exact

__all__ = ["KSPECS", "KQuantWeight", "KSpec", "dequantize", "fit_blocks", "quantize_kquant", "quantize_rtn", "subgrid"]


@dataclass(frozen=True)
class KSpec:
    """One ggml block type: ``block`` weights per stored block, ``sub`` per sub-block grid, ``bits`` per code."""

    name: str
    block: int
    sub: int
    bits: int
    kind: Literal["min", "sym"]  # x = a·u − dmin·m (min) or a·(u − zero) (sym)
    scale_bits: int  # bits of the integer sub-block scale (0: legacy type, scale stored as fp16)
    zero: int  # sym types: the code of 0 (u − zero is the signed quant)
    nbytes: int  # bytes per block in the file

    @property
    def umax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.block


KSPECS: dict[str, KSpec] = {
    s.name: s
    for s in (
        KSpec("Q2_K", 256, 16, 2, "min", 4, 0, 84),
        KSpec("Q3_K", 256, 16, 3, "sym", 6, 4, 110),
        KSpec("Q4_K", 256, 32, 4, "min", 6, 0, 144),
        KSpec("Q5_K", 256, 32, 5, "min", 6, 0, 176),
        KSpec("Q6_K", 256, 16, 6, "sym", 8, 32, 210),
        KSpec("Q4_0", 32, 32, 4, "sym", 0, 8, 18),
        KSpec("Q4_1", 32, 32, 4, "min", 0, 0, 20),
        KSpec("Q5_0", 32, 32, 5, "sym", 0, 16, 22),
        KSpec("Q5_1", 32, 32, 5, "min", 0, 0, 24),
        KSpec("Q8_0", 32, 32, 8, "sym", 0, 128, 34),
    )
}


@dataclass(frozen=True)
class KQuantWeight:
    """A weight [rows, cols] in one ggml block type, as the integer fields ggml stores (every tensor per row).

    ``codes`` uint8 [R, C] unsigned codes u; ``d``/``dmin`` float16 [R, C/block] super-scales (``dmin`` is the
    fp16 min m of Q4_1/Q5_1, zero for types without one); ``sc``/``m`` int16 [R, C/sub] the integer sub-block
    scales and mins as stored (Q3_K: 0…63 meaning sc − 32; Q6_K: −128…127; legacy types: 1 and 0).
    ``stats``: proxy losses of the sweep.
    """

    qtype: str
    codes: Tensor
    d: Tensor
    dmin: Tensor
    sc: Tensor
    m: Tensor
    stats: dict[str, float] | None = None

    @property
    def spec(self) -> KSpec:
        return KSPECS[self.qtype]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def rows(self, index: Tensor) -> KQuantWeight:
        """The same weight with its rows reordered (``new[i] = old[index[i]]``): every field is per row."""
        return KQuantWeight(
            self.qtype, self.codes[index], self.d[index], self.dmin[index], self.sc[index], self.m[index], self.stats
        )

    def dequantize(self) -> Tensor:
        return dequantize(self)


def subgrid(qtype: str, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) float32 [R, C/sub]: the sub-block grids x = a·u + b, computed from the fields as ggml does."""
    spec = KSPECS[qtype]
    per = spec.block // spec.sub
    df = d.to(torch.float32).repeat_interleave(per, dim=1)
    if spec.scale_bits == 0:  # legacy: one grid per block, the fp16 scale itself
        a = df
        b = dmin.to(torch.float32) if spec.kind == "min" else -(spec.zero * a)
        return a, b
    scf = sc.to(torch.float32)
    if spec.name == "Q3_K":
        scf = scf - 32
    a = df * scf
    if spec.kind == "min":
        b = -(dmin.to(torch.float32).repeat_interleave(per, dim=1) * m.to(torch.float32))
    else:
        b = -(spec.zero * a)
    return a, b


def dequantize(kw: KQuantWeight) -> Tensor:
    """float32 [R, C]: exactly llama.cpp's dequantization of the stored blocks."""
    spec = kw.spec
    a, b = subgrid(kw.qtype, kw.d, kw.dmin, kw.sc, kw.m)
    a = a.repeat_interleave(spec.sub, dim=1)
    if spec.kind == "sym":  # ggml: scale · signed quant (one exact product, signed zeros included)
        return a * (kw.codes.to(torch.float32) - spec.zero)
    return a * kw.codes.to(torch.float32) + b.repeat_interleave(spec.sub, dim=1)


def _round(x: Tensor) -> Tensor:
    """Round half away from zero (ggml's ``nearest_int``/``roundf`` ties differ only on exact halves)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zero


def _fit_min(
    x: Tensor, w: Tensor, umax: int, *, nstep: int = 36, rmin: float = -0.9, rdelta: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Weighted (scale ≥ 0, min ≤ 0) per group for x ≈ scale·u + min, u ∈ [0, umax]: ``make_qkx3_quants`` with
    the parameters every imatrix path of llama.cpp uses (−0.9, 0.05, 36 steps). x, w [..., n]; returns scale, min."""
    xmin = x.amin(-1).clamp(max=0.0)
    xmax = x.amax(-1)
    sw = w.sum(-1)
    best_s = (xmax - xmin) / umax
    best_m = xmin
    lq = torch.clamp(_round((umax / (xmax - xmin).clamp(min=1e-30))[..., None] * (x - xmin[..., None])), 0, umax)
    best_e = (w * (best_s[..., None] * lq + best_m[..., None] - x) ** 2).sum(-1)
    sx = (w * x).sum(-1)
    for k in range(nstep + 1):
        # ggml measures every candidate from the best min found so far (its ``min`` is updated in the loop)
        iscale = (rmin + rdelta * k + umax) / (xmax - best_m).clamp(min=1e-30)
        lq = torch.clamp(_round(iscale[..., None] * (x - best_m[..., None])), 0, umax)
        sl = (w * lq).sum(-1)
        sl2 = (w * lq * lq).sum(-1)
        sxl = (w * x * lq).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det_safe = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det_safe
        mn = (sl2 * sx - sl * sxl) / det_safe
        pos = mn > 0
        s = torch.where(pos, sxl / sl2.clamp(min=1e-30), s)
        mn = torch.where(pos, torch.zeros_like(mn), mn)
        e = (w * (s[..., None] * lq + mn[..., None] - x) ** 2).sum(-1)
        better = ok & (e < best_e) & (s >= 0)  # s ≥ 0: a negative scale has no 6-bit code (ggml would wrap)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, mn, best_m)
        best_e = torch.where(better, e, best_e)
    flat = xmax <= xmin
    best_s = torch.where(flat, torch.zeros_like(best_s), best_s)
    best_m = torch.where(flat, xmin, best_m)
    return best_s, best_m


def _fit_sym(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Weighted signed scale per group for x ≈ scale·q, q ∈ [−nmax, nmax − 1] (``make_qx_quants``, rmse type 1).

    The value of largest magnitude maps to −nmax (the wider side); candidates move that anchor by tenths, the
    unmoved one first (ties keep it, as in ggml). Returns (scale, q) with q the best candidate's integers
    (−nmax for an all-zero group, which ggml stores as L = 0)."""
    idx = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    zero = mx.abs() < _EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)

    def candidate(k: int) -> tuple[Tensor, Tensor, Tensor]:
        q = torch.clamp(_round((-(nmax + 0.1 * k) / mx_safe)[..., None] * x), -nmax, nmax - 1)
        return q, (w * x * q).sum(-1), (w * q * q).sum(-1)

    best_q, sxl, sl2 = candidate(0)
    scale = torch.where(sl2 != 0, sxl / torch.where(sl2 == 0, 1.0, sl2), torch.zeros_like(sl2))
    best = scale * sxl
    for k in (*range(-9, 0), *range(1, 10)):
        q, sxl, sl2 = candidate(k)
        better = (sl2 > 0) & (sxl * sxl > best * sl2)
        best_q = torch.where(better[..., None], q, best_q)
        scale = torch.where(better, sxl / sl2.clamp(min=1e-30), scale)
        best = torch.where(better, scale * sxl, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero[..., None], torch.full_like(best_q, -nmax), best_q)


def _fit_pos(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Weighted scale for non-negative x ≈ scale·L, L ∈ [0, nmax] (``make_qp_quants``: nine candidate scales,
    then up to five passes moving one L at a time while the weighted fit improves). How k-quants store their
    sub-block scales and mins with an imatrix. x, w [..., n] → (scale [...], L [..., n] float)."""
    mx = x.amax(-1).clamp(min=0.0)
    zero = mx < _EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mx_safe
    L = _round(iscale[..., None] * x)
    best = (w * (x - (1 / iscale)[..., None] * L) ** 2).sum(-1)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_k = (0.1 * k + nmax) / mx_safe
        lk = _round(iscale_k[..., None] * x).clamp(max=nmax)
        mse = (w * (x - (1 / iscale_k)[..., None] * lk) ** 2).sum(-1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_k, iscale)
    L = _round(iscale[..., None] * x).clamp(max=nmax)
    sumlx = (w * x * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = _round(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(max=nmax)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(suml2))
    return torch.where(zero, 0.0, scale), torch.where(zero[..., None], 0.0, L)


def _fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16)


def importance(qtype: str, x: Tensor, h: Tensor | None, row_sigma2: Tensor | None = None) -> Tensor:
    """llama.cpp's per-weight importance inside a block with an imatrix h (diag H), per type: h·sqrt(σ² + x²) with
    σ² = 2·mean x² over the 256-block (Q3_K, Q4_K, Q5_K), mean x² over the block (Q2_K) or over the whole row
    (legacy Q4_0 … Q5_1, ``row_sigma2`` [R]), and h alone for Q6_K. x [R, B, block], h [B, block] or None
    (uniform). Q8_0 takes no importance (absmax scale)."""
    rule = _IMPORTANCE[qtype]
    hh = torch.ones_like(x[0]) if h is None else h.to(x.dtype)
    if rule == "h":
        return hh[None].expand_as(x)
    if rule == "row":
        sigma2 = ((x * x).mean((-2, -1)) if row_sigma2 is None else row_sigma2.to(x.dtype))[:, None, None]
    else:
        sigma2 = (2.0 if rule == "block2" else 1.0) * (x * x).mean(-1, keepdim=True)
    return hh[None] * torch.sqrt(sigma2 + x * x)


_IMPORTANCE = {
    "Q2_K": "block1",
    "Q3_K": "block2",
    "Q4_K": "block2",
    "Q5_K": "block2",
    "Q6_K": "h",
    "Q4_0": "row",
    "Q4_1": "row",
    "Q5_0": "row",
    "Q5_1": "row",
    "Q8_0": "h",
}


def fit_blocks(
    qtype: str, x: Tensor, h: Tensor | None = None, row_sigma2: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Choose the stored grids of whole blocks as ``llama-quantize --imatrix`` does (``quantize_row_*_impl``):
    x [R, C] (C a multiple of the block), h [C] importance (diag H) or None, ``row_sigma2`` [R] the rows' mean
    square for the legacy types (default: x's own). Returns (d, dmin) float16 [R, C/block] and (sc, m) int16
    [R, C/sub].

    Sub-block grids: ``make_qkx3_quants`` (types with a min) or ``make_qx_quants`` (symmetric); k-quant
    sub-scales and mins then go onto the super-block's integer grid with an fp16 super-scale: weighted
    ``make_qp_quants`` (Q2_K, Q4_K, Q5_K; weights = the sub-block's summed importance), weighted
    ``make_qx_quants`` over the signed scales (Q3_K), −128/max (Q6_K). Q8_0 is absmax/127."""
    spec = KSPECS[qtype]
    R, C = x.shape
    if C % spec.block:
        raise ValueError(f"{qtype} needs whole {spec.block}-weight blocks, got {C} columns")
    nb, per = C // spec.block, spec.block // spec.sub
    xb = x.to(torch.float32).reshape(R, nb, spec.block)
    hb = None if h is None else h.to(torch.float32).reshape(nb, spec.block)
    w = importance(qtype, xb, hb, row_sigma2).reshape(R, nb, per, spec.sub)
    xs = xb.reshape(R, nb, per, spec.sub)
    ones = torch.ones(R, nb * per, dtype=torch.int16, device=x.device)
    zeros16 = torch.zeros(R, nb, dtype=torch.float16, device=x.device)
    if qtype == "Q8_0":
        return _fp16(xb.abs().amax(-1) / 127), zeros16, ones, 0 * ones
    if spec.kind == "min":
        s, mn = _fit_min(xs, w, spec.umax)  # [R, nb, per]
        if spec.scale_bits == 0:
            return _fp16(s.reshape(R, nb)), _fp16(mn.reshape(R, nb)), ones, 0 * ones
        top = (1 << spec.scale_bits) - 1
        sw = w.sum(-1)
        d, ls = _fit_pos(s, sw, top)
        dm, lm = _fit_pos(-mn, sw, top)
        return _fp16(d), _fp16(dm), ls.to(torch.int16).reshape(R, -1), lm.to(torch.int16).reshape(R, -1)
    s, _ = _fit_sym(xs, w, spec.zero)  # signed scale per sub-block, x ≈ s·q
    if spec.scale_bits == 0:
        return _fp16(s.reshape(R, nb)), zeros16, ones, 0 * ones
    if qtype == "Q3_K":
        d, q = _fit_sym(s, w.sum(-1), 32)
        return _fp16(d), zeros16, (q + 32).to(torch.int16).reshape(R, -1), 0 * ones
    # Q6_K: the scale of largest magnitude maps to −128; the integers come from the unrounded inverse
    idx = s.abs().argmax(-1, keepdim=True)
    mx = s.gather(-1, idx).squeeze(-1)
    zero = mx.abs() < _EPS
    iscale = torch.where(zero, 0.0, -128.0 / torch.where(zero, 1.0, mx))
    d = _fp16(torch.where(zero, 0.0, 1 / torch.where(zero, 1.0, iscale)))
    q = _round(iscale[..., None] * s).clamp(max=127)
    return d, zeros16, q.to(torch.int16).reshape(R, -1), 0 * ones


def _codes(w: Tensor, a: Tensor, b: Tensor, umax: int) -> Tensor:
    """Nearest code u ∈ [0, umax] of w on x = a·u + b (u = 0 where a = 0: every code gives b)."""
    safe = torch.where(a == 0, torch.ones_like(a), a)
    u = torch.clamp(_round((w - b) / safe), 0, umax)
    return torch.where(a == 0, torch.zeros_like(u), u)


def quantize_rtn(W: Tensor, qtype: str, h: Tensor | None = None) -> KQuantWeight:
    """Round to nearest on the importance-weighted grids (what ``llama-quantize --imatrix`` does, with h the
    imatrix). W [R, C]."""
    W = W.to(torch.float32)
    d, dmin, sc, m = fit_blocks(qtype, W, h, (W * W).mean(1))
    a, b = subgrid(qtype, d, dmin, sc, m)
    sub = KSPECS[qtype].sub
    u = _codes(W, a.repeat_interleave(sub, 1), b.repeat_interleave(sub, 1), KSPECS[qtype].umax)
    return KQuantWeight(qtype, u.to(torch.uint8), d, dmin, sc, m)


@exact
def quantize_kquant(
    W: Tensor,
    H: Tensor,
    qtype: str,
    *,
    damp: float = 0.01,
    damp_max: float = 1.0,
    name: str = "layer",
) -> KQuantWeight:
    """GPTQ-quantize W [out, in] onto ``qtype``'s grids against the proxy Hessian H [in, in] (undamped).

    Columns are swept in order (k-quant grids are contiguous) in batches of 256 (or the whole width when smaller);
    when the sweep reaches a batch, the grids of its blocks are chosen on the current, error-updated weights with
    importance diag(H), then every column is rounded on its grid and its error fed forward. stats: proxy_loss
    (tr((Ŵ − W) H (Ŵ − W)ᵀ), undamped H), damp (λ used), n_dead."""
    validate_inputs(W, H, name)
    spec = KSPECS[qtype]
    R, C = W.shape
    if C % spec.block:
        raise ValueError(f"{name}: {qtype} needs whole {spec.block}-weight blocks, got {C} columns")
    dead = dead_inputs(H)
    Wc = W.to(torch.float32, copy=True)
    Wc[:, dead] = 0
    hdiag = fixed_diagonal(H).to(torch.float32)
    row_sigma2 = (Wc * Wc).mean(1)  # the legacy types' importance uses the whole original row (as ggml does)
    factor = sweep_factor(H, None, damp, damp_max, name, torch.float32)
    nb, nsub = C // spec.block, C // spec.sub
    d = torch.zeros(R, nb, dtype=torch.float16)
    dmin = torch.zeros_like(d)
    sc = torch.zeros(R, nsub, dtype=torch.int16)
    m = torch.zeros_like(sc)
    codes = torch.zeros(R, C, dtype=torch.uint8)
    step = max(256, spec.block)
    for i1 in range(0, C, step):
        i2 = min(i1 + step, C)
        W1 = Wc[:, i1:i2].clone()
        bd, bdm, bsc, bm = fit_blocks(qtype, W1, hdiag[i1:i2], row_sigma2)
        d[:, i1 // spec.block : i2 // spec.block] = bd
        dmin[:, i1 // spec.block : i2 // spec.block] = bdm
        sc[:, i1 // spec.sub : i2 // spec.sub] = bsc
        m[:, i1 // spec.sub : i2 // spec.sub] = bm
        a, b = subgrid(qtype, bd, bdm, bsc, bm)
        a = a.repeat_interleave(spec.sub, 1)
        b = b.repeat_interleave(spec.sub, 1)
        Err1 = torch.zeros_like(W1)
        Ub = factor.band(i1, i2)  # U[i1:i2, i1:]
        U1 = Ub[:, : i2 - i1]
        for i in range(i2 - i1):
            w = W1[:, i]
            u = _codes(w, a[:, i], b[:, i], spec.umax)
            q = a[:, i] * u + b[:, i]
            codes[:, i1 + i] = u.to(torch.uint8)
            err = (w - q) / U1[i, i]
            W1[:, i + 1 :] -= err[:, None] * U1[i, i + 1 :][None, :]
            Err1[:, i] = err
        Wc[:, i2:] -= Err1 @ Ub[:, i2 - i1 :]
    lam = factor.lam
    del factor, Wc  # the float64 factor and the swept copy are done before the exact proxy loss
    kw = KQuantWeight(qtype, codes, d, dmin, sc, m)
    loss = proxy_loss(W, dequantize(kw), H)  # per panel
    return KQuantWeight(qtype, codes, d, dmin, sc, m, {"proxy_loss": loss, "damp": lam, "n_dead": float(dead.sum())})
