"""Scalar float32 transcriptions of llama.cpp's imatrix grid choice (``ggml/src/ggml-quants.c`` as vendored in
llama-cpp-python 0.3.36: ``make_qx_quants``, ``make_qkx3_quants``, ``make_qp_quants`` and the
``quantize_row_*_impl`` functions), loop for loop, so that :func:`quant.kquant.fit_blocks`' vectorised version is
checked against the obvious one. Only the grid fields are produced (d, dmin, the integer sub-scales and mins):
the codes are the sweep's business."""

from __future__ import annotations

import numpy as np

F = np.float32
EPS = F(1e-15)


def nearest_int(v: np.float32) -> int:
    return int(np.rint(v))  # ggml's magic-number rounding: half to even


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.float32, list[int]]:
    n = len(x)
    mx, amax = F(0), F(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax, mx = abs(x[i]), x[i]
    if amax < EPS:
        return F(0), [0] * n
    iscale = F(-nmax) / mx
    L = [0] * n
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        q = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = q + nmax
        sumlx += qw[i] * x[i] * F(q)
        suml2 += qw[i] * F(q * q)
    scale = sumlx / suml2 if suml2 else F(0)
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(k)) / mx
        sumlx, suml2 = F(0), F(0)
        for i in range(n):
            q = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            sumlx += qw[i] * x[i] * F(q)
            suml2 += qw[i] * F(q * q)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = [nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) for i in range(n)]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def make_qkx3_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.float32, np.float32]:
    """(scale, the_min = −min ≥ 0) with rmin −0.9, rdelta 0.05, 36 steps, squared error."""
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w, sum_x = w[0], w[0] * x[0]
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    mn = min(mn, F(0))
    if mx <= mn:
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        q = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        diff = scale * F(q) + mn - x[i]
        best += w[i] * diff * diff
    for k in range(37):
        iscale = (F(-0.9) + F(0.05) * F(k) + F(nmax)) / (mx - mn)
        laux = [max(0, min(nmax, nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
        sl, sl2, sxl = F(0), F(0), F(0)
        for i in range(n):
            sl += w[i] * F(laux[i])
            sl2 += w[i] * F(laux[i] * laux[i])
            sxl += w[i] * F(laux[i]) * x[i]
        det = sum_w * sl2 - sl * sl
        if det > 0:
            this_scale = (sum_w * sxl - sum_x * sl) / det
            this_min = (sl2 * sum_x - sl * sxl) / det
            if this_min > 0:
                this_min, this_scale = F(0), sxl / sl2
            mad = F(0)
            for i in range(n):
                diff = this_scale * F(laux[i]) + this_min - x[i]
                mad += w[i] * diff * diff
            if mad < best:
                best, scale, mn = mad, this_scale, this_min
    return scale, -mn


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.float32, list[int]]:
    n = len(x)
    mx = F(0)
    for v in x:
        mx = max(mx, v)
    if mx < EPS:
        return F(0), [0] * n
    iscale = F(nmax) / mx
    L = [nearest_int(iscale * v) for v in x]
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best += qw[i] * diff * diff
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_k = (F(0.1) * F(k) + F(nmax)) / mx
        scale_k = F(1) / iscale_k
        mse = F(0)
        for i in range(n):
            q = min(nmax, nearest_int(iscale_k * x[i]))
            diff = x[i] - scale_k * F(q)
            mse += qw[i] * diff * diff
        if mse < best:
            best, iscale = mse, iscale_k
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        L[i] = min(nmax, nearest_int(iscale * x[i]))
        sumlx += qw[i] * x[i] * F(L[i])
        suml2 += qw[i] * F(L[i] * L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = sumlx - qw[i] * x[i] * F(L[i])
            sl2 = suml2 - qw[i] * F(L[i] * L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += qw[i] * x[i] * F(new_l)
                    sl2 += qw[i] * F(new_l * new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), L


def _weights(x: np.ndarray, qw: np.ndarray, sigma2: np.float32) -> np.ndarray:
    return np.array([qw[i] * np.sqrt(sigma2 + x[i] * x[i]) for i in range(len(x))], dtype=F)


def grid_row(qtype: str, row: np.ndarray, imatrix: np.ndarray) -> list[tuple[float, float, list[int], list[int]]]:
    """Per block of one row: (d, dmin, integer sub-scales, integer mins) as the block struct stores them
    (Q3_K scales as 0…63, legacy types: scale 1, min 0; d/dmin after the fp16 rounding)."""
    row, imatrix = row.astype(F), imatrix.astype(F)
    out = []
    row_sigma2 = F(np.sum(row.astype(np.float64) ** 2) / len(row))
    block = 32 if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") else 256
    for b0 in range(0, len(row), block):
        x, qw = row[b0 : b0 + block], imatrix[b0 : b0 + block]
        sumx2 = F(0)
        for v in x:
            sumx2 += v * v
        if qtype == "Q8_0":
            out.append((float(F(np.float16(np.max(np.abs(x)) / F(127)))), 0.0, [1], [0]))
        elif qtype in ("Q4_0", "Q5_0"):
            d, _ = make_qx_quants(x, 8 if qtype == "Q4_0" else 16, _weights(x, qw, row_sigma2))
            out.append((float(np.float16(d)), 0.0, [1], [0]))
        elif qtype in ("Q4_1", "Q5_1"):
            d, the_min = make_qkx3_quants(x, 15 if qtype == "Q4_1" else 31, _weights(x, qw, row_sigma2))
            out.append((float(np.float16(d)), float(np.float16(-the_min)), [1], [0]))
        elif qtype in ("Q2_K", "Q4_K", "Q5_K"):
            sub, nmax = (16, 3) if qtype == "Q2_K" else (32, 15 if qtype == "Q4_K" else 31)
            sigma2 = sumx2 / F(256) * (F(1) if qtype == "Q2_K" else F(2))
            scales, mins, sw = [], [], []
            for j in range(0, 256, sub):
                w = _weights(x[j : j + sub], qw[j : j + sub], sigma2)
                s, m = make_qkx3_quants(x[j : j + sub], nmax, w)
                scales.append(s)
                mins.append(m)
                acc = F(0)
                for v in w:
                    acc += v
                sw.append(acc)
            top = 15 if qtype == "Q2_K" else 63
            d, ls = make_qp_quants(np.array(scales, F), top, np.array(sw, F))
            dm, lm = make_qp_quants(np.array(mins, F), top, np.array(sw, F))
            out.append((float(np.float16(d)), float(np.float16(dm)), ls, lm))
        elif qtype == "Q3_K":
            sigma2 = F(2) * sumx2 / F(256)
            scales, sw = [], []
            for j in range(0, 256, 16):
                w = _weights(x[j : j + 16], qw[j : j + 16], sigma2)
                scales.append(make_qx_quants(x[j : j + 16], 4, w)[0])
                acc = F(0)
                for v in w:
                    acc += v
                sw.append(acc)
            d, ls = make_qx_quants(np.array(scales, F), 32, np.array(sw, F))
            out.append((float(np.float16(d)), 0.0, ls, [0] * 16))
        elif qtype == "Q6_K":
            scales = [make_qx_quants(x[j : j + 16], 32, qw[j : j + 16])[0] for j in range(0, 256, 16)]
            max_scale, max_abs = F(0), F(0)
            for s in scales:
                if abs(s) > max_abs:
                    max_abs, max_scale = abs(s), s
            if max_abs < EPS:
                out.append((0.0, 0.0, [0] * 16, [0] * 16))
                continue
            iscale = F(-128) / max_scale
            out.append(
                (float(np.float16(F(1) / iscale)), 0.0, [min(127, nearest_int(iscale * s)) for s in scales], [0] * 16)
            )
        else:
            raise ValueError(qtype)
    return out
