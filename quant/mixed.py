"""Group-wise mixed precision (ALGORITHMS.md §8, "per group"): each contiguous column group of a layer has its own
bit-width, chosen by the bit allocator from Hessian sensitivities (SliM-LLM-style salience: groups that meet
large activations — large H_jj — get more bits).

Why column groups: the Hessian's diagonal varies per *input* channel, so that is where sensitivity differs within
a layer; and GPTQ's error feedback runs along columns, so the sweep simply rounds each column on its group's grid
(``quant.gptq.quantize_gptq(..., group_bits=...)``), compensating across groups of different widths.

Storage: ``MixedWeight`` splits the layer by bit-width into plain ``QuantizedWeight`` parts over the columns of
the groups with that width (in column order, so every part keeps contiguous groups, a ragged last group last).
The packed layer is one ordinary low-bit matrix per width, and y = Σ_b Ŵ_b x[cols_b] runs on the existing
kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.grid import fit_group_grids
from quant.types import GridConfig, QuantizedWeight

__all__ = ["MixedWeight", "check_group_bits", "fit_mixed_group_grids", "group_columns", "split_by_bits"]


def check_group_bits(group_bits: Tensor | Sequence[int], n_groups: int, name: str = "layer") -> Tensor:
    """``group_bits`` as int64 [n_groups] with every width in 2..8 (a clear error otherwise)."""
    gb = torch.as_tensor(group_bits, dtype=torch.int64).flatten()
    if gb.numel() != n_groups:
        raise ValueError(f"{name!r}: {gb.numel()} group bit-widths for {n_groups} groups")
    if gb.numel() and not bool(((gb >= 2) & (gb <= 8)).all()):
        raise ValueError(f"{name!r}: group bit-widths must be in 2..8, got {sorted(set(gb.tolist()))}")
    return gb


def fit_mixed_group_grids(W: Tensor, cfg: GridConfig, group_bits: Tensor) -> tuple[Tensor, Tensor]:
    """Grids of every (row, group), group g fitted at ``group_bits[g]`` bits (else as ``fit_group_grids``)."""
    scales = zeros = None
    for b in sorted(set(group_bits.tolist())):
        s, z = fit_group_grids(W, cfg.model_copy(update={"bits": int(b)}))
        if scales is None or zeros is None:
            scales, zeros = s, z
        else:
            sel = (group_bits == b).to(s.device)
            scales[:, sel], zeros[:, sel] = s[:, sel], z[:, sel]
    assert scales is not None and zeros is not None
    return scales, zeros


def group_columns(group_bits: Tensor, group_size: int, in_features: int, bits: int) -> Tensor:
    """int64: the input columns whose group has ``bits`` bits, ascending."""
    g = torch.arange(in_features) // group_size
    return torch.nonzero(group_bits.cpu()[g] == bits).flatten()


@dataclass(frozen=True, eq=False)
class MixedWeight:
    """A layer whose column groups have different widths: ``parts[b]`` holds the columns of the b-bit groups.

    Attributes:
        group_bits: int64 [n_groups], the width of every contiguous group of ``group_size`` columns.
        parts: b → QuantizedWeight over ``group_columns(group_bits, group_size, in_features, b)``.
        stats: deterministic diagnostics of the whole layer (proxy losses of the merged weight).
    """

    group_bits: Tensor
    group_size: int
    in_features: int
    parts: dict[int, QuantizedWeight]
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        G = -(-self.in_features // self.group_size)
        check_group_bits(self.group_bits, G)
        widths = sorted(set(self.group_bits.tolist()))
        if sorted(self.parts) != widths:
            raise ValueError(f"parts {sorted(self.parts)} do not match the group widths {widths}")
        rows = {p.out_features for p in self.parts.values()}
        if len(rows) != 1:
            raise ValueError(f"parts disagree on out_features: {sorted(rows)}")
        for b, p in self.parts.items():
            cols = self.columns(b)
            if p.bits != b or p.in_features != cols.numel() or p.group_size != self.group_size or p.g_idx is not None:
                raise ValueError(f"the {b}-bit part must be [out, {cols.numel()}] at {b} bits with contiguous groups")

    @property
    def bits(self) -> int:
        """The widest code (what a uniform container would need); ``avg_bits`` is what is stored."""
        return int(self.group_bits.max())

    @property
    def out_features(self) -> int:
        return next(iter(self.parts.values())).out_features

    @property
    def avg_bits(self) -> float:
        """Code bits per weight, Σ_b b · |cols_b| / in_features."""
        return sum(b * self.columns(b).numel() for b in self.parts) / self.in_features

    def columns(self, bits: int) -> Tensor:
        return group_columns(self.group_bits, self.group_size, self.in_features, bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ [out, in]: every part's dequantized columns put back in place (float32, then cast)."""
        some = next(iter(self.parts.values()))
        W = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=some.codes.device)
        for b, p in self.parts.items():
            W[:, self.columns(b).to(W.device)] = p.dequantize(torch.float32)
        return W.to(dtype)


def split_by_bits(qw: QuantizedWeight, group_bits: Tensor) -> MixedWeight:
    """Split a weight quantized with per-group widths (contiguous groups, codes of group g < 2^group_bits[g])."""
    if qw.g_idx is not None:
        raise ValueError("group-wise mixed precision needs contiguous (static) groups, not g_idx")
    gb = check_group_bits(group_bits, qw.n_groups)
    parts = {}
    for b in sorted(set(gb.tolist())):
        cols = group_columns(gb, qw.group_size, qw.in_features, b).to(qw.codes.device)
        groups = torch.nonzero(gb == b).flatten().to(qw.codes.device)
        codes = qw.codes[:, cols]
        if codes.numel() and int(codes.max()) >= 1 << b:
            raise ValueError(f"codes of the {b}-bit groups exceed {b} bits")
        parts[b] = QuantizedWeight(
            codes=codes.contiguous(),
            scales=qw.scales[:, groups].contiguous(),
            zeros=qw.zeros[:, groups].contiguous(),
            bits=b,
            group_size=qw.group_size,
        )
    return MixedWeight(gb, qw.group_size, qw.in_features, parts, dict(qw.stats))
