"""Every mapped family quantizes end to end with the flagship method, nothing left in floating point inside the
blocks but norms, biases and routers (and Qwen2-MoE's shared-expert gate), every expert quantized with the tokens
routed to it, and GPTQ W4 beats RTN W4 on the logits (issue: real model releases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infra.settings import Settings
from infra.store import open_store
from quant.arch import ArchMapping, mapping_for
from tests.flows.conftest import tiny_recipe
from tests.helpers.models import FAMILY_CONFIGS, build_tiny_family


def _logits_error(out: dict, home: Settings, model_dir: Path, ids: torch.Tensor) -> float:
    from tasks.checkpoint import load_packed_model
    from tasks.models import load_model

    store = open_store(settings=home)
    pack = store.get(out["stages"]["pack"]["key"])
    packed = load_packed_model(pack.root / "native")
    with torch.no_grad():
        ref = load_model(model_dir)(ids).logits
        got = packed(ids).logits
    return float((got - ref).norm() / ref.norm())


def mapping_sparse_layers(mapping: ArchMapping, config: dict) -> int:
    return sum(mapping.is_sparse(config, i) for i in range(config["num_hidden_layers"]))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_quantizes_end_to_end(family: str, prefect_harness: None, home: Settings, tmp_path: Path) -> None:
    from flows.quantize import quantize_model
    from tasks.checkpoint import load_packed_model

    model_dir = build_tiny_family(tmp_path / family, family)
    gptq = quantize_model(str(model_dir), tiny_recipe())
    rtn = quantize_model(str(model_dir), tiny_recipe(method="rtn").model_copy(update={"name": "tiny-rtn"}))
    store = open_store(settings=home)
    index = json.loads(store.read_bytes(gptq["stages"]["quantize"]["key"], "index.json"))["layers"]
    packed = load_packed_model(store.get(gptq["stages"]["pack"]["key"]).root / "native")
    config = json.loads((model_dir / "config.json").read_text())
    mapping = mapping_for(config["architectures"])
    blocks = packed.get_submodule(mapping.blocks)
    n_blocks = config["num_hidden_layers"]
    kept = {f"{i}.{m}" for i in range(n_blocks) for m in (mapping.moe.fp_modules() if mapping.moe else ())}
    plain = [
        f"model.layers.{name}"
        for name, mod in blocks.named_modules()
        if isinstance(mod, torch.nn.Linear) and type(mod) is torch.nn.Linear and name not in kept
    ]
    assert plain == [], f"{family}: linears left in floating point: {plain}"
    fused = [n for n, p in blocks.named_parameters() if p.dim() > 2]
    assert fused == [], f"{family}: fused expert parameters left in floating point: {fused}"
    expected = {
        f"{mapping.blocks}.{i}.{linear}"
        for i in range(n_blocks)
        for g in mapping.groups_for_layer(config, i)
        for linear in g.linears
    }
    assert set(index) == expected
    assert len(index) == sum(1 for _ in blocks.named_modules() if hasattr(_[1], "qweight")) > 0
    if mapping.moe is not None:  # every expert quantized with its own routed tokens, recorded per expert linear
        experts = json.loads(store.read_bytes(gptq["stages"]["quantize"]["key"], "experts.json"))
        expert_linears = {n for n in expected if ".experts." in n}
        assert experts["policy"] == "pooled-top-up" and set(experts["layers"]) == expert_linears
        tokens = sum(r["routed_tokens"] for n, r in experts["layers"].items() if n.endswith("gate_proj"))
        calibration = 8 * 64  # tiny_recipe: 8 samples x 64 tokens, top-2 routing
        assert tokens == 2 * calibration * mapping_sparse_layers(mapping, config)
        hessian_groups = store.manifest(gptq["stages"]["hessians"]["key"]).metadata["groups"]
        assert {f"expert{e}_{r}" for e in range(4) for r in ("mlp_in", "down_in")} <= set(hessian_groups)
        pack_meta = store.manifest(gptq["stages"]["pack"]["key"]).metadata
        # compressed-tensors under the per-expert names vLLM maps, where the checkpoint uses them; else one line
        if family == "mixtral":
            assert pack_meta["formats"] == ["native"]
            assert "block_sparse_moe.experts.E.{w1,w3,w2}" in pack_meta["compressed_tensors_skipped"]
        else:
            assert pack_meta["formats"] == ["native", "compressed-tensors"], pack_meta.get("compressed_tensors_skipped")
            ct = store.get(gptq["stages"]["pack"]["key"]).root / "compressed-tensors"
            from safetensors import safe_open

            with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
                names = set(f.keys())
            assert {f"{n}.weight_packed" for n in expert_linears} <= names
            assert not any(n.removesuffix(".weight") in expert_linears for n in names)  # no fp expert copy left
            ignore = json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"]
            assert all(".experts." not in n for n in ignore)
        assert "no writer for" in pack_meta["gptq_skipped"]
    from safetensors.torch import load

    # text like the calibration text (the windows GPTQ saw; random token ids would measure something else)
    ids = load(store.read_bytes(gptq["stages"]["calibration"]["key"], "tokens.safetensors"))["input_ids"][:4]
    err_gptq = _logits_error(gptq, home, model_dir, ids)
    err_rtn = _logits_error(rtn, home, model_dir, ids)
    print(f"\n{family}: W4 logits error GPTQ {err_gptq:.4f}, RTN {err_rtn:.4f}")  # shown with -s
    assert err_gptq <= err_rtn, f"{family}: GPTQ W4 logits error {err_gptq:.4f} > RTN's {err_rtn:.4f}"


def test_quarot_refuses_families_it_was_not_derived_for(tmp_path: Path) -> None:
    from infra.errors import ConfigError
    from tasks.quarot import check_recipe_for_model
    from tasks.recipe import load_recipe

    model_dir = build_tiny_family(tmp_path / "phi3", "phi3")
    with pytest.raises(ConfigError, match="derived for the Llama family only, not for phi3"):
        check_recipe_for_model(load_recipe("quarot-w4a16"), model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["group", "block"])
def test_moe_true_sequential(scope: str, prefect_harness: None, home: Settings, tmp_path: Path) -> None:
    """The flagship recipe's mode (sequential, group scope) on Qwen2-MoE (experts, shared expert, a dense layer):
    each role's Hessians come from the quantized roles before it, every expert still gets its own tokens."""
    from flows.quantize import quantize_model

    model_dir = build_tiny_family(tmp_path / "qwen2_moe", "qwen2_moe")
    recipe = tiny_recipe(mode="sequential", sequential_scope=scope).model_copy(update={"name": f"tiny-seq-{scope}"})
    seq = quantize_model(str(model_dir), recipe)
    rtn = quantize_model(str(model_dir), tiny_recipe(method="rtn").model_copy(update={"name": "tiny-rtn"}))
    store = open_store(settings=home)
    experts = json.loads(store.read_bytes(seq["stages"]["quantize"]["key"], "experts.json"))
    routed = [r["routed_tokens"] for n, r in experts["layers"].items() if n.endswith("gate_proj")]
    assert len(routed) == 4 and sum(routed) == 2 * 8 * 64  # one sparse layer, top-2 over 8x64 tokens
    from safetensors.torch import load

    ids = load(store.read_bytes(seq["stages"]["calibration"]["key"], "tokens.safetensors"))["input_ids"][:4]
    err_seq = _logits_error(seq, home, model_dir, ids)
    err_rtn = _logits_error(rtn, home, model_dir, ids)
    print(f"\nqwen2_moe sequential ({scope}): W4 logits error GPTQ {err_seq:.4f}, RTN {err_rtn:.4f}")
    assert err_seq <= err_rtn, f"sequential ({scope}) GPTQ W4 logits error {err_seq:.4f} > RTN's {err_rtn:.4f}"
