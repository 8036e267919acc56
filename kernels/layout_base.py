"""What a packed layout is: the contract every entry of the registry (:mod:`kernels.layouts`) fulfils.

A layout turns one quantizer result (``quant.types.QuantizedWeight``, ``quant.icquant.ICQuantWeight`` …) into the
checkpoint tensors of one linear and back, names the module that runs them, says how its tensors count in the
stored-bits accounting and which serving export formats can hold it (and, for the others, the one-line reason).
The layout lives next to its module (``kernels.icq_linear``, ``kernels.bcq_linear`` …); :mod:`kernels.layouts`
registers it. Nothing here imports a layout module, so the modules can import this one without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from quant.incoherence import TransformKind

__all__ = ["EXPORT_FORMATS", "STORED_PARTS", "PackedLayout", "TransformSeed", "canonical_transforms"]

TransformSeed = tuple[int, TransformKind]
# the serving formats of ``tasks.export.EXPORTS`` (their ``name``); kernels/ cannot import tasks/, a test keeps
# the two lists equal
EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf")
# the parts of the stored-bits accounting (``kernels.layouts.stored_bits``); a tensor a layout does not place
# counts as "other"
STORED_PARTS = ("codes", "positions", "offsets", "grids", "other")


class PackedLayout:
    """One packed layout. Subclasses set the class attributes and override the methods whose defaults do not fit.

    ``name`` is the layer kind: the ``format`` metadata of a coded ``qlayer`` artifact and ``tasks.qlayer``'s
    ``layer_kind``. ``no_export`` is the reason for every format outside ``exports``, with ``{fmt}`` (the format's
    display name) and ``{method}`` (the build's method) filled in.

    The defaults cover a layout told by one metadata tensor (``meta_key``) whose tensors are ``keys``, packed by
    ``pack_fn`` and unpacked by ``unpack_fn`` into a dataclass with a ``stats`` field; override what differs.
    """

    name: ClassVar[str]
    module: ClassVar[type[nn.Module]]
    weight_type: ClassVar[type]
    meta_key: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    pack_fn: ClassVar[Any]  # staticmethod(q) -> tensors
    unpack_fn: ClassVar[Any]  # staticmethod(tensors) -> q
    parts: ClassVar[Mapping[str, str]] = {}
    exports: ClassVar[frozenset[str]] = frozenset()
    no_export: ClassVar[str] = "{method} layers have no {fmt} representation"

    # ---- recognising a layer ------------------------------------------------------------------------------
    def holds(self, q: Any) -> bool:
        """Whether quantizer result ``q`` is packed in this layout."""
        return isinstance(q, self.weight_type)

    def recognises(self, tensors: Mapping[str, Tensor]) -> bool:
        """Whether the packed tensors of one linear are in this layout (its metadata tensor is there)."""
        return self.meta_key in tensors

    def owns_key(self, key: str) -> bool:
        """Whether a checkpoint tensor suffix (``<linear>.<key>``) can belong to a linear in this layout."""
        return key in self.keys

    # ---- pack / unpack ------------------------------------------------------------------------------------
    def pack(self, q: Any, transform_seed: TransformSeed | None = None) -> dict[str, Tensor]:
        """The checkpoint tensors of one linear (names = the module's buffers), lossless; ``transform_seed``: the
        layer's (seed, kind) for layouts holding incoherence transforms (``canonical_transforms``)."""
        return type(self).pack_fn(q)

    def unpack(self, tensors: Mapping[str, Tensor], stats: dict[str, float] | None = None) -> Any:
        """Inverse of ``pack`` (the quantizer result, with ``stats`` reattached)."""
        return replace(type(self).unpack_fn(dict(tensors)), stats=dict(stats or {}))

    def build(self, tensors: dict[str, Tensor], bias: Tensor | None = None) -> nn.Module:
        """The module that runs the packed tensors."""
        return self.module.from_packed(tensors, bias=bias)  # type: ignore[attr-defined, no-any-return]

    # ---- what a stage needs of a layer ------------------------------------------------------------------
    def dequantize(self, q: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the packed layer applies, in the original basis."""
        return q.dequantize(torch.float32).to(dtype)  # type: ignore[no-any-return]

    def shape(self, q: Any) -> tuple[int, int]:
        """(out_features, in_features)."""
        return int(q.out_features), int(q.in_features)

    def bits(self, q: Any) -> int | float:
        """Code bits per weight as the checkpoint config records them (an int but for mixed layouts)."""
        return int(q.bits)

    def part(self, key: str) -> str:
        """Which stored-bits part (``STORED_PARTS``) a packed tensor counts in."""
        return self.parts.get(key, "other")

    def export_reason(self, fmt: str, method: str) -> str | None:
        """None when export format ``fmt`` (case-insensitive name of ``EXPORT_FORMATS``) can hold this layout in
        principle, else why not (one line)."""
        if fmt.lower() in self.exports:
            return None
        return self.no_export.format(fmt=fmt, method=method)


def canonical_transforms(
    transforms: Mapping[str, Tensor] | None, seed: TransformSeed | None = None
) -> dict[str, Tensor]:
    """The transform tensors in the current checkpoint layout (sign vectors bit-packed), whatever layout the
    qlayer artifact was written in (older ones hold fp32 signs). With the layer's ``seed`` (and transform kind),
    permutations and explicit factors are stored as that seed when it reproduces them exactly."""
    if not transforms:
        return {}
    from quant.incoherence import IncoherenceTransforms

    t = IncoherenceTransforms.from_dict(dict(transforms))
    return (t.with_seed(*seed) if seed is not None else t).to_dict()
