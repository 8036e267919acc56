"""Typed configs and the quantized-weight container shared by every quantizer (ALGORITHMS.md §1).

A quantized linear weight W (m×n = out×in) is stored as integer codes plus one affine grid per
(output row, input group):  W_hat[:, j] = scales[:, g(j)] · (codes[:, j] − zeros[:, g(j)]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from torch import Tensor

__all__ = ["ConfigVersion", "GridConfig", "QuantizedWeight"]


def _check_config_version(v: int, info: ValidationInfo) -> int:
    if v != 1:
        raise ValueError(f"{info.config['title'] if info.config else 'config'} version must be 1, got {v}")
    return v


ConfigVersion = Annotated[int, AfterValidator(_check_config_version)]
"""``version`` field of every quant config: schema version 1 (the error names the config class)."""


class GridConfig(BaseModel):
    """Scalar affine grid: ``bits`` per code, one grid per row and group of ``group_size`` input columns.

    ``group_size`` 0 or -1 means one grid per output channel (the group spans all ``in_features``); a ragged
    last group is allowed (n_groups = ceil(in_features / group_size)). ``mse_clip`` shrinks each grid's
    range over ``grid.MSE_CLIP_FACTORS`` and keeps the factor with the lowest Σ|w − ŵ|^2.4.
    ``scale_mode: rms`` (symmetric only; for incoherence-processed, ~Gaussian weights, QuIP §4) clips each grid at
    ``grid.RMS_CLIP``·RMS(w) instead of max|w|: scale = 2.4·RMS / 2^(b−1).

    Sample YAML::

        bits: 4
        group_size: 128
        sym: false
        mse_clip: false
        scale_dtype: float32   # float16: scales rounded to fp16 BEFORE coding, so an fp16-scale packed
                               # checkpoint dequantizes exactly to the fake-quantized weights;
                               # float16_min: also −scale·zero exactly fp16 (llama.cpp Q4_1's d and m)
        scale_mode: minmax     # rms: clip at 2.4·RMS (needs sym: true)
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int
    group_size: int = -1
    sym: bool = False
    mse_clip: bool = False
    scale_dtype: Literal["float32", "float16", "float16_min"] = "float32"
    scale_mode: Literal["minmax", "rms"] = "minmax"
    version: ConfigVersion = 1

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"bits must be 2..8, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"group_size must be -1 or 0 (per channel) or >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_scale_mode(self) -> GridConfig:
        if self.scale_mode == "rms" and not self.sym:
            raise ValueError("scale_mode 'rms' needs a symmetric grid (sym: true)")
        return self

    @property
    def maxq(self) -> int:
        """Largest code, 2^bits − 1."""
        return (1 << self.bits) - 1

    def effective_group_size(self, in_features: int) -> int:
        """Group size actually used: ``in_features`` for per-channel grids, else ``group_size``."""
        return in_features if self.group_size <= 0 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """ceil(in_features / group_size), counting a ragged last group."""
        return math.ceil(in_features / self.effective_group_size(in_features))


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Codes plus per-(row, group) affine grids for one linear weight of shape [out, in].

    Attributes:
        codes: uint8 [out, in], values in 0..2^bits − 1.
        scales: float32 [out, n_groups].
        zeros: float32 [out, n_groups], integer-valued zero points.
        bits: bits per code.
        group_size: effective group size (per channel → in_features).
        g_idx: int32 [in] group of each input column, or None for contiguous groups g(j) = j // group_size.
        stats: scalar diagnostics (proxy_loss, damp, ...); deterministic values only, never timings.
        transforms: for incoherence-processed weights (``quant.incoherence``), the small tensors (sign vectors,
            permutations, small orthogonal factors) that define U and V: the codes then hold Ŵ̃ ≈ U W Vᵀ and the
            layer computes y = Uᵀ Ŵ̃ V x. None for plain weights.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int
    g_idx: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    transforms: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be a 2-D uint8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}")
        out, n = self.codes.shape
        if self.group_size < 1:
            raise ValueError(f"group_size must be the effective size >= 1, got {self.group_size}")
        expected = (out, self.n_groups)
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != expected or t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 {expected}, got {t.dtype} {tuple(t.shape)}")
        if self.g_idx is None and self.n_groups != math.ceil(n / self.group_size):
            raise ValueError(f"{self.n_groups} groups do not match ceil({n} / {self.group_size}) for contiguous groups")
        if self.g_idx is not None and (tuple(self.g_idx.shape) != (n,) or self.g_idx.dtype != torch.int32):
            raise ValueError(f"g_idx must be int32 [{n}], got {self.g_idx.dtype} {tuple(self.g_idx.shape)}")

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def group_index(self) -> Tensor:
        """int64 [in]: the group g(j) of every input column (g_idx, or j // group_size)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat[:, j] = scales[:, g(j)] · (codes[:, j] − zeros[:, g(j)]), computed in float32, then cast."""
        g = self.group_index()
        W_hat = self.scales[:, g] * (self.codes.to(torch.float32) - self.zeros[:, g])
        return W_hat.to(dtype)
