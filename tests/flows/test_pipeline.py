"""The quantize-model flow end to end on a tiny random Llama, under Prefect's test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.quantize import quantize_model
from infra.keys import ArtifactRef
from infra.settings import Settings
from infra.store import open_store
from tests.flows.conftest import tiny_recipe

pytestmark = pytest.mark.slow

STAGES = ["model", "calibration", "hessians", "quantize", "pack", "eval-fp", "evaluate", "register"]


@pytest.fixture
def first_run(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> dict:
    return quantize_model(str(tiny_llama_dir), tiny_recipe())


def _hits(out: dict) -> dict[str, bool]:
    return {stage: info["cache_hit"] for stage, info in out["stages"].items()}


def test_full_flow_registers_a_tracked_build(first_run: dict, home: Settings) -> None:
    out = first_run
    assert list(out["stages"]) == STAGES
    assert not any(_hits(out).values())
    assert out["model_name"] == "tiny-llama.tiny-gptq" and out["model_version"] == "1"
    assert "candidate" in out["aliases"]
    m = out["metrics"]
    assert m["ppl"] > 1 and m["ppl_fp"] > 1 and abs(m["ppl_delta_rel"]) < 0.5
    assert 4.0 < m["bits_per_weight_stored"] < 5.5  # 4-bit codes + fp16 scale/zero per 32 columns

    from registry.models import show
    from registry.tracking import get_client

    info = show(out["model_name"], "1", settings=home)
    assert info.tags["key.hessians"] == out["stages"]["hessians"]["key"]
    assert info.tags["bits"] == "4" and info.tags["base_model"] == "tiny-llama"
    runs = get_client(home).search_runs(
        [get_client(home).get_run(out["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'",
    )
    assert {r.info.run_name for r in runs} >= {"calibration", "hessians", "quantize", "pack", "evaluate", "register"}

    store = open_store(settings=home)
    lineage = {m.stage for m in store.lineage(out["stages"]["evaluate"]["key"])}
    assert lineage == {"model", "calibration", "hessians", "quantize", "pack", "eval-fp", "evaluate"}
    for ref in store.list():
        assert store.verify(ref).ok


def test_rerun_is_all_cache_hits_and_no_duplicate_version(first_run: dict, tiny_llama_dir: Path) -> None:
    again = quantize_model(str(tiny_llama_dir), tiny_recipe())
    hits = _hits(again)
    assert all(hits[s] for s in STAGES if s != "register")
    assert again["model_version"] == first_run["model_version"]
    assert again["stages"]["evaluate"]["key"] == first_run["stages"]["evaluate"]["key"]


def test_eval_change_recomputes_only_evaluation(first_run: dict, home: Settings, tiny_llama_dir: Path) -> None:
    store = open_store(settings=home)
    scored = store.list("eval-window")
    assert len(scored) == 6  # 3 windows x (fp model, packed build)
    recipe = tiny_recipe().with_overrides(["eval.n_windows=2"])
    out = quantize_model(str(tiny_llama_dir), recipe)
    assert store.list("eval-window") == scored  # fewer windows: every window score is reused
    hits = _hits(out)
    assert hits["calibration"] and hits["hessians"] and hits["quantize"] and hits["pack"]
    assert not hits["eval-fp"] and not hits["evaluate"]
    assert out["model_version"] == "2"


def test_bits_change_reuses_calibration_and_hessians(first_run: dict, tiny_llama_dir: Path) -> None:
    out = quantize_model(str(tiny_llama_dir), tiny_recipe(bits=3))
    hits = _hits(out)
    assert hits["calibration"] and hits["hessians"] and hits["eval-fp"]
    assert not hits["quantize"] and not hits["pack"] and not hits["evaluate"]


def test_packed_checkpoint_equals_fake_quantized_model(first_run: dict, home: Settings, tiny_llama_dir: Path) -> None:
    """Round trip: the packed checkpoint's weights are exactly the quantizer's fake-quantized weights."""
    from kernels.quant_linear import QuantLinear
    from tasks.checkpoint import load_packed_model
    from tasks.models import load_model
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    store = open_store(settings=home)
    pack = store.get(first_run["stages"]["pack"]["key"])
    packed = load_packed_model(pack.root / "native")
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    index = json.loads(store.read_bytes(first_run["stages"]["quantize"]["key"], "index.json"))["layers"]
    fake = load_model(tiny_llama_dir)
    for name, entry in index.items():
        q = load_qlayer(ctx, entry["ref"])
        module = packed.get_submodule(name)
        assert isinstance(module, QuantLinear)
        assert torch.equal(module.dequantized_weight(), q.dequantize())
        fake.get_submodule(name).weight.data.copy_(q.dequantize())
    ids = torch.randint(0, fake.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, fake(ids).logits)
    meta = pack.manifest.metadata  # W4 g32 asym: compressed-tensors and GPTQ; GGUF Q4_1 needs fp16_min grids
    assert meta["formats"] == ["native", "compressed-tensors", "gptq"]
    assert "fp16_min" in meta["gguf_skipped"]


@pytest.mark.parametrize("group_size", [32, -1], ids=["g32", "per-channel"])
def test_compressed_tensors_export_loads_in_transformers(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, group_size: int
) -> None:
    """W4 sym, grouped or per channel (layers of different widths): the pack-quantized export loads in plain
    transformers and matches the native checkpoint."""
    from transformers import AutoModelForCausalLM

    from tasks.checkpoint import load_packed_model

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=True, group_size=group_size))
    pack = open_store(settings=home).get(out["stages"]["pack"]["key"])
    assert "compressed-tensors" in pack.manifest.metadata["formats"]
    ct = AutoModelForCausalLM.from_pretrained(pack.root / "compressed-tensors")
    native = load_packed_model(pack.root / "native")
    ids = torch.randint(0, ct.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ct(ids).logits, native(ids).logits, rtol=0, atol=1e-5)


def test_killed_hessians_resume_bit_identical(first_run: dict, home: Settings, tiny_llama_dir: Path) -> None:
    """Deleting the last block (a kill between blocks) resumes there and recomputes identical bytes."""
    store = open_store(settings=home)
    hes_ref = first_run["stages"]["hessians"]["key"]
    blocks = store.manifest(hes_ref).metadata["blocks"]
    before = store.manifest(blocks[-1]).files[0].sha256
    store.delete(blocks[-1])
    for stage in ("hessians", "quantize", "pack", "evaluate"):
        store.delete(first_run["stages"][stage]["key"])
    out = quantize_model(str(tiny_llama_dir), tiny_recipe())
    assert out["stages"]["hessians"]["key"] == hes_ref
    assert store.manifest(hes_ref).metadata["resumed_blocks"] == len(blocks) - 1
    assert store.manifest(blocks[-1]).files[0].sha256 == before
    assert out["stages"]["evaluate"]["key"] == first_run["stages"]["evaluate"]["key"]
    assert out["metrics"]["ppl"] == first_run["metrics"]["ppl"]


def test_sequential_killed_mid_block_resumes_bit_identical(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path
) -> None:
    """True-sequential mode killed after some groups of a block: the rerun reuses the stored layers (their
    quantized weights feed the later groups) and recomputes the rest byte for byte, with one calibration shard or
    two."""
    recipe = tiny_recipe(mode="sequential").with_overrides(["hessians.micro_batch=4"])  # 8 samples: 2 micro-batches
    first = quantize_model(str(tiny_llama_dir), recipe)
    store = open_store(settings=home)
    quant = first["stages"]["quantize"]["key"]
    layers = json.loads(store.read_bytes(quant, "index.json"))["layers"]
    lost = [n for n in layers if n.startswith("model.layers.1.") and ("o_proj" in n or "mlp." in n)]
    digests = {n: store.manifest(layers[n]["ref"]).files[0].sha256 for n in lost}
    for n in lost:
        store.delete(layers[n]["ref"])
    for stage in ("quantize", "pack", "evaluate"):
        store.delete(first["stages"][stage]["key"])
    out = quantize_model(str(tiny_llama_dir), recipe)
    assert out["stages"]["quantize"]["key"] == quant and not out["stages"]["quantize"]["cache_hit"]
    assert {n: store.manifest(layers[n]["ref"]).files[0].sha256 for n in lost} == digests
    assert out["metrics"]["ppl"] == first["metrics"]["ppl"]
    # the same resume with the calibration in 2 shards (threads meeting per group): the same layers, byte for byte
    for n in lost:
        store.delete(layers[n]["ref"])
    for stage in ("quantize", "pack", "evaluate"):
        store.delete(first["stages"][stage]["key"])
    sharded = quantize_model(str(tiny_llama_dir), recipe.with_overrides(["hessians.shards=2"]))
    assert sharded["stages"]["quantize"]["key"] == quant and not sharded["stages"]["quantize"]["cache_hit"]
    assert {n: store.manifest(layers[n]["ref"]).files[0].sha256 for n in lost} == digests
    assert sharded["metrics"]["ppl"] == first["metrics"]["ppl"]


def test_corrupt_artifact_is_recomputed(first_run: dict, home: Settings, tiny_llama_dir: Path) -> None:
    store = open_store(settings=home)
    ref = ArtifactRef(first_run["stages"]["calibration"]["key"])
    path = store.get(ref).file("tokens.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not store.verify(ref).ok
    out = quantize_model(str(tiny_llama_dir), tiny_recipe())
    assert not out["stages"]["calibration"]["cache_hit"]
    assert store.verify(ref).ok
    assert out["stages"]["hessians"]["cache_hit"]  # same key: downstream artifacts stay valid


def test_sequential_mode_has_its_own_keys(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> None:
    out = quantize_model(str(tiny_llama_dir), tiny_recipe(mode="sequential"))
    assert "hessians" not in out["stages"]
    par = quantize_model(str(tiny_llama_dir), tiny_recipe())
    assert out["stages"]["quantize"]["key"] != par["stages"]["quantize"]["key"]
    assert out["metrics"]["ppl"] > 1
    # sequential mode runs its own calibration forward: its dtype is part of the layers' keys
    bf16 = quantize_model(
        str(tiny_llama_dir), tiny_recipe(mode="sequential").with_overrides(["hessians.compute_dtype=bfloat16"])
    )
    assert bf16["stages"]["quantize"]["key"] != out["stages"]["quantize"]["key"]
    assert not bf16["stages"]["quantize"]["cache_hit"]
    assert abs(bf16["metrics"]["ppl"] - out["metrics"]["ppl"]) < 0.05 * out["metrics"]["ppl"]
    # llm-compressor's block order (two forwards per block) is its own build, close to true-sequential
    block = quantize_model(
        str(tiny_llama_dir), tiny_recipe(mode="sequential").with_overrides(["quantize.sequential_scope=block"])
    )
    assert block["stages"]["quantize"]["key"] != out["stages"]["quantize"]["key"]
    assert abs(block["metrics"]["ppl"] - out["metrics"]["ppl"]) < 0.05 * out["metrics"]["ppl"]


def test_rtn_and_s3_store(
    prefect_harness: None,
    home: Settings,
    tiny_llama_dir: Path,
    moto_server: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUANTPIPE_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("QUANTPIPE_STORE_URL", f"s3://{s3_bucket}/runs")
    from infra.settings import get_settings

    settings = get_settings(refresh=True)
    out = quantize_model(str(tiny_llama_dir), tiny_recipe(method="rtn"))
    store = open_store(settings=settings)
    assert store.url.startswith("s3://")
    assert store.exists(out["stages"]["pack"]["key"]) and store.verify(out["stages"]["pack"]["key"]).ok
    again = quantize_model(str(tiny_llama_dir), tiny_recipe(method="rtn"))
    assert again["stages"]["pack"]["cache_hit"]


def test_hessian_blocks_are_stored_compact(first_run: dict, home: Settings) -> None:
    """Each block's Σxxᵀ is stored once (upper triangle, fp32): ≈ 0.25x the bytes of the full fp64 matrix, and it
    loads back as the exactly symmetric fp64 matrix of the fp32-rounded entries."""
    from tasks.hessians import load_block_hessians
    from tasks.stage import StageContext

    store = open_store(settings=home)
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    hes = store.manifest(first_run["stages"]["hessians"]["key"])
    for block in hes.metadata["blocks"]:
        manifest = store.manifest(block)
        dims = manifest.metadata["dims"].values()
        stored = manifest.file("hessians.safetensors").size
        # triangle fp32 + Σx fp64 + counts + the safetensors header; → 0.25x of 8d² as d grows
        assert stored <= sum(2 * d * (d + 1) + 8 * d + 16 for d in dims) + 4096
        assert stored <= 0.28 * sum(8 * d * d for d in dims)
        for g, (H, n) in load_block_hessians(ctx, block).items():
            assert H.dtype == torch.float32 and torch.equal(H, H.T) and n > 0  # the stored values, exactly
            assert H.shape[0] == manifest.metadata["dims"][g]
