"""A packed checkpoint's non-persistent buffers (Gemma-3's ``embed_scale``) are recomputed when it is loaded.

They are not stored in safetensors, and ``load_packed_model`` materialises the model with ``to_empty``: left as
they were, they held uninitialised memory (Gemma-3-270M: embed_scale 1.2e13, hidden states inf, every token
predicted with probability 1/vocab, ppl = 262,144 for any quantized build).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.checkpoint import QUANT_METHOD, load_packed_model


def test_gemma3_embed_scale_and_logits_survive_packed_load(tmp_path: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=8,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "modules": []}  # no linear packed: plain load
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    loaded = load_packed_model(tmp_path)
    assert float(loaded.model.embed_tokens.embed_scale) == float(model.model.embed_tokens.embed_scale) == 8.0
    ids = torch.randint(0, 96, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
