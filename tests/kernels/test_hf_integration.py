"""A tiny HF Llama with every Linear swapped for QuantLinear equals the fake-quantized dense model exactly;
and the name hazard: transformers must not mistake our ``kernels`` package for Hugging Face's."""

from __future__ import annotations

import pytest
import torch

from kernels.layouts import replace_linears
from kernels.packing import dequantize_reference, pack_quantized_linear, round_scales_fp16
from kernels.quant_linear import QuantLinear

transformers = pytest.importorskip("transformers")


def _rtn(W: torch.Tensor, bits: int, g: int):
    """Asymmetric round-to-nearest per group of g input columns (local stand-in for quant.grid)."""
    N, K = W.shape
    G = -(-K // g)
    Wp = torch.nn.functional.pad(W, (0, G * g - K)).view(N, G, g)
    lo = Wp.amin(-1).clamp(max=0)
    hi = Wp.amax(-1).clamp(min=0)
    scales = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zeros = torch.round(-lo / scales)
    s = scales.repeat_interleave(g, 1)[:, :K]
    z = zeros.repeat_interleave(g, 1)[:, :K]
    codes = torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1).to(torch.uint8)
    return codes, scales, zeros


def test_transformers_does_not_detect_hf_kernels() -> None:
    from transformers.utils.import_utils import is_kernels_available

    # our distribution (quantpipe 0.x) provides `kernels`; its version must stay outside HF kernels' range
    assert not is_kernels_available()


def test_tiny_llama_quantlinear_equals_fake_quant() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,  # 96 = 1.5 * 64: a ragged last group for down_proj with g=64
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).eval()
    packed_model = LlamaForCausalLM(cfg).eval()
    packed_model.load_state_dict(dense.state_dict())
    packed = {}
    for name, mod in dense.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            bits = 3 if "mlp" in name else 4
            codes, scales, zeros = _rtn(mod.weight.detach(), bits, 64)
            packed[name] = pack_quantized_linear(codes, scales, zeros, bits, 64)
            W_fake = dequantize_reference(codes, round_scales_fp16(scales), zeros, 64)
            mod.weight.data.copy_(W_fake)
    replaced = replace_linears(packed_model, packed)
    assert len(replaced) == 2 * 7
    assert isinstance(packed_model.model.layers[1].mlp.down_proj, QuantLinear)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(packed_model(ids).logits, dense(ids).logits, rtol=0, atol=0)
