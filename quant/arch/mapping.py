"""Module-name mappings for decoder-only transformer families: architecture as data.

A *linear group* is a set of linears that read the same input tensor (q/k/v share the attention input,
gate/up share the MLP input), so they share one Hessian H = Σ x xᵀ (ALGORITHMS.md §2). Every family quantpipe
accepts is one :class:`ArchMapping` below; the supported list is derived from them, and no module name is spelled
outside this file. The roles every family fills, in block order: ``attn_in`` (the attention input: q/k/v or a fused
qkv), ``o_in`` (o_proj), ``mlp_in`` (gate/up or a fused gate_up), ``down_in`` (down_proj).

What differs between families and is recorded here: fused linears (Phi-3), the norm convention (Gemma applies
``(1 + w)``), and whether QuaRot's norm folding and V/O rotation have been derived for the family (``quarot``):
families without it refuse QuaRot in one line. Attention masks, sliding windows, soft-capping, q/k norms and
embedding scaling need no entry: blocks run with the keyword arguments the model's own forward passes them
(``tasks.driver.BlockStreamer.block_kwargs``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = [
    "GEMMA_FAMILY",
    "LLAMA_FAMILY",
    "PHI3_FAMILY",
    "QWEN3_FAMILY",
    "ArchMapping",
    "LinearGroup",
    "mapping_for",
    "supported_architectures",
]


class LinearGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # e.g. "attn_in": the Hessian's name inside a block
    linears: tuple[str, ...]  # module paths relative to the block, e.g. ("self_attn.q_proj", ...)


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

    def block_linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]

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

_MAPPINGS = (LLAMA_FAMILY, QWEN3_FAMILY, GEMMA_FAMILY, PHI3_FAMILY)


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted({a for m in _MAPPINGS for a in m.architectures}))


def mapping_for(architectures: list[str] | tuple[str, ...]) -> ArchMapping:
    for mapping in _MAPPINGS:
        if any(a in mapping.architectures for a in architectures):
            return mapping
    raise ValueError(
        f"unsupported architecture {list(architectures)}; supported: {', '.join(supported_architectures())}"
    )
