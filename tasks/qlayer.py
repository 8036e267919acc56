"""The kinds of quantized layer a ``qlayer`` artifact can hold, and what every stage needs from each.

* ``QuantizedWeight`` — codes + one affine grid per (row, group) (rtn, gptq, quip, hadamard-gptq);
* ``ICQuantWeight`` — codes, inlier and outlier grids, index-coded outlier positions (icquant-*);
* ``BCQLayer`` — GPTQT's merged pure binary coding (bit-planes + α', β'), with the layer's stats;
* ``MixedWeight`` — group-wise mixed precision: one affine part per bit-width (``quant.mixed``);
* ``E8PWeight`` — QuIP#'s E8P lattice codes (8 weights per 16-bit index) + row scales + transforms (hadamard-e8p).

ICQuant, binary-coded, mixed and E8P layers are recorded in their checkpoint layout (``kernels.icq_linear`` /
``kernels.bcq_linear``, lossless), so the artifact, the packed checkpoint and the fake-quantized weight are one
set of numbers. Stored bits are measured from the packed tensors' bytes (``stored_bits``), never from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.e8p import E8PWeight
from quant.gptqt import BinaryCodedWeight
from quant.icquant import ICQuantWeight
from quant.incoherence import TransformKind
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


@dataclass(frozen=True, eq=False)
class BCQLayer:
    """A GPTQT layer: the merged binary-coded weight (α', β' fp16-exact) and its deterministic stats."""

    weight: BinaryCodedWeight
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.weight.planes.shape[0])


LayerResult = QuantizedWeight | ICQuantWeight | BCQLayer | MixedWeight | E8PWeight


def layer_kind(q: LayerResult) -> str:
    if isinstance(q, ICQuantWeight):
        return "icquant"
    if isinstance(q, BCQLayer):
        return "bcq"
    if isinstance(q, MixedWeight):
        return "mixed"
    if isinstance(q, E8PWeight):
        return "e8p"
    return "affine"


def layer_shape(q: LayerResult) -> tuple[int, int]:
    """(out_features, in_features)."""
    if isinstance(q, BCQLayer):
        return int(q.weight.alpha.shape[0]), q.weight.in_features
    if isinstance(q, MixedWeight | E8PWeight):
        return q.out_features, q.in_features
    return int(q.codes.shape[0]), int(q.codes.shape[1])


def layer_bits(q: LayerResult) -> float:
    """Code bits per weight (b for grids and ICQuant, k bit-planes for binary coding, the column-weighted
    average for group-wise mixed precision)."""
    return q.avg_bits if isinstance(q, MixedWeight) else float(q.bits)


def fake_weight(q: LayerResult, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight the packed layer applies, in the original basis."""
    if isinstance(q, BCQLayer):
        return q.weight.dequantize(torch.float32).to(dtype)
    if isinstance(q, ICQuantWeight | MixedWeight):
        return q.dequantize(torch.float32).to(dtype)
    from quant.incoherence import dequantize_original

    return dequantize_original(q, dtype)


def native_tensors(q: LayerResult, transform_seed: tuple[int, TransformKind] | None = None) -> dict[str, Tensor]:
    """The checkpoint tensors of one linear in the native format (names = the reference module's buffers);
    ``transform_seed``: the layer's (seed, kind), see :func:`canonical_transforms`."""
    if isinstance(q, ICQuantWeight):
        from kernels.icq_linear import pack_icquant

        return pack_icquant(q)
    if isinstance(q, BCQLayer):
        from kernels.bcq_linear import pack_bcq

        return pack_bcq(q.weight)
    if isinstance(q, MixedWeight):
        from kernels.mixed_linear import pack_mixed

        return pack_mixed(q)
    if isinstance(q, E8PWeight):
        from dataclasses import replace

        from kernels.e8p_linear import pack_e8p

        return pack_e8p(replace(q, transforms=canonical_transforms(q.transforms, transform_seed) or None))
    from kernels.packing import pack_quantized_linear

    out = pack_quantized_linear(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.g_idx)
    out.update(canonical_transforms(q.transforms, transform_seed))  # su, sv, kron_v, tseed, rescale …
    return out


def canonical_transforms(
    transforms: dict[str, Tensor] | None, seed: tuple[int, TransformKind] | None = None
) -> dict[str, Tensor]:
    """The transform tensors in the current checkpoint layout (sign vectors bit-packed), whatever layout the
    qlayer artifact was written in (older ones hold fp32 signs). With the layer's ``seed`` (and transform kind),
    permutations and explicit factors are stored as that seed when it reproduces them exactly."""
    if not transforms:
        return {}
    from quant.incoherence import IncoherenceTransforms

    t = IncoherenceTransforms.from_dict(transforms)
    return (t.with_seed(*seed) if seed is not None else t).to_dict()


_CODES = {"qweight", "qweight2", "planes"}
_POSITIONS = {"pos_data"}
_OFFSETS = {"pos_offsets"}
_GRIDS = {"scales", "zeros", "oscales", "ozeros", "alpha", "beta"}
# what each bpw_* part of a layer counts (stored in the pack artifact's metadata next to layer_bits.json)
BPW_COUNTED = {
    "codes": "qweight / qweight2 / planes: the packed weight codes (E8P residual codes, binary-coding bit-planes)",
    "positions": "pos_data: the ICQuant index stream, B-bit gap remainders + 1-bit escape/stop bits, each stream "
    "byte-padded",
    "offsets": "pos_offsets: the int32 [2, tiles + 1] table locating each tile of R rows x L columns in both "
    "streams (what lets tiles decode in parallel)",
    "grids": "scales, zeros, oscales, ozeros, alpha, beta",
    "other": "every other packed tensor: qmeta / icqmeta / bcqmeta / e8pmeta (incl. B, L, R), g_idx, transforms",
    "position_overhead": "positions + offsets: the full cost of locating the outliers (ICQuant target <= 0.32)",
    "total": "codes + positions + offsets + grids + other",
}


def stored_bits(tensors: dict[str, Tensor], n_weights: int) -> dict[str, float]:
    """Measured bits per weight of one packed linear, from the tensors' bytes, split as ``BPW_COUNTED`` says:
    codes, outlier positions, offsets, grids and the rest; ``bpw_position_overhead`` = positions + offsets
    (not a separate part: ``bpw_total`` is the sum of the five parts)."""
    parts = {"codes": 0, "positions": 0, "offsets": 0, "grids": 0, "other": 0}
    from kernels.mixed_linear import part_key

    for name, t in tensors.items():
        nbits = 8 * t.numel() * t.element_size()
        name = part_key(name)  # a mixed layer's "b3_qweight" counts as codes
        table = (("codes", _CODES), ("positions", _POSITIONS), ("offsets", _OFFSETS), ("grids", _GRIDS))
        kinds = [k for k, names in table if name in names]
        parts[kinds[0] if kinds else "other"] += nbits
    out = {f"bpw_{k}": v / max(n_weights, 1) for k, v in parts.items()}
    out["bpw_total"] = sum(parts.values()) / max(n_weights, 1)
    out["bpw_position_overhead"] = (parts["positions"] + parts["offsets"]) / max(n_weights, 1)
    return out


def save_coded(q: ICQuantWeight | BCQLayer | MixedWeight | E8PWeight) -> tuple[dict[str, Tensor], dict[str, str]]:
    """qlayer payload tensors + safetensors metadata for the non-affine kinds (their lossless packed layout)."""
    return native_tensors(q), {"format": layer_kind(q), "bits": str(q.bits)}


def load_coded(tensors: dict[str, Tensor], meta: dict[str, str], stats: dict[str, float]) -> LayerResult:
    """Inverse of ``save_coded``."""
    from dataclasses import replace

    if meta.get("format") == "icquant":
        from kernels.icq_linear import unpack_icquant

        return replace(unpack_icquant(tensors), stats=stats)
    if meta.get("format") == "bcq":
        from kernels.bcq_linear import unpack_bcq

        return BCQLayer(unpack_bcq(tensors), stats)
    if meta.get("format") == "mixed":
        from kernels.mixed_linear import unpack_mixed

        return replace(unpack_mixed(tensors), stats=stats)
    if meta.get("format") == "e8p":
        from kernels.e8p_linear import unpack_e8p

        return replace(unpack_e8p(tensors), stats=stats)
    raise ValueError(f"unknown qlayer format {meta.get('format')!r}")
