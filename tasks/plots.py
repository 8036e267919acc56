"""Per-layer plots that stay readable at any depth.

Why: a bar per linear layer (210 of them for a 30-block model) made the ``layer_bits`` figure 25 inches wide,
unreadable in MLflow's artifact view. A block x linear heatmap has one row per decoder block and one column per
linear kind (q/k/v/o/gate/up/down...), so its width is fixed by the architecture and its height grows by a fixed
amount per block; every cell is labelled with its value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["BLOCK_ROW_INCHES", "bits_title", "block_grid", "layer_heatmap"]

BLOCK_ROW_INCHES = 0.32  # figure height per block row
_BLOCK_RE = re.compile(r"^(?P<prefix>.*?\.)?(?:layers|h|blocks|layer)\.(?P<block>\d+)\.(?P<kind>.+)$")


def block_grid(values: dict[str, float]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(row labels, column labels, cells): layers named ``….layers.<i>.<kind>`` go to row ``block i``, column
    ``<kind>`` (columns in first-seen order); any other layer gets a row of its own, in column ``(layer)``."""
    rows: dict[str, dict[str, float]] = {}
    order: list[str] = []
    blocks: dict[int, str] = {}
    others: list[str] = []
    for name, value in values.items():
        m = _BLOCK_RE.match(name)
        if m is None:
            rows.setdefault(name, {})["(layer)"] = value
            others.append(name)
            col = "(layer)"
        else:
            i = int(m["block"])
            label = blocks.setdefault(i, f"block {i}")
            col = m["kind"]
            rows.setdefault(label, {})[col] = value
        if col not in order:
            order.append(col)
    labels = [blocks[i] for i in sorted(blocks)] + sorted(set(others))
    cells = [[rows[r].get(c) for c in order] for r in labels]
    return labels, order, cells


def layer_heatmap(out: Path, values: dict[str, float], *, title: str, unit: str, fmt: str = ".2f") -> Path:
    """Write a block x linear heatmap of ``values`` (layer name -> number) to ``out`` (png) and return it.

    Callers hold their plot lock (pyplot's state is not thread-safe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols, cells = block_grid(values)
    data = np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
    width = min(16.0, 2.4 + 1.15 * max(1, len(cols)))
    height = 1.6 + BLOCK_ROW_INCHES * max(1, len(rows))
    fig, ax = plt.subplots(figsize=(width, height))
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    ax.set_xticks(range(len(cols)), [c.replace(".", ".\n", 1) if len(c) > 12 else c for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.xaxis.tick_top()
    mid = (lo + hi) / 2
    for r in range(len(rows)):
        for c in range(len(cols)):
            v = data[r, c]
            if np.isfinite(v):
                ax.text(
                    c, r, format(v, fmt), ha="center", va="center", fontsize=7, color="black" if v > mid else "white"
                )
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=unit)
    ax.set_title(title, fontsize=10, pad=24 if len(rows) > 2 else 12)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bits_title(title: str, layer_bpw: dict[str, dict[str, Any]], parts: tuple[str, ...]) -> str:
    """Title with the weighted average of each stored part (codes, positions, grids ...) over all layers."""
    total = sum(float(v.get("n_weights", 1.0)) for v in layer_bpw.values()) or 1.0
    means = {
        p: sum(float(v.get(f"bpw_{p}", 0.0)) * float(v.get("n_weights", 1.0)) for v in layer_bpw.values()) / total
        for p in parts
    }
    shown = ", ".join(f"{p} {m:.3f}" for p, m in means.items() if m > 0)
    return f"{title}: measured stored bits per weight\n(average: {shown or 'n/a'})"
