"""Pre-flight checks of method options against a model's layer shapes (before any artifact is written).

E8P codes groups of 8 input columns, so every quantized linear's in_features must be a multiple of 8.

An outlier fraction that rounds to no outlier in some layer would silently turn ICQuant into plain RTN/GPTQ with
a wasted position stream, and an index stream whose worst-case escape-stream length exceeds the int32 tile offset
field cannot be stored: both are refused with one line naming the field and the layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from infra.errors import ConfigError
from tasks.recipe import QuantizeConfig

__all__ = ["check_method_shapes", "max_index_codes"]

_OFFSET_MAX = 2**31 - 1  # IndexStream tile offsets are int32


def max_index_codes(rows: int, cols: int, n_outliers: int, index_bits: int | None) -> int:
    """Upper bound on the largest int32 entry of the index-stream tile table (``quant.icquant``) of a [rows, cols]
    layer with ``n_outliers`` per row: the escape-stream length Σ_t (⌊d_t / 2^B⌋ + 1) ≤ rows·n_outliers +
    ⌊rows·cols / 2^B⌋ (the gaps of a tile sum to less than its size), which also bounds the outlier count.
    Holds for every tiling (segment, group_rows); B = 1 when B is chosen per layer."""
    return rows * n_outliers + (rows * cols >> (index_bits or 1))


def check_method_shapes(model_path: Path, cfg: QuantizeConfig) -> None:
    """Raise ConfigError if the group size, ICQuant or E8P options cannot apply to some quantized linear of the
    model (read from the checkpoint's own shapes, whatever the family: fused linears, head_dim·heads ≠ hidden)."""
    from tasks.driver import _WeightIndex
    from tasks.quantize import plan_layers

    config = json.loads((Path(model_path) / "config.json").read_text())
    index = _WeightIndex(Path(model_path))
    for job in plan_layers(model_path, cfg, [None] * int(config.get("num_hidden_layers", 0))):
        rows, cols = (int(s) for s in index.entries[f"{job.name}.weight"][3])
        if cfg.has("group_size") and cfg.group_size > cols:
            raise ConfigError(
                f"quantize.group_size={cfg.group_size} is larger than {job.name}'s input ({cols} columns); "
                f"use a group size of at most {cols}"
            )
        if cfg.icquant_base() is None and cfg.method != "hadamard-e8p":
            continue
        o = cfg.outlier_config()
        if cfg.method == "hadamard-e8p":
            if cols % 8:
                raise ConfigError(
                    f"hadamard-e8p codes groups of 8 input columns, but {job.name} has {cols}; "
                    "use hadamard-gptq for this model"
                )
            continue
        k = math.floor(o.gamma * cols + 0.5)
        if k == 0:
            raise ConfigError(
                f"quantize.outliers.gamma={o.gamma} selects no outlier in {job.name} ({cols} columns); "
                f"use gamma >= {0.5 / cols:.3g}"
            )
        worst = max_index_codes(rows, cols, k, o.index_bits)
        if worst > _OFFSET_MAX:
            raise ConfigError(
                f"quantize.outliers: {job.name} may need {worst} index-stream escape bits, overflowing the int32 "
                f"index offset field (max {_OFFSET_MAX}); set more index_bits"
            )
