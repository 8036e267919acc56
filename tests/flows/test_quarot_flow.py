"""QuaRot through the unchanged quantize-model flow on a tiny random Llama (tied embeddings, GQA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from infra.errors import ConfigError
from infra.settings import Settings
from infra.store import open_store
from tasks.recipe import Recipe
from tests.flows.conftest import tiny_recipe

RUNTIME = {"activations": {"bits": 4, "clip_ratio": 0.9}, "kv_cache": {"bits": 4, "group_size": 8, "clip_ratio": 0.95}}


def plain_recipe(**extra: object) -> Recipe:
    """GPTQ W4 per-channel sym; no compressed-tensors export (per-channel grids differ in width across layers)."""
    data = tiny_recipe(bits=4, group_size=-1, sym=True).model_dump(mode="json")
    data.update({"pack": {"compressed_tensors": False}, **extra})
    return Recipe.model_validate(data)


def quarot_recipe(**extra: object) -> Recipe:
    fields: dict[str, object] = {"name": "tiny-quarot", "rotation": {"kind": "quarot", "seed": 1}, **RUNTIME}
    return plain_recipe(**{**fields, **extra})


def _fake_quantized_rotated_model(out: dict, home: Settings) -> torch.nn.Module:
    """The rotated fp checkpoint with the quantizer's fake-quantized weights and the same runtime, in memory."""
    from quant.incoherence import dequantize_original
    from tasks.models import load_model
    from tasks.quantize import load_qlayer
    from tasks.quarot import install_runtime
    from tasks.stage import StageContext

    store = open_store(settings=home)
    rotated = store.get(out["rotated_ref"])
    model_dir = rotated.file("model/config.json").parent
    model = load_model(model_dir)
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    index = json.loads(store.read_bytes(out["stages"]["quantize"]["key"], "index.json"))["layers"]
    for name, entry in index.items():
        model.get_submodule(name).weight.data.copy_(dequantize_original(load_qlayer(ctx, entry["ref"])))
    install_runtime(model, json.loads((model_dir / "config.json").read_text()), out["runtime"])
    return model


@pytest.mark.slow
def test_quarot_flow_keys_and_packed_logits(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> None:
    from flows.quantize import quantize_model
    from tasks.checkpoint import load_packed_model

    plain = quantize_model(str(tiny_llama_dir), plain_recipe())
    recipe = quarot_recipe()
    out = quantize_model(str(tiny_llama_dir), recipe)
    hits = {stage: info["cache_hit"] for stage, info in out["stages"].items()}
    assert hits["calibration"] and hits["eval-fp"] and not hits["hessians"] and not hits["quantize"]
    assert out["stages"]["calibration"]["key"] == plain["stages"]["calibration"]["key"]
    for stage in ("hessians", "quantize", "pack"):  # Hessians of the rotated model: their own keys
        assert out["stages"][stage]["key"] != plain["stages"][stage]["key"], stage
    store = open_store(settings=home)
    rotated = [r for r in store.list("rotated-model")]
    assert len(rotated) == 1
    pack = store.get(out["stages"]["pack"]["key"])
    assert pack.manifest.metadata["formats"] == ["native"]
    config = json.loads((pack.root / "native" / "config.json").read_text())
    assert config["quantpipe_quarot"]["seed"] == 1 and config["tie_word_embeddings"] is False
    assert config["quantization_config"]["runtime"] == recipe.runtime_config()
    packed = load_packed_model(pack.root / "native")
    fake = _fake_quantized_rotated_model({**out, "rotated_ref": rotated[0], "runtime": recipe.runtime_config()}, home)
    ids = torch.randint(0, fake.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = packed(ids).logits, fake(ids).logits
    # same weights, same online transforms and A4/KV4 quantizers: fp32 rounding only (measured ~1e-6 relative)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert out["metrics"]["ppl"] > 1 and abs(out["metrics"]["ppl_delta_rel"]) < 1.0, out["metrics"]
    # one part of the runtime at a time (benchmarks/quarot_budget.py): the KV quantizer alone, A4 left out
    kv_only = {"kv_cache": recipe.runtime_config()["kv_cache"]}  # type: ignore[index]
    packed_kv = load_packed_model(pack.root / "native", runtime_parts={"kv_cache"})
    fake_kv = _fake_quantized_rotated_model({**out, "rotated_ref": rotated[0], "runtime": kv_only}, home)
    with torch.no_grad():
        got_kv, want_kv = packed_kv(ids).logits, fake_kv(ids).logits
    torch.testing.assert_close(got_kv, want_kv, rtol=0, atol=1e-4 * float(want_kv.abs().max()))
    assert (got_kv - got).abs().max() > 1e-2 * float(got.abs().max())  # A4 really was left out

    w4a16 = quantize_model(str(tiny_llama_dir), quarot_recipe(activations={}, kv_cache={}))
    hits = {stage: info["cache_hit"] for stage, info in w4a16["stages"].items()}
    assert hits["hessians"] and hits["quantize"] and not hits["pack"]  # A/KV settings key only pack (+ evaluate)


def test_quarot_recipe_bad_input(tmp_path: Path) -> None:
    from tasks.quarot import check_recipe_for_model
    from tests.helpers.models import build_tiny_llama

    with pytest.raises(ValueError, match="combine it with quantize.method rtn or gptq, not quip"):
        quarot_recipe(quantize={"method": "quip"})
    with pytest.raises(ValueError, match="activation bits must be in 2..8 or 16"):
        quarot_recipe(activations={"bits": 1})
    with pytest.raises(ValueError, match="kv_cache bits must be in 2..8 or 16"):
        quarot_recipe(kv_cache={"bits": 12})
    with pytest.raises(ValueError, match="clip_ratio"):
        quarot_recipe(activations={"bits": 4, "clip_ratio": 1.5})
    with pytest.raises(ValueError, match="needs quantize.mode parallel"):
        quarot_recipe(quantize={"mode": "sequential"})
    model_dir = build_tiny_llama(tmp_path / "m", num_layers=1, hidden=48, heads=3, kv_heads=1, intermediate=96)
    check_recipe_for_model(quarot_recipe(), model_dir)  # 3 heads: seeded random orthogonal fallback
    with pytest.raises(ConfigError, match=r"heads transform: .*size 3 .*random_orthogonal"):
        check_recipe_for_model(quarot_recipe(rotation={"kind": "quarot", "fallback": "error"}), model_dir)
    with pytest.raises(ConfigError, match="kv_cache.group_size=5 does not divide the head dim 16"):
        check_recipe_for_model(quarot_recipe(kv_cache={"bits": 4, "group_size": 5}), model_dir)
    with pytest.raises(ConfigError, match=r"activations.group_size=32 does not divide the linear input widths \[48\]"):
        check_recipe_for_model(quarot_recipe(activations={"bits": 4, "group_size": 32}), model_dir)
    check_recipe_for_model(quarot_recipe(activations={"bits": 4, "group_size": 16}), model_dir)  # 48 and 96
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rms_norm_eps")
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no RMSNorm"):
        check_recipe_for_model(quarot_recipe(), model_dir)
