"""Mixture-of-experts blocks as per-expert linears: unfusing, checkpoint names, and experts that see few tokens.

transformers 5 keeps a sparse block's experts as one module with two fused 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]) and runs them with a per-expert loop (or a grouped matmul, the same numbers).
Quantization needs linears: :func:`unfuse_block` swaps the fused module for :class:`UnfusedExperts`, per expert
``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` modules whose weights are *views* of the fused slices (gate
rows, up rows) and whose forward is transformers' eager expert loop with the gate/up product computed as two row
blocks of the same matmul (bit-identical outputs on CPU, tested; on a GPU at most ULP-level, as any change of
matmul shape). Hessian hooks on an expert's linears see exactly the tokens routed to it: every expert gets its own
Hessian (``expertE_mlp_in``, ``expertE_down_in``), and the quantized modules (``QuantLinear`` …) replace these
linears like any other. The names are those checkpoints and vLLM give an expert's linears.

Checkpoints name experts differently from memory: ``save_pretrained`` and the hub write per-expert tensors
(Mixtral: ``block_sparse_moe.experts.E.w1/w3/w2``), newer tools the fused tensors.
:func:`tasks.weights.expert_entries` makes :class:`tasks.weights.WeightIndex` answer every name of the unfused
model from whichever layout the checkpoint has, reading one expert's byte range at a time.

Experts that see few calibration tokens (:func:`expert_hessian`): an expert routed fewer tokens than its input
width has a rank-deficient Hessian fitted to a handful of tokens (none at all for an expert never picked), so its
statistics are topped up to ``min_tokens = in_features`` tokens with the pooled statistics of every expert of
the block for that role (Σ over experts, rescaled): H = (H_e + (m − n_e)/n_pool · H_pool) / m. An expert with
enough tokens is untouched; one with none gets the pooled Hessian. The policy, the routed tokens and the pooled
share are recorded per expert linear in the quantize artifact (``experts.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant.arch import EXPERT_LINEARS, ArchMapping, expert_group, mapping_for, pooled_group
from tasks.weights import WeightIndex, expert_entries

__all__ = [
    "EXPERT_POLICY",
    "ExpertMLP",
    "expert_entries",
    "UnfusedExperts",
    "expert_hessian",
    "expert_report",
    "moe_export_reason",
    "native_plain_tensors",
    "pool_expert_stats",
    "pooled_stats_name",
    "unfuse_block",
    "unfuse_model",
]

EXPERT_POLICY = "pooled-top-up"  # experts below min_tokens = in_features are topped up with the pooled Hessian


class ExpertMLP(nn.Module):
    """One expert: ``gate_proj``, ``up_proj`` (H → I) and ``down_proj`` (I → H), as a dense MLP and as the
    checkpoints (and vLLM) name an expert's linears."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.gate_proj = gate
        self.up_proj = up
        self.down_proj = down


class UnfusedExperts(nn.Module):
    """The experts of one sparse block as per-expert linears (children ``0``, ``1``, …), same call signature and
    same arithmetic as transformers' fused experts module (its eager path)."""

    def __init__(self, experts: list[ExpertMLP], act_fn: Any) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.act_fn: Any
        self.__dict__["act_fn"] = act_fn  # parameter-free activation; not a child (children are the experts)

    def __getitem__(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit:
            e = int(row[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            expert = self[e]
            x = hidden_states[token_idx]
            out = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _linear_view(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` itself (a view of the fused parameter, no copy)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return lin


def unfuse_block(block: nn.Module, mapping: ArchMapping) -> bool:
    """Replace ``block``'s fused experts module by :class:`UnfusedExperts` (weights shared, meta stays meta);
    False when the block has no fused experts (a dense layer, or already unfused)."""
    moe = mapping.moe
    if moe is None:
        return False
    parent_name, _, child = moe.experts.rpartition(".")
    try:
        parent = block.get_submodule(parent_name) if parent_name else block
        fused = getattr(parent, child)
    except AttributeError:
        return False
    if not isinstance(fused, nn.Module) or isinstance(fused, UnfusedExperts):
        return False
    gate_up, down = getattr(fused, moe.gate_up, None), getattr(fused, moe.down, None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        raise ValueError(f"{type(fused).__name__} has no fused 3-D {moe.gate_up}/{moe.down}; the MoE mapping is wrong")
    if getattr(fused, "has_bias", False) or not getattr(fused, "has_gate", True):
        raise ValueError(f"{type(fused).__name__}: experts with biases or without a gate are not mapped")
    inter = gate_up.shape[1] // 2
    experts = [
        ExpertMLP(
            _linear_view(gate_up.data[e, :inter]), _linear_view(gate_up.data[e, inter:]), _linear_view(down.data[e])
        )
        for e in range(gate_up.shape[0])
    ]
    setattr(parent, child, UnfusedExperts(experts, fused.act_fn))
    return True


def unfuse_model(model: nn.Module, mapping: ArchMapping) -> int:
    """Unfuse the experts of every decoder block of a causal LM; returns how many blocks were sparse."""
    if mapping.moe is None:
        return 0
    return sum(unfuse_block(block, mapping) for block in model.get_submodule(mapping.blocks))  # type: ignore[attr-defined]


# ---- Hessians of experts ------------------------------------------------------------------------------------------
def pool_expert_stats(stats: dict[str, Any], block: nn.Module, groups: Any) -> None:
    """Complete one sparse block's statistics in place: an expert that saw no token gets zero statistics (n = 0),
    and ``pooled_mlp_in`` / ``pooled_down_in`` hold the sums over the block's experts (what a starved expert is
    topped up with, :func:`expert_hessian`; each expert's stats also point at them through ``pooled``)."""
    pooled: dict[str, Any] = {}  # GroupStats (tasks.driver), made as type(s)(): no import of the driver
    for g in groups:
        parsed = expert_group(g.name)
        if parsed is None:
            continue
        s = stats[g.name]
        if s.H is None:
            dim = int(block.get_submodule(g.linears[0]).in_features)  # type: ignore[arg-type]
            s.H = torch.zeros(dim, dim, dtype=torch.float64)
            s.x_sum = torch.zeros(dim, dtype=torch.float64)
        p = pooled.setdefault(pooled_group(parsed[1]), type(s)())
        p.H = s.H.clone() if p.H is None else p.H + s.H
        p.x_sum = s.x_sum.clone() if p.x_sum is None else p.x_sum + s.x_sum
        p.n += s.n
        s.pooled = p
    stats.update(pooled)


def pooled_stats_name(group: str) -> str | None:
    """The pooled statistics an expert group is topped up with (:func:`expert_hessian`); None for other groups."""
    parsed = expert_group(group)
    return pooled_group(parsed[1]) if parsed else None


def expert_hessian(
    group: str, H_sum: torch.Tensor, n: int, pooled: tuple[torch.Tensor, int] | None
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(H_sum, n, record) to quantize an expert linear with: its own statistics when it saw at least
    ``in_features`` tokens, else topped up to that many with the pooled statistics (``pooled`` = (Σ H, Σ n) over
    the block's experts of the group's role). ``record``: routed tokens and the pooled share, for the artifact.
    Groups that are not experts pass through."""
    if expert_group(group) is None:
        return H_sum, n, {}
    need = int(H_sum.shape[0])
    record = {"routed_tokens": float(n), "pooled_tokens": 0.0}
    if n >= need or pooled is None or pooled[1] == 0:
        if n == 0:
            raise ValueError(f"expert group {group} saw no calibration token and no expert of its block did")
        return H_sum, n, record
    H_pool, n_pool = pooled
    fill = need - n
    record["pooled_tokens"] = float(fill)
    f64 = torch.float64  # the top-up in float64 whatever the sums were read as (stored blocks are float32)
    return H_sum.to(f64) + H_pool.to(f64) * (fill / n_pool), need, record


def expert_report(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``experts.json`` of the quantize artifact: the policy, and per expert linear its routed and pooled tokens."""
    rows = {
        name: {"routed_tokens": int(v["routed_tokens"]), "pooled_tokens": int(v.get("pooled_tokens", 0))}
        for name, v in sorted(layers.items())
        if "routed_tokens" in v
    }
    return {
        "policy": EXPERT_POLICY,
        "min_tokens": "in_features of the linear",
        "topped_up": sorted(n for n, r in rows.items() if r["pooled_tokens"] > 0),
        "layers": rows,
    }


def moe_export_reason(model_path: Path, fmt: str) -> str | None:
    """Why a serving format is not written for a mixture-of-experts model (None: write it; always None for a
    dense model).

    compressed-tensors is written when the checkpoint already names every expert linear as the unfused model
    does (``mlp.experts.E.gate_proj/up_proj/down_proj``: Qwen2-MoE, Qwen3-MoE, OLMoE as ``save_pretrained`` and
    the hub store them): the exporter then copies the fp tensors (routers, shared-expert gate, norms) under their
    own names and writes each quantized expert under the per-expert names vLLM's fused-MoE loader maps, verified
    by compressed-tensors' decompressor like any linear. Mixtral's checkpoint names (``block_sparse_moe``,
    ``w1/w3/w2``), fused-on-disk experts, and the GPTQ and GGUF formats' MoE layouts are not written."""
    config_path = Path(model_path) / "config.json"
    try:
        mapping = mapping_for(json.loads(config_path.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return None
    moe = mapping.moe
    if moe is None:
        return None
    if fmt != "compressed-tensors":
        return f"{fmt}: no writer for {mapping.family} mixture-of-experts layers (experts are packed per expert)"
    if (
        moe.disk_renames
        or moe.disk_experts != moe.experts
        or (moe.disk_gate, moe.disk_up, moe.disk_down) != EXPERT_LINEARS
    ):
        return (
            f"{fmt}: {mapping.family} checkpoints name experts {moe.disk_experts}.E."
            f"{{{moe.disk_gate},{moe.disk_up},{moe.disk_down}}}; an export under those names is not written"
        )
    fused = f".{moe.experts}.{moe.gate_up}"
    if any(name.endswith(fused) for name in dict.keys(WeightIndex(Path(model_path)).entries)):
        return (
            f"{fmt}: this checkpoint stores {mapping.family} experts fused ({moe.experts}.{moe.gate_up}); not written"
        )
    return None


# ---- packed checkpoint ---------------------------------------------------------------------------------------------
def native_plain_tensors(model_path: Path, quantized: set[str]) -> dict[str, torch.Tensor] | None:
    """Every floating-point tensor of the unfused model (norms, routers, embeddings, unquantized experts …) under
    its in-memory name, read from the checkpoint: what the native packed checkpoint of an MoE model stores beside
    the quantized linears, so the loader (which unfuses before loading) finds each tensor where it expects it.
    None for a dense family, whose checkpoint names are already the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.models import model_construction

    config = AutoConfig.from_pretrained(model_path)
    mapping = mapping_for(config.architectures or [])
    if mapping.moe is None:
        return None
    weights = WeightIndex(Path(model_path))
    with model_construction(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfuse_model(model, mapping)
    out = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in model.state_dict():
        if name.removesuffix(".weight") in quantized:  # its packed tensors replace it; a bias stays
            continue
        if tied and name == f"{mapping.lm_head}.weight" and name not in weights:
            continue  # the loader ties it to the embeddings
        out[name] = weights.get(name)
    return out
