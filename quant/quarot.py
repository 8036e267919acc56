"""QuaRot (Ashkboos et al. 2024, §3–4) — ALGORITHMS.md §5: rotations that leave the fp model's function unchanged
but remove activation outliers, so weights, activations and the KV cache quantize to 4 bits.

Conventions: activations are row vectors, a linear is y = x Wᵀ (W [out, in]). Each transform T is an
:class:`quant.incoherence.OrthogonalTransform` (randomized Hadamard ``H_n diag(s)/√n``; sizes with no Hadamard
construction use a seeded random orthogonal odd factor ⊗ H_2^k), and ``T.apply`` maps each row x ↦ T x.

1. Fold RMSNorm scales γ into the linears that read the normalised stream, W ← W diag(γ), then γ ← 1
   (rotation commutes with RMSNorm only for γ = 1). lm_head is untied from the embedding first.
2. R1 on the residual stream h ↦ R1 h:   E ← R1·E (rows), W ← W R1ᵀ on the input side of q,k,v,gate,up,lm_head,
   W ← R1 W (and b ← R1 b) on the output side of o_proj, down_proj.
3. V/O:  W_v ← (I ⊗ T_hd) W_v (per head, offline),  online x ↦ (T_heads ⊗ I) x before o_proj, and
   W_o ← W_o (T_heads ⊗ T_hd)ᵀ, so W_o' (T_heads ⊗ I)(I ⊗ T_hd) a = W_o a.
   R4:   online x ↦ T_ff x before down_proj, W_down ← W_down T_ffᵀ.
4. K: online after RoPE q ↦ T_hd q, k ↦ T_hd k (qᵀk unchanged), then K is quantized; V at v_proj's output.
5. Quantizers: activations per token symmetric (``kernels.actquant.ref``), KV asymmetric per group of the head dim
   (:func:`fake_quant_groups`).

All of this is exact in exact arithmetic; rotations run in float64. Only seeds (and the sizes, which come from the
model config) are stored: the transforms are rebuilt from them (:func:`build_transforms`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from quant.arch.mapping import ArchMapping
from quant.grid import _grid_from_range, dequantize_codes, quantize_codes
from quant.incoherence import IncoherenceConfig, OrthogonalTransform, check_transform_size, make_transform
from quant.types import ConfigVersion

__all__ = [
    "QUAROT_DTYPE",
    "QuaRotConfig",
    "QuaRotDims",
    "QuaRotTransforms",
    "build_transforms",
    "check_sizes",
    "fake_quant_groups",
    "rotate_block",
    "rotate_embedding",
    "rotate_lm_head",
]

QUAROT_DTYPE = torch.float64  # rotations are computed in fp64 and cast back to the checkpoint's dtype


class QuaRotConfig(BaseModel):
    """Which rotations to draw.

    Sample YAML::

        seed: 0                       # R1 and the online transforms are drawn from hashes of (seed, role)
        fallback: random_orthogonal   # sizes with no Hadamard matrix (e.g. 9 heads); "error" refuses them
        version: 1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    fallback: Literal["error", "random_orthogonal"] = "random_orthogonal"
    version: ConfigVersion = 1


class QuaRotDims(BaseModel):
    """Sizes of a decoder-only transformer that the rotations depend on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int


@dataclass(frozen=True, eq=False)
class QuaRotTransforms:
    """R1 (residual, size hidden), T_heads (across heads), T_hd (per head), T_ff (intermediate)."""

    R1: OrthogonalTransform
    heads: OrthogonalTransform
    head_dim: OrthogonalTransform
    ff: OrthogonalTransform

    def per_head(self, x: Tensor) -> Tensor:
        """x [..., h·hd] ↦ (I ⊗ T_hd) x."""
        lead, n = x.shape[:-1], x.shape[-1]
        hd = self.head_dim.n
        return self.head_dim.apply(x.reshape(*lead, n // hd, hd)).reshape(*lead, n)

    def across_heads(self, x: Tensor) -> Tensor:
        """x [..., h·hd] ↦ (T_heads ⊗ I) x: the online transform before o_proj."""
        lead, n = x.shape[:-1], x.shape[-1]
        h = self.heads.n
        y = self.heads.apply(x.reshape(*lead, h, n // h).transpose(-1, -2)).transpose(-1, -2)
        return y.reshape(*lead, n)


_ROLES = ("R1", "heads", "head_dim", "ff")


def _sizes(dims: QuaRotDims) -> dict[str, int]:
    return {"R1": dims.hidden, "heads": dims.n_heads, "head_dim": dims.head_dim, "ff": dims.intermediate}


def _generator(seed: int, role: str) -> torch.Generator:
    digest = hashlib.sha256(f"quarot:{seed}:{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _incoherence(cfg: QuaRotConfig) -> IncoherenceConfig:
    return IncoherenceConfig(kind="hadamard", fallback=cfg.fallback)


def check_sizes(dims: QuaRotDims, cfg: QuaRotConfig) -> None:
    """Raise ``HadamardSizeError`` naming the size and the random-orthogonal fallback before any work."""
    if dims.n_heads * dims.head_dim != dims.hidden:
        raise ValueError(f"QuaRot needs n_heads·head_dim = hidden ({dims.n_heads}·{dims.head_dim} ≠ {dims.hidden})")
    for role, n in _sizes(dims).items():
        try:
            check_transform_size(n, _incoherence(cfg))
        except ValueError as exc:
            raise type(exc)(f"QuaRot {role} transform: {exc}") from None


def build_transforms(dims: QuaRotDims, cfg: QuaRotConfig) -> QuaRotTransforms:
    """The four randomized Hadamard transforms, each a pure function of (seed, role, size)."""
    check_sizes(dims, cfg)
    icfg = _incoherence(cfg)
    made = {role: make_transform(n, icfg, _generator(cfg.seed, role)) for role, n in _sizes(dims).items()}
    return QuaRotTransforms(**made)


# ---- offline rotations of the weights ------------------------------------------------------------------------


def _input_side(W: Tensor, T: OrthogonalTransform) -> Tensor:
    """W ← W Tᵀ: the layer now reads T x."""
    return T.apply(W)


def _output_side(W: Tensor, apply: Callable[[Tensor], Tensor]) -> Tensor:
    """W ← T W (``apply`` maps each row x ↦ T x; used on the rows of Wᵀ): the layer now writes T y."""
    return apply(W.t()).t()


def rotate_embedding(E: Tensor, t: QuaRotTransforms) -> Tensor:
    """E [vocab, hidden] ↦ rows R1 e (the residual stream starts rotated)."""
    return t.R1.apply(E.to(QUAROT_DTYPE)).to(E.dtype)


def rotate_lm_head(W: Tensor, final_norm: Tensor, t: QuaRotTransforms) -> Tensor:
    """lm_head ← W diag(γ_final) R1ᵀ (the final norm's γ folded, then the R1 input side)."""
    W64 = W.to(QUAROT_DTYPE) * final_norm.to(QUAROT_DTYPE)[None, :]
    return _input_side(W64, t.R1).to(W.dtype)


def rotate_block(state: Mapping[str, Tensor], mapping: ArchMapping, t: QuaRotTransforms) -> dict[str, Tensor]:
    """Fold the block's two norms and apply R1, V/O and R4 to its tensors (names relative to the block).

    Groups (``mapping.groups``): attn_in and mlp_in read a normalised residual (fold γ, input side R1ᵀ);
    o_in and down_in write the residual (output side R1, bias too) and read an online-rotated input
    (T_heads ⊗ T_hd for o_proj, T_ff for down_proj). ``mapping.value`` is rotated per head on its output.
    Unknown tensors are refused: silently copying one would change the function.
    """
    out: dict[str, Tensor] = {}
    norms = {"attn_in": f"{mapping.input_norm}.weight", "mlp_in": f"{mapping.post_attention_norm}.weight"}
    handled = set(norms.values())
    for group in mapping.groups:
        for linear in group.linears:
            w_name, b_name = f"{linear}.weight", f"{linear}.bias"
            W = state[w_name].to(QUAROT_DTYPE)
            b = state[b_name].to(QUAROT_DTYPE) if b_name in state else None
            if group.name in norms:
                W = _input_side(W * state[norms[group.name]].to(QUAROT_DTYPE)[None, :], t.R1)
                if linear == mapping.value:
                    W = _output_side(W, t.per_head)
                    b = t.per_head(b) if b is not None else None
            elif group.name in ("o_in", "down_in"):
                if group.name == "o_in":
                    W = t.across_heads(t.per_head(W))  # W (T_heads ⊗ T_hd)ᵀ, row by row
                else:
                    W = _input_side(W, t.ff)
                W = _output_side(W, t.R1.apply)
                b = t.R1.apply(b) if b is not None else None
            else:
                raise ValueError(f"QuaRot does not know how to rotate linear group {group.name!r}")
            out[w_name] = W.to(state[w_name].dtype)
            handled.add(w_name)
            if b is not None:
                out[b_name] = b.to(state[b_name].dtype)
                handled.add(b_name)
    for name in norms.values():
        out[name] = torch.ones_like(state[name])
    unknown = sorted(set(state) - handled)
    if unknown:
        raise ValueError(f"QuaRot cannot rotate block tensors {unknown[:5]} (not in the architecture mapping)")
    return out


# ---- KV-cache quantizer ---------------------------------------------------------------------------------------


def fake_quant_groups(x: Tensor, bits: int, group_size: int, *, sym: bool = False, clip_ratio: float = 1.0) -> Tensor:
    """Quantize-dequantize x [..., d] in groups of ``group_size`` consecutive entries of the last dim.

    Asymmetric (QuaRot's KV cache): range [c·min(x, 0), c·max(x, 0)] with c = ``clip_ratio``,
    scale = range/(2^b − 1), zero = round(−min/scale), x̂ = scale·(clamp(round(x/scale) + zero, 0, 2^b−1) − zero).
    Symmetric: scale = c·max|x|/(2^(b−1) − 1), zero = 2^(b−1). Grids in fp32 (:mod:`quant.grid`); same dtype out.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"KV bits must be in [2, 8], got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"KV clip_ratio must be in (0, 1], got {clip_ratio}")
    d = x.shape[-1]
    if group_size <= 0 or d % group_size:
        raise ValueError(f"KV group_size {group_size} must divide the last dim {d}")
    g = x.float().reshape(-1, group_size)
    wmax = g.clamp_min(0).amax(dim=1) * clip_ratio
    wmin = g.clamp_max(0).amin(dim=1) * clip_ratio
    if sym:
        wmax = torch.maximum(wmax, -wmin)
    scale, zero = _grid_from_range(wmin, wmax, bits, sym)
    s, z = scale[:, None], zero[:, None]
    return dequantize_codes(quantize_codes(g, s, z, bits), s, z).reshape(x.shape).to(x.dtype)
