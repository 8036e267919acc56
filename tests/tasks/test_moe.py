"""Mixture-of-experts blocks as per-expert linears (tasks.moe): the unfused experts compute exactly what
transformers' fused experts compute, the checkpoint serves every expert linear under its unfused name (per-expert
and fused layouts), the block streamer's outputs are the model's hidden states, each expert's Hessian is the Gram
matrix of exactly the tokens its router sends it, and starved experts are topped up with the pooled Hessian."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant.arch import mapping_for
from tests.helpers.models import FAMILY_CONFIGS, MOE_FAMILIES, build_tiny_family


def _model(family: str, tmp_path: Path, num_layers: int = 2):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path = build_tiny_family(tmp_path / family, family, num_layers=num_layers)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    return path, model


def _ids(n: int = 2, seq: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfused_experts_are_bit_identical_to_the_fused_forward(family: str, tmp_path: Path) -> None:
    from tasks.moe import UnfusedExperts, unfuse_model

    _, model = _model(family, tmp_path)
    mapping = mapping_for([FAMILY_CONFIGS[family][1]])
    assert mapping.moe is not None
    ids = _ids()
    block = model.get_submodule(f"{mapping.blocks}.0")
    fused = block.get_submodule(mapping.moe.experts)
    x = torch.randn(96, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    top_w, top_i = torch.rand(96, 2).softmax(-1), torch.stack([torch.randperm(4)[:2] for _ in range(96)])
    with torch.no_grad():
        ref_experts = fused(x, top_i, top_w)
        ref_logits = model(ids).logits
        fused_default = type(model).from_pretrained(tmp_path / family).eval()(ids).logits  # grouped_mm by default
    sparse = unfuse_model(model, mapping)
    assert sparse == (1 if family == "qwen2_moe" else 2)  # Qwen2-MoE layer 1 is a dense MLP (mlp_only_layers)
    unfused = block.get_submodule(mapping.moe.experts)
    assert isinstance(unfused, UnfusedExperts) and len(unfused) == 4
    assert unfused[3].gate_proj.weight.data_ptr() == fused.gate_up_proj[3].data_ptr()  # views, no copy
    with torch.no_grad():
        got_experts = unfused(x, top_i, top_w)
        got_logits = model(ids).logits
    assert torch.equal(got_experts, ref_experts)
    assert torch.equal(got_logits, ref_logits)
    assert torch.allclose(got_logits, fused_default, atol=1e-5)
    # the check can fail: one weight of one expert moved by 1e-4 changes the outputs
    with torch.no_grad():
        for e in range(4):
            unfused[e].down_proj.weight[0, 0] += 1e-4
        assert not torch.equal(model(ids).logits, ref_logits)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_weight_index_serves_unfused_names_from_per_expert_and_fused_checkpoints(family: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tasks.moe import unfuse_model
    from tasks.weights import WeightIndex

    path, model = _model(family, tmp_path)
    mapping = mapping_for([FAMILY_CONFIGS[family][1]])
    fused_dir = tmp_path / "fused"  # the in-memory (fused) names on disk, as newer tools write them
    fused_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused_dir / "model.safetensors"))
    (fused_dir / "config.json").write_text((path / "config.json").read_text())
    unfuse_model(model, mapping)
    expected = model.state_dict()
    for where in (path, fused_dir):
        index = WeightIndex(where)
        names = [n for n in expected if n in index or n != "lm_head.weight"]
        for name in names:
            assert name in index, f"{where.name}: {name} not served"
            got = index.get(name)
            assert list(got.shape) == list(index.entries[name][3])
            assert torch.equal(got, expected[name]), f"{where.name}: {name} differs"
    assert "model.layers.0.mlp.experts.4.gate_proj.weight" not in WeightIndex(path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_outputs_equal_the_models_hidden_states(family: str, tmp_path: Path) -> None:
    from tasks.driver import BlockStreamer

    path, model = _model(family, tmp_path, num_layers=3)
    ids = _ids(2, 64)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    streamer = BlockStreamer(path)
    hidden = streamer.embed(ids)
    for i in range(2):  # the last entry of hidden_states is after the final norm
        with streamer.loaded(streamer.block_name(i)) as block:
            hidden = streamer.run_block(block, hidden, micro_batch=1)
        err = float((hidden - ref[i + 1]).norm() / ref[i + 1].norm())
        assert err < 1e-6, f"{family} block {i}: {err:.2e}"


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_each_expert_hessian_is_the_gram_of_the_tokens_routed_to_it(family: str, tmp_path: Path) -> None:
    """Reference: route the MLP input with the router's own top-k, gather each expert's tokens by hand."""
    from tasks.driver import BlockStreamer, collect_block_hessians

    path, model = _model(family, tmp_path)
    mapping = mapping_for([FAMILY_CONFIGS[family][1]])
    ids = _ids(3, 40)
    captured: list[torch.Tensor] = []
    block_ref = model.get_submodule(f"{mapping.blocks}.0")
    handle = block_ref.mlp.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        h0 = model(ids, output_hidden_states=True).hidden_states[0]
    handle.remove()
    mlp_in = torch.cat(captured)
    with torch.no_grad():
        _, _, top_i = block_ref.mlp.gate(mlp_in)
    streamer = BlockStreamer(path)
    with streamer.loaded(streamer.block_name(0)) as block:
        groups = streamer.block_groups(block)
        stats, _ = collect_block_hessians(streamer, block, h0, micro_batch=1)
    names = [g.name for g in groups]
    assert [n for n in names if n.startswith("expert")] == [
        f"expert{e}_{r}" for e in range(4) for r in ("mlp_in", "down_in")
    ]
    assert all("." not in n for n in stats)
    total = 0
    for e in range(4):
        x = mlp_in[(top_i == e).any(-1)].double()
        s = stats[f"expert{e}_mlp_in"]
        assert s.n == x.shape[0]
        total += s.n
        if s.n:
            assert torch.allclose(s.H, x.T @ x, rtol=1e-5, atol=1e-4)  # float32 Gram products
        assert stats[f"expert{e}_down_in"].n == s.n
    assert total == mlp_in.shape[0] * 2  # top-2: every token reaches two experts
    assert stats["pooled_mlp_in"].n == total
    assert torch.allclose(stats["pooled_mlp_in"].H, sum(stats[f"expert{e}_mlp_in"].H for e in range(4)))
    if family == "qwen2_moe":  # the shared expert sees every token
        assert stats["shared_mlp_in"].n == mlp_in.shape[0]
        assert torch.allclose(
            stats["shared_mlp_in"].H, mlp_in.double().T @ mlp_in.double(), rtol=1e-5, atol=1e-4
        )  # float32 Gram products
    assert "gate" not in " ".join(g for grp in groups for g in grp.linears if "gate_proj" not in g)  # router never


def test_starved_experts_are_topped_up_with_the_pooled_hessian() -> None:
    from tasks.moe import expert_hessian

    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g, dtype=torch.float64)
    pool = (X.T @ X, 500)
    own = X[:5].T @ X[:5]
    # enough tokens (>= in_features): untouched
    H, n, rec = expert_hessian("expert1_mlp_in", X[:20].T @ X[:20], 20, pool)
    assert n == 20 and torch.equal(H, X[:20].T @ X[:20]) and rec == {"routed_tokens": 20.0, "pooled_tokens": 0.0}
    # 5 tokens: topped up to 16 with 11 tokens' worth of the pooled mean
    H, n, rec = expert_hessian("expert1_mlp_in", own, 5, pool)
    assert n == 16 and rec == {"routed_tokens": 5.0, "pooled_tokens": 11.0}
    assert torch.allclose(H, own + pool[0] * 11 / 500)
    assert torch.linalg.matrix_rank(H) == 16 > torch.linalg.matrix_rank(own)
    # never routed: the pooled mean Hessian
    H, n, rec = expert_hessian("expert2_down_in", torch.zeros(16, 16, dtype=torch.float64), 0, pool)
    assert n == 16 and torch.allclose(H / n, pool[0] / 500)
    # not an expert: passes through
    assert expert_hessian("attn_in", own, 5, pool) == (own, 5, {})
    with pytest.raises(ValueError, match="saw no calibration token"):
        expert_hessian("expert0_mlp_in", torch.zeros(16, 16, dtype=torch.float64), 0, (torch.zeros(16, 16), 0))


def test_layers_of_a_mixed_dense_and_sparse_model(tmp_path: Path) -> None:
    path = build_tiny_family(tmp_path / "q", "qwen2_moe", num_layers=2)
    config = json.loads((path / "config.json").read_text())
    mapping = mapping_for(config["architectures"])
    sparse = [g.name for g in mapping.groups_for_layer(config, 0)]
    dense = [g.name for g in mapping.groups_for_layer(config, 1)]
    assert dense == ["attn_in", "o_in", "mlp_in", "down_in"]
    assert sparse[:2] == ["attn_in", "o_in"] and sparse[-2:] == ["shared_mlp_in", "shared_down_in"]
    assert len(sparse) == 2 + 2 * 4 + 2
    assert mapping.moe is not None and mapping.moe.fp_modules() == ("mlp.gate", "mlp.shared_expert_gate")


def test_an_expert_that_sees_no_token_is_quantized_with_the_pooled_hessian(tmp_path: Path) -> None:
    """One calibration token, top-2 of 4 experts: two experts are never routed a token."""
    from quant.gptq import GPTQConfig, quantize_gptq
    from quant.hessian import finalize
    from quant.types import GridConfig
    from tasks.driver import BlockStreamer, collect_block_hessians
    from tasks.moe import expert_hessian

    path = build_tiny_family(tmp_path / "olmoe", "olmoe")
    streamer = BlockStreamer(path)
    hidden = streamer.embed(_ids(1, 1))
    with streamer.loaded(streamer.block_name(0)) as block:
        stats, _ = collect_block_hessians(streamer, block, hidden)
        W = block.get_submodule("mlp.experts.0.gate_proj").weight.detach().clone()
    counts = [stats[f"expert{e}_mlp_in"].n for e in range(4)]
    assert sorted(counts) == [0, 0, 1, 1]
    starved = counts.index(0)
    s = stats[f"expert{starved}_mlp_in"]
    assert torch.count_nonzero(s.H) == 0 and s.pooled is stats["pooled_mlp_in"] and s.pooled.n == 2
    H_sum, n, record = expert_hessian(f"expert{starved}_mlp_in", s.H, s.n, (s.pooled.H, s.pooled.n))
    assert n == 64 and record == {"routed_tokens": 0.0, "pooled_tokens": 64.0}
    assert torch.allclose(finalize(H_sum, n), finalize(s.pooled.H, s.pooled.n))
    q = quantize_gptq(W, finalize(H_sum, n), GPTQConfig(grid=GridConfig(bits=4, group_size=32)))
    assert torch.isfinite(q.dequantize(torch.float32)).all()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quarot_refuses_moe_families_in_one_line(family: str, tmp_path: Path) -> None:
    from infra.errors import ConfigError
    from tasks.quarot import check_recipe_for_model
    from tasks.recipe import load_recipe

    model_dir = build_tiny_family(tmp_path / family, family)
    with pytest.raises(ConfigError, match=f"derived for the Llama family only, not for {family}") as info:
        check_recipe_for_model(load_recipe("quarot-w4a16"), model_dir)
    assert "\n" not in str(info.value)
