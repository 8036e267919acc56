"""Incoherence methods (quip, hadamard-gptq) through the unchanged quantize-model flow on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infra.errors import ConfigError
from infra.settings import Settings
from infra.store import open_store
from tests.flows.conftest import tiny_recipe

ROTATED = {
    "hadamard-gptq": {"method": "hadamard-gptq", "transform": {"seed": 3}},
    "quip": {"method": "quip", "sym": True, "scale_mode": "rms", "transform": {"rescale": True}},
}


def _check_packed_equals_derotated_fake_quant(out: dict, home: Settings, tiny_llama_dir: Path) -> None:
    from kernels.quant_linear import RotatedQuantLinear
    from quant.incoherence import dequantize_original
    from tasks.checkpoint import load_packed_model
    from tasks.models import load_model
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    store = open_store(settings=home)
    pack = store.get(out["stages"]["pack"]["key"])
    assert "incoherence" in pack.manifest.metadata["compressed_tensors_skipped"]
    assert pack.manifest.metadata["formats"] == ["native"]
    config = json.loads((pack.root / "native" / "config.json").read_text())
    kind = config["quantization_config"]["transform"]["kind"]
    assert kind in ("kron", "hadamard")
    from safetensors import safe_open

    with safe_open(str(pack.root / "native" / "model.safetensors"), framework="pt") as f:
        stored = {k.rpartition(".")[2] for k in f.keys()}  # noqa: SIM118
    if kind == "kron":  # QuIP: permutations and Haar factors are stored as the layer seed, never as matrices
        assert "tseed" in stored and not any(k.startswith(("perm_", "fac_")) for k in stored), sorted(stored)
    packed = load_packed_model(pack.root / "native")
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    index = json.loads(store.read_bytes(out["stages"]["quantize"]["key"], "index.json"))["layers"]
    fake = load_model(tiny_llama_dir)
    for name, entry in index.items():
        q = load_qlayer(ctx, entry["ref"])
        assert q.transforms is not None
        module = packed.get_submodule(name)
        assert isinstance(module, RotatedQuantLinear)
        assert torch.equal(module.dequantized_weight(), q.dequantize())  # packed Ŵ̃ is bit-exact
        W_fq = dequantize_original(q)
        torch.testing.assert_close(module.dequantized_weight_original(), W_fq, rtol=0, atol=1e-6)
        fake.get_submodule(name).weight.data.copy_(W_fq)
    ids = torch.randint(0, fake.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = packed(ids).logits, fake(ids).logits
    # online x → V x, Ŵ̃, y → Uᵀ y vs the dense de-rotated weight: fp32 rounding only (measured ~1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


@pytest.mark.slow
def test_rotation_methods_reuse_hessians_and_pack_exactly(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path
) -> None:
    from flows.quantize import quantize_model

    plain = quantize_model(str(tiny_llama_dir), tiny_recipe())
    ppl = {}
    for method, fields in ROTATED.items():
        out = quantize_model(str(tiny_llama_dir), tiny_recipe(**fields))
        hits = {stage: info["cache_hit"] for stage, info in out["stages"].items()}
        assert hits["calibration"] and hits["hessians"] and hits["eval-fp"], method
        assert not hits["quantize"] and not hits["pack"] and not hits["evaluate"], method
        for stage in ("calibration", "hessians"):
            assert out["stages"][stage]["key"] == plain["stages"][stage]["key"]
        _check_packed_equals_derotated_fake_quant(out, home, tiny_llama_dir)
        ppl[method] = out["metrics"]["ppl"]
        assert abs(out["metrics"]["ppl_delta_rel"]) < 0.5, (method, out["metrics"])
    # plain gptq W4 g32 vs the rotated ones on the tiny random model: all within a few % of fp
    assert all(p > 1 for p in ppl.values())


@pytest.mark.slow
def test_sequential_mode_with_rotations(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> None:
    """Sequential mode re-forwards blocks through the de-rotated fake-quantized weights."""
    from flows.quantize import quantize_model

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(mode="sequential", **ROTATED["hadamard-gptq"]))
    assert "hessians" not in out["stages"]
    assert abs(out["metrics"]["ppl_delta_rel"]) < 0.5, out["metrics"]


def test_unsupported_hadamard_size_fails_before_work(tmp_path: Path) -> None:
    """54 = 27·2 has no Hadamard construction: fallback 'error' refuses it naming size and fallback."""
    from tasks.quantize import check_transform_sizes
    from tests.helpers.models import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "odd", num_layers=1, intermediate=54)
    strict = tiny_recipe(method="hadamard-gptq", transform={"fallback": "error"}).quantize
    with pytest.raises(ConfigError, match=r"size 54 .*random_orthogonal"):
        check_transform_sizes(model_dir, strict)
    check_transform_sizes(model_dir, tiny_recipe(method="hadamard-gptq").quantize)  # fallback: fine
    check_transform_sizes(model_dir, tiny_recipe(method="quip", transform={"fallback": "error"}).quantize)  # kron


def test_recipe_fields_and_keys() -> None:
    plain = tiny_recipe().quantize
    assert "transform" not in plain.key_config() and "scale_mode" not in plain.key_config()
    quip = tiny_recipe(**ROTATED["quip"]).quantize
    assert quip.transform_kind() == "kron" and quip.key_config()["transform"]["rescale"] is True
    assert "act_order" not in quip.key_config()
    had = tiny_recipe(**ROTATED["hadamard-gptq"]).quantize
    assert had.transform_kind() == "hadamard"
    assert had.key_config() != tiny_recipe(method="hadamard-gptq").quantize.key_config()  # the seed is keyed
    with pytest.raises(ValueError, match="needs a symmetric grid"):
        tiny_recipe(scale_mode="rms")


def test_e8p_needs_input_widths_divisible_by_8(tmp_path: Path) -> None:
    """down_proj of a 54-wide MLP has 54 input columns: E8P (groups of 8) is refused before any work."""
    from tasks.method_checks import check_method_shapes
    from tests.helpers.models import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "odd", num_layers=1, intermediate=54)
    e8p = tiny_recipe(method="hadamard-e8p", bits=2).quantize
    with pytest.raises(ConfigError, match=r"groups of 8 input columns, but model.layers.0.mlp.down_proj has 54"):
        check_method_shapes(model_dir, e8p)
    check_method_shapes(build_tiny_llama(tmp_path / "even", num_layers=1), e8p)
