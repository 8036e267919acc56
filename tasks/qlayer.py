"""The kinds of quantized layer a ``qlayer`` artifact can hold, and what every stage needs from each.

* ``QuantizedWeight`` — codes + one affine grid per (row, group) (rtn, gptq, quip, hadamard-gptq);
* ``ICQuantWeight`` — codes, inlier and outlier grids, index-coded outlier positions (icquant-*);
* ``BCQLayer`` — GPTQT's merged pure binary coding (bit-planes + α', β'), with the layer's stats;
* ``MixedWeight`` — group-wise mixed precision: one affine part per bit-width (``quant.mixed``);
* ``E8PWeight`` — QuIP#'s E8P lattice codes (8 weights per 16-bit index) + row scales + transforms (hadamard-e8p).

ICQuant, binary-coded, mixed and E8P layers are recorded in their checkpoint layout (``kernels.icq_linear`` /
``kernels.bcq_linear``, lossless), so the artifact, the packed checkpoint and the fake-quantized weight are one
set of numbers. Stored bits are measured from the packed tensors' bytes (``stored_bits``), never from a formula.

Everything here dispatches on the layout registry (:mod:`kernels.layouts`): a new layout needs no change here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.bcq_linear import BCQLayer
from kernels.layout_base import TransformSeed, canonical_transforms
from kernels.layouts import BPW_COUNTED, layout_named, layout_of, stored_bits
from quant.e8p import E8PWeight
from quant.icquant import ICQuantWeight
from quant.mixed import MixedWeight
from quant.types import QuantizedWeight

__all__ = [
    "BPW_COUNTED",
    "BCQLayer",
    "canonical_transforms",
    "LayerResult",
    "fake_weight",
    "layer_bits",
    "layer_kind",
    "layer_shape",
    "load_coded",
    "native_tensors",
    "save_coded",
    "stored_bits",
]

LayerResult = QuantizedWeight | ICQuantWeight | BCQLayer | MixedWeight | E8PWeight


def layer_kind(q: LayerResult) -> str:
    """The layer's layout name (``kernels.layouts``): affine, rotated, icquant, bcq, mixed, e8p."""
    return layout_of(q).name


def layer_shape(q: LayerResult) -> tuple[int, int]:
    """(out_features, in_features)."""
    return layout_of(q).shape(q)


def layer_bits(q: LayerResult) -> float:
    """Code bits per weight (b for grids and ICQuant, k bit-planes for binary coding, the column-weighted
    average for group-wise mixed precision)."""
    return float(layout_of(q).bits(q))


def fake_weight(q: LayerResult, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight the packed layer applies, in the original basis."""
    return layout_of(q).dequantize(q, dtype)


def native_tensors(q: LayerResult, transform_seed: TransformSeed | None = None) -> dict[str, Tensor]:
    """The checkpoint tensors of one linear in the native format (names = the reference module's buffers);
    ``transform_seed``: the layer's (seed, kind), see :func:`canonical_transforms`."""
    return layout_of(q).pack(q, transform_seed)


def save_coded(q: ICQuantWeight | BCQLayer | MixedWeight | E8PWeight) -> tuple[dict[str, Tensor], dict[str, str]]:
    """qlayer payload tensors + safetensors metadata for the non-affine kinds (their lossless packed layout)."""
    return native_tensors(q), {"format": layer_kind(q), "bits": str(q.bits)}


def load_coded(tensors: dict[str, Tensor], meta: dict[str, str], stats: dict[str, float]) -> LayerResult:
    """Inverse of ``save_coded``."""
    return layout_named(meta.get("format")).unpack(tensors, stats)  # type: ignore[no-any-return]
