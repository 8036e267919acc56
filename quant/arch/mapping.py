"""Module-name mappings for decoder-only transformer families: architecture as data.

A *linear group* is a set of linears that read the same input tensor (q/k/v share the attention input,
gate/up share the MLP input), so they share one Hessian H = Σ x xᵀ (ALGORITHMS.md §2). Every family quantpipe
accepts is one :class:`ArchMapping` below; the supported list is derived from them, and no module name is spelled
outside this file. The roles every family fills, in block order: ``attn_in`` (the attention input: q/k/v or a fused
qkv), ``o_in`` (o_proj), ``mlp_in`` (gate/up or a fused gate_up), ``down_in`` (down_proj).

What differs between families and is recorded here: fused linears (Phi-3), the norm convention (Gemma applies
``(1 + w)``), whether QuaRot's norm folding and V/O rotation have been derived for the family (``quarot``):
families without it refuse QuaRot in one line, and the mixture-of-experts layout (:class:`MoELayout`: where the
fused experts, the router and a shared expert live in memory and on disk, and which layers are sparse).

Mixture of experts: transformers 5 keeps a block's experts as two fused 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]); ``tasks.moe`` unfuses them into ``gate_proj``/``up_proj``/``down_proj``
linears per expert (``EXPERT_LINEARS``, the names checkpoints and vLLM use), so each expert is a pair of linear
groups (``expert3_mlp_in``, ``expert3_down_in``: no dots, the Hessian artifacts split their keys on the first dot)
with the Hessian of the tokens routed to it. The router and a
shared-expert gate stay in floating point. Groups therefore differ per layer (:meth:`ArchMapping.groups_for_layer`):
Qwen2/3-MoE can mix dense-MLP layers among sparse ones. Attention masks, sliding windows, soft-capping, q/k norms and
embedding scaling need no entry: blocks run with the keyword arguments the model's own forward passes them
(``tasks.driver.BlockStreamer.block_kwargs``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "GEMMA_FAMILY",
    "LLAMA_FAMILY",
    "MIXTRAL_FAMILY",
    "OLMOE_FAMILY",
    "PHI3_FAMILY",
    "QWEN2_MOE_FAMILY",
    "QWEN3_FAMILY",
    "QWEN3_MOE_FAMILY",
    "EXPERT_LINEARS",
    "ROLES",
    "ArchMapping",
    "LinearGroup",
    "MoELayout",
    "expert_group",
    "mapping_for",
    "pooled_group",
    "supported_architectures",
]


class LinearGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # e.g. "attn_in": the Hessian's name inside a block (no dots)
    linears: tuple[str, ...]  # module paths relative to the block, e.g. ("self_attn.q_proj", ...)
    role: str = ""  # attn_in/o_in/mlp_in/down_in when it differs from the name (experts, shared expert)

    @property
    def kind(self) -> str:
        """The group's role in the block (its place in the true-sequential order)."""
        return self.role or self.name


EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")  # an unfused expert's linears (tasks.moe.ExpertMLP)
ROLES = ("attn_in", "o_in", "mlp_in", "down_in")  # block order: a group's input depends on the roles before it
_EXPERT_GROUP = re.compile(r"^expert(\d+)_(mlp_in|down_in)$")


def expert_group(name: str) -> tuple[int, str] | None:
    """(expert index, role) of a per-expert group name such as ``expert3_down_in``; None for other groups."""
    m = _EXPERT_GROUP.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def pooled_group(role: str) -> str:
    """Name of the statistics pooled over every expert of a block for ``role`` (Σ over experts of H, x, n)."""
    return f"pooled_{role}"


class MoELayout(BaseModel):
    """Where a family keeps its experts. In memory (transformers 5) the experts of a block are one module with two
    fused 3-D parameters; on disk (what ``save_pretrained`` writes and the hub ships) they are per-expert linears,
    gate and up separate, sometimes under another module name (Mixtral's ``block_sparse_moe`` / ``w1 w3 w2``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: str = "mlp.experts"  # block-relative path of the fused experts module
    gate_up: str = "gate_up_proj"  # fused parameter [E, 2I, H]: gate rows, then up rows
    down: str = "down_proj"  # fused parameter [E, H, I]
    router: str = "mlp.gate"  # never quantized: its weight picks the experts
    # config keys naming the expert count, first present wins (hub Qwen3-MoE configs write num_experts,
    # transformers 5 saves it as num_local_experts)
    num_experts: tuple[str, ...] = ("num_experts", "num_local_experts")
    keep_fp: tuple[str, ...] = ()  # other block-relative modules kept in floating point (shared_expert_gate)
    shared_groups: tuple[LinearGroup, ...] = ()  # a shared expert's linears (ordinary, quantized)
    sparse_step: str | None = None  # config key: a layer is sparse when (i + 1) % step == 0
    dense_layers: str | None = None  # config key: layers with a dense MLP whatever the step
    # the checkpoint's names: per-expert tensors under ``disk_experts.{e}.`` (gate, up, down), and block-relative
    # prefixes renamed between memory and disk (memory prefix, disk prefix)
    disk_experts: str = "mlp.experts"
    disk_gate: str = "gate_proj"
    disk_up: str = "up_proj"
    disk_down: str = "down_proj"
    disk_renames: tuple[tuple[str, str], ...] = ()

    def fp_modules(self) -> tuple[str, ...]:
        """Block-relative modules that stay in floating point inside a sparse block."""
        return (self.router, *self.keep_fp)


class ArchMapping(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    architectures: tuple[str, ...]
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"  # block submodule returning (attn_output, weights); its output joins the residual
    mlp: str = "mlp"  # block submodule mapping the post-attention norm's output to the residual update
    value: str = "self_attn.v_proj"  # the linear whose output QuaRot rotates per head (V/O rotation)
    groups: tuple[LinearGroup, ...]
    family: str = "llama"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1.0 for Gemma
    quarot: bool = False  # QuaRot's folding/rotation derived and tested for this family
    moe: MoELayout | None = None  # mixture of experts: ``groups`` are then the groups of a dense layer

    def block_linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]

    def is_sparse(self, config: Mapping[str, Any], layer: int) -> bool:
        """Whether decoder layer ``layer`` has an experts MLP (read from the model's ``config.json``)."""
        moe = self.moe
        if moe is None or self.num_experts(config) <= 0:
            return False
        if moe.dense_layers is not None and layer in (config.get(moe.dense_layers) or ()):
            return False
        step = int(config.get(moe.sparse_step) or 1) if moe.sparse_step is not None else 1
        return (layer + 1) % step == 0

    def num_experts(self, config: Mapping[str, Any]) -> int:
        if self.moe is None:
            return 0
        return next((int(config[k] or 0) for k in self.moe.num_experts if k in config), 0)

    def groups_for_layer(self, config: Mapping[str, Any], layer: int) -> tuple[LinearGroup, ...]:
        """The linear groups of decoder layer ``layer``: ``groups`` for a dense layer; for a sparse one the
        attention groups, then per expert its gate_up and down groups, then the shared expert's groups."""
        if not self.is_sparse(config, layer):
            return self.groups
        moe = self.moe
        assert moe is not None
        attention = tuple(g for g in self.groups if g.kind in ("attn_in", "o_in"))
        gate, up, down = EXPERT_LINEARS
        experts = tuple(
            LinearGroup(name=f"expert{e}_{role}", linears=tuple(f"{moe.experts}.{e}.{x}" for x in linears), role=role)
            for e in range(self.num_experts(config))
            for role, linears in (("mlp_in", (gate, up)), ("down_in", (down,)))
        )
        return attention + experts + moe.shared_groups

    def group_of(self, linear: str) -> LinearGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)


_LLAMA_GROUPS = (
    LinearGroup(name="attn_in", linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup(name="o_in", linears=("self_attn.o_proj",)),
    LinearGroup(name="mlp_in", linears=("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup(name="down_in", linears=("mlp.down_proj",)),
)

LLAMA_FAMILY = ArchMapping(
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    groups=_LLAMA_GROUPS,
    quarot=True,
)
# q/k RMSNorms per head inside attention (not linears); QuaRot's online q/k Hadamard would sit after them: not derived.
QWEN3_FAMILY = ArchMapping(architectures=("Qwen3ForCausalLM",), groups=_LLAMA_GROUPS, family="qwen3")
# (1 + w) norms, pre/post feed-forward norms, attention soft-capping, sliding-window layers, scaled embeddings.
GEMMA_FAMILY = ArchMapping(
    architectures=("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"),
    groups=_LLAMA_GROUPS,
    family="gemma",
    norm_offset=1.0,
)
# Fused qkv_proj and gate_up_proj: one linear per group, so each still gets its input's Hessian.
PHI3_FAMILY = ArchMapping(
    architectures=("Phi3ForCausalLM",),
    groups=(
        LinearGroup(name="attn_in", linears=("self_attn.qkv_proj",)),
        LinearGroup(name="o_in", linears=("self_attn.o_proj",)),
        LinearGroup(name="mlp_in", linears=("mlp.gate_up_proj",)),
        LinearGroup(name="down_in", linears=("mlp.down_proj",)),
    ),
    family="phi3",
    value="self_attn.qkv_proj",
)

# Mixture of experts. Mixtral: every layer sparse, experts stored on disk as block_sparse_moe.experts.{e}.w1/w3/w2.
MIXTRAL_FAMILY = ArchMapping(
    architectures=("MixtralForCausalLM",),
    groups=_LLAMA_GROUPS,
    family="mixtral",
    moe=MoELayout(
        num_experts=("num_local_experts",),
        disk_experts="block_sparse_moe.experts",
        disk_gate="w1",
        disk_up="w3",
        disk_down="w2",
        disk_renames=(("mlp.gate", "block_sparse_moe.gate"),),
    ),
)
# Qwen2-MoE: a shared expert (an ordinary MLP, quantized) scaled by sigmoid(shared_expert_gate(x)) (H→1, kept fp);
# dense-MLP layers where mlp_only_layers / decoder_sparse_step say so.
QWEN2_MOE_FAMILY = ArchMapping(
    architectures=("Qwen2MoeForCausalLM",),
    groups=_LLAMA_GROUPS,
    family="qwen2_moe",
    moe=MoELayout(
        keep_fp=("mlp.shared_expert_gate",),
        shared_groups=(
            LinearGroup(
                name="shared_mlp_in",
                linears=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                role="mlp_in",
            ),
            LinearGroup(name="shared_down_in", linears=("mlp.shared_expert.down_proj",), role="down_in"),
        ),
        sparse_step="decoder_sparse_step",
        dense_layers="mlp_only_layers",
    ),
)
# Qwen3-MoE: no shared expert; q/k norms as Qwen3 (QuaRot not derived).
QWEN3_MOE_FAMILY = ArchMapping(
    architectures=("Qwen3MoeForCausalLM",),
    groups=_LLAMA_GROUPS,
    family="qwen3_moe",
    moe=MoELayout(sparse_step="decoder_sparse_step", dense_layers="mlp_only_layers"),
)
# OLMoE: every layer sparse, q/k norms over the whole projection.
OLMOE_FAMILY = ArchMapping(architectures=("OlmoeForCausalLM",), groups=_LLAMA_GROUPS, family="olmoe", moe=MoELayout())

_MAPPINGS = (
    LLAMA_FAMILY,
    QWEN3_FAMILY,
    GEMMA_FAMILY,
    PHI3_FAMILY,
    MIXTRAL_FAMILY,
    QWEN2_MOE_FAMILY,
    QWEN3_MOE_FAMILY,
    OLMOE_FAMILY,
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted({a for m in _MAPPINGS for a in m.architectures}))


def mapping_for(architectures: list[str] | tuple[str, ...]) -> ArchMapping:
    for mapping in _MAPPINGS:
        if any(a in mapping.architectures for a in architectures):
            return mapping
    raise ValueError(
        f"unsupported architecture {list(architectures)}; supported: {', '.join(supported_architectures())}"
    )
