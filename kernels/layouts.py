"""The registry of packed layouts, and what dispatches on it: ``replace_linears``, ``stored_bits``, export reasons.

Every packed linear is in exactly one layout (:class:`kernels.layout_base.PackedLayout`): int-packed affine
grids, the same with incoherence transforms (rotated), ICQuant, GPTQT binary coding, group-wise mixed precision and
E8P lattice codes. Each layout module owns its pack/unpack, module class, stored-bits parts and export formats;
this module only lists them. Adding a layout is one new module (its ``PackedLayout`` subclass next to its torch
module) plus one line in ``LAYOUTS``. The model-level QuaRot runtime (online rotations, A/KV fake quantization) is
not a per-linear layout: ``tasks.quarot_runtime`` owns it and its export reason.

Order matters where two layouts could claim the same object: the specific ones (their own metadata tensor) come
first, the rotated affine layout before the plain one; the order is also the order of export reasons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kernels.bcq_linear import BCQLayout
from kernels.e8p_linear import E8PLayout
from kernels.icq_linear import ICQuantLayout
from kernels.layout_base import EXPORT_FORMATS, STORED_PARTS, PackedLayout
from kernels.mixed_linear import MixedLayout
from kernels.quant_linear import AffineLayout, RotatedLayout

__all__ = [
    "BPW_COUNTED",
    "EXPORT_FORMATS",
    "LAYOUTS",
    "export_reason",
    "is_packed_key",
    "layout_named",
    "layout_of",
    "layout_of_tensors",
    "replace_linears",
    "stored_bits",
]

LAYOUTS: tuple[PackedLayout, ...] = (
    ICQuantLayout(),
    BCQLayout(),
    E8PLayout(),
    MixedLayout(),
    RotatedLayout(),
    AffineLayout(),
)
_BY_NAME = {layout.name: layout for layout in LAYOUTS}
assert len(_BY_NAME) == len(LAYOUTS), "two layouts share a name"

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


def layout_named(name: str | None) -> PackedLayout:
    """The layout whose ``name`` (a coded qlayer artifact's ``format``) is ``name``."""
    try:
        return _BY_NAME[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown qlayer format {name!r}") from None


def layout_of(q: Any) -> PackedLayout:
    """The layout a quantizer result is packed in."""
    for layout in LAYOUTS:
        if layout.holds(q):
            return layout
    raise TypeError(f"no packed layout holds a {type(q).__name__}")


def layout_of_tensors(tensors: Mapping[str, Tensor]) -> PackedLayout:
    """The layout of one linear's packed tensors, told by its metadata tensor (qmeta, icqmeta, group_bits …)."""
    for layout in LAYOUTS:
        if layout.recognises(tensors):
            return layout
    raise ValueError(f"packed tensors {sorted(tensors)} are in no known layout (no qmeta/icqmeta/bcqmeta/…)")


def is_packed_key(key: str) -> bool:
    """Whether checkpoint suffix ``key`` (of ``<linear>.<key>``) is a packed tensor of some layout."""
    return any(layout.owns_key(key) for layout in LAYOUTS)


def stored_bits(tensors: Mapping[str, Tensor], n_weights: int) -> dict[str, float]:
    """Measured bits per weight of one packed linear, from the tensors' bytes, split as ``BPW_COUNTED`` says:
    codes, outlier positions, offsets, grids and the rest (each layout places its tensors); ``bpw_position_overhead``
    = positions + offsets (not a separate part: ``bpw_total`` is the sum of the five parts)."""
    layout = layout_of_tensors(tensors)
    parts = dict.fromkeys(STORED_PARTS, 0)
    for name, t in tensors.items():
        parts[layout.part(name)] += 8 * t.numel() * t.element_size()
    n = max(n_weights, 1)
    out = {f"bpw_{k}": v / n for k, v in parts.items()}
    out["bpw_total"] = sum(parts.values()) / n
    out["bpw_position_overhead"] = (parts["positions"] + parts["offsets"]) / n
    return out


def export_reason(layers: Iterable[Any], fmt: str, method: str) -> str | None:
    """Why export format ``fmt`` (display name; matched case-insensitively to ``EXPORT_FORMATS``) cannot hold a
    build whose quantizer results are ``layers``, from the first layout (registry order) that refuses it; None if
    every layout present can be exported in principle (the format's own checks still apply)."""
    if fmt.lower() not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)} (a new format goes into "
            "kernels.layout_base.EXPORT_FORMATS and the exports of the layouts it can hold)"
        )
    present = {layout_of(q).name for q in layers}
    for layout in LAYOUTS:
        if layout.name in present:
            reason = layout.export_reason(fmt, method)
            if reason is not None:
                return reason
    return None


def replace_linears(
    model: nn.Module,
    quantized: dict[str, dict[str, Tensor]],
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Swap ``nn.Linear`` submodules named in ``quantized`` (e.g. "model.layers.0.self_attn.q_proj") for the
    packed module of their layout (``layout_of_tensors``), built from their packed tensors.

    The Linear's bias is kept unless the dict has "bias". Placement: ``device`` if given, else the Linear's
    device; a Linear on the meta device (a skeleton built under ``torch.device("meta")``) gives the packed
    tensors' device, and its bias becomes a zero buffer of the same dtype for a later ``load_state_dict``.
    Returns the replaced names; with ``strict`` a missing or non-Linear name raises before anything is
    replaced (shape mismatches always raise, also before anything is replaced).
    """
    plan: list[tuple[str, nn.Module, str, nn.Module]] = []
    for name, tensors in quantized.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise KeyError(f"no submodule named {name!r}") from None
            continue
        if not isinstance(lin, nn.Linear):
            if strict:
                raise TypeError(f"{name!r} is {type(lin).__name__}, not nn.Linear")
            continue
        on_meta = lin.weight.is_meta
        dev = device if device is not None else (next(iter(tensors.values())).device if on_meta else lin.weight.device)
        t = {k: v.to(dev) for k, v in tensors.items()}
        bias = None
        if lin.bias is not None:
            bias = torch.zeros(lin.out_features, dtype=lin.bias.dtype) if lin.bias.is_meta else lin.bias.detach()
        try:
            q = layout_of_tensors(t).build(t, bias=bias)
        except ValueError as exc:  # which layer of the checkpoint, e.g. transforms that cannot be drawn again
            raise ValueError(f"{name!r}: {exc}") from None
        shape = (getattr(q, "in_features", None), getattr(q, "out_features", None))
        if shape != (lin.in_features, lin.out_features):
            raise ValueError(
                f"{name!r}: packed shape (in={shape[0]}, out={shape[1]}) does not match the Linear "
                f"(in={lin.in_features}, out={lin.out_features})"
            )
        parent_name, _, child = name.rpartition(".")
        plan.append((name, model.get_submodule(parent_name) if parent_name else model, child, q))
    for _, parent, child, q in plan:
        setattr(parent, child, q)
    return [p[0] for p in plan]
