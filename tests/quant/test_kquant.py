"""GPTQ onto llama.cpp's block grids (quant/kquant.py): the sweep against the OBQ form in float64, the diagonal-H
limit (= importance-weighted round to nearest, what llama-quantize --imatrix does), lower proxy loss than that
on correlated Hessians, and grids that the gguf package reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.formats.kquants import encode_rows
from quant.hessian import proxy_loss
from quant.kquant import KSPECS, dequantize, fit_blocks, quantize_kquant, quantize_rtn, subgrid
from tests.quant.reference import random_spd, random_weight

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]


def _ref_obq_kquant(W: torch.Tensor, H: torch.Tensor, qtype: str, damp: float) -> torch.Tensor:
    """OBQ in float64 (explicit inverse, rank-1 downdates), grids chosen with ``fit_blocks`` on the current
    weights whenever a 256-column batch starts. Returns the dequantized weight."""
    spec = KSPECS[qtype]
    m, n = W.shape
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    hdiag = torch.diagonal(H).clone()  # the grids' importance: undamped diag H
    row_sigma2 = (W * W).mean(1).to(torch.float32)  # legacy types: the original row's mean square
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    out = torch.zeros(m, n, dtype=torch.float64)
    a = b = torch.zeros(0)
    for j in range(n):
        if j % 256 == 0:
            cols = slice(j, min(j + 256, n))
            d, dmin, sc, mm = fit_blocks(qtype, W[:, cols].to(torch.float32), hdiag[cols], row_sigma2)
            a, b = subgrid(qtype, d, dmin, sc, mm)
            a, b = a.repeat_interleave(spec.sub, 1).double(), b.repeat_interleave(spec.sub, 1).double()
        k = j % 256
        u = torch.where(a[:, k] == 0, 0.0, torch.round((W[:, j] - b[:, k]) / a[:, k])).clamp(0, spec.umax)
        q = a[:, k] * u + b[:, k]
        out[:, j] = q
        err = W[:, j] - q
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :] / Hinv[j, j]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return out


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_0"])
def test_sweep_matches_obq_reference(qtype: str) -> None:
    W, H = random_weight(12, 512, 3), random_spd(512, 4)
    got = quantize_kquant(W, H, qtype, damp=0.01)
    ref = _ref_obq_kquant(W, H, qtype, 0.01)
    # float32 sweep vs float64 OBQ: an occasional tie flips a code, nothing systematic
    differ = (got.dequantize().double() - ref).abs() > 1e-6
    assert float(differ.float().mean()) < 0.02
    rel = abs(proxy_loss(W, got.dequantize(), H) - proxy_loss(W, ref, H)) / proxy_loss(W, ref, H)
    assert rel < 0.02


@pytest.mark.parametrize("qtype", TYPES)
def test_diagonal_hessian_is_weighted_round_to_nearest(qtype: str) -> None:
    """With H diagonal no error can be compensated: the sweep is llama.cpp's imatrix RTN on the same grids."""
    W = random_weight(6, 512, 1)
    h = torch.rand(512, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    got = quantize_kquant(W, torch.diag(h), qtype, damp=0.01)
    rtn = quantize_rtn(W, qtype, h.to(torch.float32))
    assert torch.equal(got.codes, rtn.codes)
    assert torch.equal(got.d, rtn.d) and torch.equal(got.sc, rtn.sc) and torch.equal(got.m, rtn.m)


@pytest.mark.parametrize("qtype", TYPES)
def test_error_feedback_beats_imatrix_rounding(qtype: str) -> None:
    W, H = random_weight(16, 512, 5), random_spd(512, 6)
    gptq = quantize_kquant(W, H, qtype)
    rtn = quantize_rtn(W, qtype, torch.diagonal(H).to(torch.float32))
    loss_gptq, loss_rtn = proxy_loss(W, gptq.dequantize(), H), proxy_loss(W, rtn.dequantize(), H)
    assert loss_gptq < loss_rtn
    assert gptq.stats is not None and gptq.stats["proxy_loss"] == pytest.approx(loss_gptq, rel=1e-9)


@pytest.mark.parametrize("qtype", TYPES)
def test_result_is_exactly_what_gguf_reads(qtype: str) -> None:
    gguf = pytest.importorskip("gguf")
    W, H = random_weight(4, 512, 8), random_spd(512, 9)
    kw = quantize_kquant(W, H, qtype)
    read = gguf.quants.dequantize(encode_rows(kw).numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(read, dequantize(kw).numpy())


def test_weighted_grid_is_no_worse_than_plain_min_max() -> None:
    """The importance-weighted search never loses to the min/max grid it starts from (its first candidate)."""
    W = random_weight(32, 256, 11)
    h = torch.ones(256)
    for qtype in ("Q2_K", "Q4_K", "Q4_1"):
        spec = KSPECS[qtype]
        x = W.reshape(32, -1, spec.sub)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
        s = (hi - lo) / spec.umax
        u = torch.clamp(torch.round((x - lo[..., None]) / s[..., None]), 0, spec.umax)
        err_minmax = float(((s[..., None] * u + lo[..., None] - x) ** 2).sum())
        d, dmin, sc, m = fit_blocks(qtype, W, h)
        a, b = subgrid(qtype, d, dmin, sc, m)
        u2 = torch.clamp(torch.round((x - b[..., None]) / a[..., None]), 0, spec.umax)
        err_fit = float(((a[..., None] * u2 + b[..., None] - x) ** 2).sum())
        # the stored grid is additionally rounded to 6/4-bit sub-scales; allow that rounding's share
        assert err_fit < err_minmax * (1.25 if spec.scale_bits else 1.0), qtype


def test_ragged_width_is_refused() -> None:
    with pytest.raises(ValueError, match="whole 256-weight blocks"):
        quantize_kquant(random_weight(2, 288, 0), random_spd(288, 0), "Q4_K")


@pytest.mark.parametrize("qtype", [*TYPES, "Q4_1"])
def test_grids_are_llama_cpp_imatrix_grids(qtype: str) -> None:
    """fit_blocks against a scalar float32 transcription of ggml's ``quantize_row_*_impl`` (tests/quant/
    ggml_reference.py): the same d, dmin, sub-scales and mins block for block. The vectorised sums round in
    another order than ggml's loops, so a near-tie between two candidates may go the other way: at most a few
    blocks may differ, and then only by such a tie (d within 2 %)."""
    from tests.quant.ggml_reference import grid_row

    W = random_weight(8, 512, 3)
    W[0, :40] *= 6  # a few outliers, as real rows have
    h = torch.rand(512, generator=torch.Generator().manual_seed(2)) + 0.1
    d, dmin, sc, m = fit_blocks(qtype, W, h)
    spec = KSPECS[qtype]
    per = spec.block // spec.sub
    same = total = 0
    for r in range(W.shape[0]):
        for b, (rd, rdm, rls, rlm) in enumerate(grid_row(qtype, W[r].numpy(), h.numpy())):
            total += 1
            fields = [float(d[r, b]), float(dmin[r, b])]
            if spec.scale_bits:
                fields += [sc[r, b * per : (b + 1) * per].tolist(), m[r, b * per : (b + 1) * per].tolist()]
            ref = [rd, rdm] + ([rls, rlm if spec.kind == "min" else [0] * per] if spec.scale_bits else [])
            if fields == ref:
                same += 1
            else:
                assert float(d[r, b]) == pytest.approx(rd, rel=0.02), (r, b)
    assert same >= 0.9 * total, f"{same}/{total} blocks equal"
