"""Module-name mappings for decoder-only transformer families.

A *linear group* is a set of linears that read the same input tensor (q/k/v share the attention input,
gate/up share the MLP input), so they share one Hessian H = Σ x xᵀ (ALGORITHMS.md §2).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["LLAMA_FAMILY", "ArchMapping", "LinearGroup", "mapping_for"]


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

    def block_linears(self) -> list[str]:
        return [name for g in self.groups for name in g.linears]

    def group_of(self, linear: str) -> LinearGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)


LLAMA_FAMILY = ArchMapping(
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    groups=(
        LinearGroup(name="attn_in", linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup(name="o_in", linears=("self_attn.o_proj",)),
        LinearGroup(name="mlp_in", linears=("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup(name="down_in", linears=("mlp.down_proj",)),
    ),
)

_MAPPINGS = (LLAMA_FAMILY,)


def mapping_for(architectures: list[str] | tuple[str, ...]) -> ArchMapping:
    for mapping in _MAPPINGS:
        if any(a in mapping.architectures for a in architectures):
            return mapping
    supported = sorted({a for m in _MAPPINGS for a in m.architectures})
    raise ValueError(f"unsupported architecture {list(architectures)}; supported: {', '.join(supported)}")
