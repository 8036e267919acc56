"""k-quant GGUF files (tasks/export/kquant_gguf.py): llama-quantize's tensor-type mix, and files that transformers'
GGUF loader (its own header parser and block dequantizer) reads back to exactly our GPTQ weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant.kquant import KSPECS
from tasks.export.kquant_gguf import FTYPES, kquant_mix, quantize_mix, write_kquant_gguf
from tests.helpers.models import build_tiny_llama

LLAMA_7B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}


def test_mix_follows_llama_quantize_rules_on_llama_7b_shapes() -> None:
    """The rules of llama.cpp's llama_tensor_get_type_impl for a dense 32-layer llama (no fallbacks at 4096)."""
    q3 = kquant_mix("Q3_K_M", LLAMA_7B)
    assert q3["lm_head"] == "Q6_K" and q3["model.embed_tokens"] == "Q3_K"
    assert [q3[f"model.layers.{i}.self_attn.v_proj"] for i in (0, 1, 2, 31)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [q3[f"model.layers.{i}.mlp.down_proj"] for i in (0, 1, 2, 31)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert q3["model.layers.5.self_attn.o_proj"] == "Q4_K" and q3["model.layers.5.self_attn.q_proj"] == "Q3_K"
    q2 = kquant_mix("Q2_K", LLAMA_7B)
    assert q2["model.layers.9.self_attn.v_proj"] == "Q3_K" and q2["model.layers.9.mlp.down_proj"] == "Q3_K"
    assert q2["model.layers.9.self_attn.o_proj"] == "Q3_K" and q2["model.layers.9.mlp.up_proj"] == "Q2_K"
    q4 = kquant_mix("Q4_K_M", LLAMA_7B)
    more = [i for i in range(32) if q4[f"model.layers.{i}.mlp.down_proj"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # first/last eighth, every third
    assert all(q4[f"model.layers.{i}.self_attn.v_proj"] == ("Q6_K" if i in more else "Q4_K") for i in range(32))
    gqa = kquant_mix("Q2_K", {**LLAMA_7B, "num_key_value_heads": 8})
    assert gqa["model.layers.0.self_attn.v_proj"] == "Q4_K"


def test_mix_falls_back_on_rows_that_are_not_whole_super_blocks() -> None:
    smol = {**LLAMA_7B, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}  # fmt: skip
    mix = kquant_mix("Q3_K_M", smol)
    assert mix["model.embed_tokens"] == "Q8_0" and "lm_head" not in mix  # tied: output's Q6_K → Q8_0
    assert mix["model.layers.0.self_attn.v_proj"] == "Q5_1" and mix["model.layers.3.self_attn.v_proj"] == "Q5_0"
    assert mix["model.layers.3.self_attn.q_proj"] == "Q4_0" and mix["model.layers.3.mlp.down_proj"] == "Q4_K"
    with pytest.raises(ValueError, match="unknown k-quant file type"):
        kquant_mix("Q3_K_S", smol)


def _spd(n: int, seed: int) -> torch.Tensor:
    X = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X / (4 * n)


def _assert_reads_back(folder: Path, model, quantized: dict, config: dict) -> None:
    """transformers' GGUF loader reads ``folder/m.gguf`` to our dequantized weights bit for bit (q/k rows permuted
    back where the architecture permutes them), and computes the logits of ``model`` carrying those weights."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf")
    state = loaded.state_dict()
    for name, kw in quantized.items():
        assert torch.equal(state[f"{name}.weight"].to(torch.float32), kw.dequantize()), name
    mods = dict(model.named_modules())
    for name, kw in quantized.items():
        target = model.get_input_embeddings() if name == "model.embed_tokens" else mods[name]
        target.weight.data = kw.dequantize()
    ids = torch.randint(0, int(config["vocab_size"]), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ftype", sorted(FTYPES))
def test_kquant_gguf_loads_in_transformers_exactly(tmp_path: Path, ftype: str) -> None:
    """Hidden 256 so every tensor is a real k-quant (no legacy fallback); untied so token_embd and output differ."""
    import gguf

    from tasks.models import load_model

    src = build_tiny_llama(tmp_path / "src", hidden=256, intermediate=512, heads=4, kv_heads=1, tie_embeddings=False)
    config = json.loads((src / "config.json").read_text())
    model = load_model(src).float().eval()
    weights = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["model.embed_tokens"] = model.get_input_embeddings().weight.data
    hessians = {n: _spd(w.shape[1], i) for i, (n, w) in enumerate(sorted(weights.items()))}
    mix = kquant_mix(ftype, config)
    assert all(KSPECS[t].block == 256 for t in mix.values())
    quantized = quantize_mix(weights, mix, hessians, tied=False)
    out = tmp_path / "out"
    out.mkdir()
    info = write_kquant_gguf(out / "m.gguf", src, ftype, quantized, config)
    assert sum(info["tensor_types"].values()) == len(mix)

    reader = gguf.GGUFReader(str(out / "m.gguf"))
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{ftype}")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == mix["model.layers.1.mlp.down_proj"]
    assert types["output.weight"] == "Q6_K" and types["output_norm.weight"] == "F32"

    _assert_reads_back(out, model, quantized, config)


def test_qwen2_kquant_gguf_loads_in_transformers_exactly(tmp_path: Path) -> None:
    """Qwen2 (the real-releases family): GGUF architecture qwen2, q/k/v biases kept as F32, q/k rows not permuted
    (NeoX rotary); transformers' GGUF loader reads our weights back bit for bit and computes the same logits."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.export.kquant_gguf import kquant_reason
    from tasks.models import load_model
    from tests.helpers.models import build_tokenizer

    src = tmp_path / "qwen2"
    src.mkdir()
    tok = build_tokenizer(src)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    net = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases, so a dropped or misplaced bias shows in the logits
        for layer in net.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    net.save_pretrained(src, safe_serialization=True)
    config = json.loads((src / "config.json").read_text())
    assert kquant_reason(src, config) is None
    assert "sliding-window" in (kquant_reason(src, {**config, "use_sliding_window": True}) or "")

    model = load_model(src).float().eval()
    weights = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["model.embed_tokens"] = model.get_input_embeddings().weight.data
    hessians = {n: _spd(w.shape[1], i) for i, (n, w) in enumerate(sorted(weights.items()))}
    quantized = quantize_mix(weights, kquant_mix("Q3_K_M", config), hessians, tied=False)
    write_kquant_gguf(tmp_path / "m.gguf", src, "Q3_K_M", quantized, config)

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.1.attn_v.bias"] == "F32"

    _assert_reads_back(tmp_path, model, quantized, config)
