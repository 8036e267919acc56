"""The per-layer heatmap stays readable at any depth: fixed width, height linear in the number of blocks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tasks.plots import BLOCK_ROW_INCHES, block_grid, layer_heatmap

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]


def _values(n_blocks: int) -> dict[str, float]:
    return {f"model.layers.{b}.{k}": 4.0 + 0.01 * b + 0.1 * i for b in range(n_blocks) for i, k in enumerate(KINDS)}


def test_block_grid_puts_each_layer_in_its_block_row_and_kind_column() -> None:
    values = _values(12) | {"lm_head": 8.0}
    rows, cols, cells = block_grid(values)
    assert rows[:3] == ["block 0", "block 1", "block 2"] and rows[10] == "block 10" and rows[-1] == "lm_head"
    assert cols == [*KINDS, "(layer)"]
    assert cells[10][KINDS.index("mlp.gate_proj")] == values["model.layers.10.mlp.gate_proj"]
    assert cells[-1] == [None] * len(KINDS) + [8.0]
    assert cells[0][-1] is None


def test_heatmap_width_is_fixed_and_height_grows_with_blocks(tmp_path: Path) -> None:
    sizes = {}
    for n in (2, 30, 80):
        path = layer_heatmap(tmp_path / f"{n}.png", _values(n), title="t", unit="bits")
        with Image.open(path) as img:
            sizes[n] = img.size
    assert sizes[2][0] == sizes[30][0] == sizes[80][0] <= 1600  # 6 columns: width set by the architecture only
    per_block = (sizes[80][1] - sizes[30][1]) / 50
    assert abs(per_block - BLOCK_ROW_INCHES * 100) < 1  # every block adds one row of fixed height (100 dpi)
    assert sizes[80][1] / 80 >= 30  # each row at least 30 px: its labels stay legible
