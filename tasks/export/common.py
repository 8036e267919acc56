"""What every serving export shares: which builds are plain affine grids, the source tensors, the tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quant.types import QuantizedWeight
from tasks.qlayer import LayerResult
from tasks.recipe import QuantizeConfig

__all__ = ["ExportInputs", "affine_reason", "decoder_linear_names", "source_tensors"]


@dataclass(frozen=True)
class ExportInputs:
    """One build as the exporters see it: the base model dir, the scheme, the quantized layers, the runtime.

    ``qweights`` may read each layer from the store when it is asked for (``tasks.pack.StoredLayers``): writers
    and checks take one layer at a time from it and keep none, so an export of a 70B build holds one layer."""

    model_path: Path
    cfg: QuantizeConfig
    qweights: Mapping[str, LayerResult]
    runtime: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.model_path / "config.json").read_text())

    def affine(self) -> Mapping[str, QuantizedWeight]:
        """The layers as plain affine grids (call after ``affine_reason`` returned None), read as they are used."""
        return AffineLayers(self.qweights)

    def shapes(self) -> Mapping[str, LayerResult]:
        """The layers for checks of type, bit-width and shapes only: their tensors may be on the meta device (no
        values), so a 70B build's checks do not read every layer from the store once per check."""
        return LayerSkeletons(self.qweights) if hasattr(self.qweights, "skeleton") else self.qweights

    def affine_shapes(self) -> Mapping[str, QuantizedWeight]:
        """``shapes`` as plain affine grids (call after ``affine_reason`` returned None)."""
        return AffineLayers(self.shapes())


class _LayerView(Mapping[str, Any]):
    """A read-through view of a (possibly store-backed) layer mapping: names, length and ``in`` never read a layer
    (Mapping's default ``__contains__`` would, through ``__getitem__``)."""

    def __init__(self, layers: Any) -> None:
        self._layers = layers

    def __getitem__(self, name: str) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name: object) -> bool:
        return name in self._layers


class LayerSkeletons(_LayerView):
    """The skeletons (meta-device tensors) of a store-backed layer mapping (``tasks.pack.StoredLayers``)."""

    def __getitem__(self, name: str) -> LayerResult:
        return self._layers.skeleton(name)  # type: ignore[no-any-return]


class AffineLayers(_LayerView):
    """A view of a build's layers that checks each is a plain affine grid when it is read (no copy kept)."""

    def __getitem__(self, name: str) -> QuantizedWeight:
        q = self._layers[name]
        if not isinstance(q, QuantizedWeight):
            raise TypeError(f"{name} is not a plain affine-grid layer")
        return q


def affine_reason(inputs: ExportInputs, fmt: str) -> str | None:
    """None when the build is one plain affine scheme (codes + per-group scale/zero, no online transforms, one
    bit-width) that ``fmt`` can hold in principle, else why not (one line naming ``fmt``)."""
    from kernels.layouts import export_reason
    from tasks.quarot_runtime import runtime_export_reason

    cfg, qweights = inputs.cfg, inputs.shapes()
    reason = export_reason(qweights.values(), fmt, cfg.method)  # each packed layout says what it cannot go into
    if reason is not None:
        return reason
    if cfg.bitalloc is not None or len({q.bits for q in qweights.values()}) > 1:
        return f"mixed per-layer bit-widths have no single {fmt} scheme"
    if cfg.transform_kind() is not None:
        return f"{cfg.method} weights need the online incoherence transforms, which {fmt} cannot express"
    return runtime_export_reason(inputs.config, inputs.runtime, fmt)


def source_tensors(model_path: Path, skip: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the base checkpoint, in file order, except weights of the linears in ``skip``."""
    from safetensors import safe_open

    skip = skip or set()
    for f in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118
                if name.removesuffix(".weight") in skip and name.endswith(".weight"):
                    continue
                yield name, h.get_tensor(name)


def decoder_linear_names(model_path: Path) -> list[str]:
    """Names of the 2-D ``*.weight`` tensors inside decoder blocks (``.layers.<i>.``): the linears an engine's
    GPTQ/GGUF loader expects quantized."""
    from safetensors import safe_open

    out = []
    for f in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118
                if ".layers." in name and name.endswith(".weight") and len(h.get_slice(name).get_shape()) == 2:
                    out.append(name.removesuffix(".weight"))
    return sorted(out)
