"""A block forwarded by the driver computes what it computes inside transformers' own full forward.

Hessians are statistics of a block's inputs; before this test the driver ran every block with no attention mask, so
on a sliding-window model whose window is shorter than the calibration length the blocks' outputs differed from
the model's by 83–90 % (Mistral config, window 32, length 128) and nothing said so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.driver import BlockStreamer

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}


def _families() -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    gemma = {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}
    return {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
        "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),
        "gemma2-sliding-softcap": (Gemma2Config, Gemma2ForCausalLM, {**gemma, "attn_logit_softcapping": 50.0}),
        "gemma3-local-global": (Gemma3TextConfig, Gemma3ForCausalLM, {**gemma, "sliding_window_pattern": 2}),
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "mistral-sliding-32": (MistralConfig, MistralForCausalLM, {"sliding_window": 32}),
        "qwen2-sliding-layers": (
            Qwen2Config,
            Qwen2ForCausalLM,
            {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1},
        ),
    }


FAMILIES = [
    "llama",
    "mistral-sliding-32",
    "qwen2-sliding-layers",
    "qwen3",
    "phi3",
    "gemma2-sliding-softcap",
    "gemma3-local-global",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_equal_the_models_hidden_states(family: str, tmp_path: Path) -> None:
    config_cls, model_cls, extra = _families()[family]
    torch.manual_seed(0)
    config = config_cls(**TINY, **extra)
    model = model_cls(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    streamer = BlockStreamer(tmp_path)
    hidden = streamer.embed(ids)
    worst = 0.0
    for i in range(config.num_hidden_layers):
        with streamer.loaded(streamer.block_name(i)) as block:
            hidden = streamer.run_block(block, hidden, micro_batch=1)
        if i + 1 < config.num_hidden_layers:  # the last entry of hidden_states is after the final norm
            expected = ref[i + 1]
        else:
            with streamer.loaded(streamer.mapping.final_norm) as norm:
                hidden = norm(hidden)
            expected = ref[-1]
        worst = max(worst, float((hidden - expected).norm() / expected.norm()))
    assert worst < 1e-5, f"{family}: block outputs differ from transformers' forward by {worst:.2%}"


def test_a_mask_free_forward_would_have_been_wrong(tmp_path: Path) -> None:
    """The check above can fail: on the sliding-window model, dropping the mask changes the outputs."""
    config_cls, model_cls, extra = _families()["mistral-sliding-32"]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    model.save_pretrained(tmp_path)
    streamer = BlockStreamer(tmp_path)
    hidden = streamer.embed(torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(1)))
    with streamer.loaded(streamer.block_name(0)) as block, torch.no_grad():
        right = streamer.run_block(block, hidden)
        kwargs = dict(streamer.block_kwargs(block, 128), attention_mask=None)
        wrong = block(hidden, **kwargs)
        wrong = wrong[0] if isinstance(wrong, tuple) else wrong
    assert float((wrong - right).norm() / right.norm()) > 0.05
