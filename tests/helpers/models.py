"""Tiny random checkpoints of every mapped family built from a config (no hub): real HF dirs that transformers
loads."""

from __future__ import annotations

from pathlib import Path

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Quantization maps weights to a small grid of levels. "
    "The capital of France is Paris. Hessians guide the rounding of each column. "
)


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory on a small corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie_embeddings: bool = True,
) -> Path:
    """Save a random LlamaForCausalLM + tokenizer to ``out_dir`` (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# Tiny random configs of every family quantpipe maps (quant/arch/mapping.py), with the features that make each
# family different switched on: sliding windows shorter than the calibration length, soft-capping, q/k norms,
# fused linears, local/global attention layers.
FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 32}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 32}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
    ),
    # mixtures of experts: 4 experts, top-2; Qwen2-MoE with a shared expert and a dense-MLP layer (layer 1)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [1],
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 24},
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
}
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def build_tiny_family(out_dir: Path, family: str, *, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a random model of ``family`` (a key of FAMILY_CONFIGS) + tokenizer to ``out_dir`` (idempotent)."""
    import torch
    import transformers

    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config_name, model_name, extra = FAMILY_CONFIGS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )
    getattr(transformers, model_name)(cfg).eval().save_pretrained(out_dir, safe_serialization=True)
    return out_dir
