"""The flow's pack stage writes every serving format a W4 g32 asym fp16_min build maps to (gptq-w4g32's scheme)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.quantize import quantize_model
from infra.settings import Settings
from infra.store import open_store
from tests.flows.conftest import tiny_recipe

pytestmark = pytest.mark.slow


def _dequantized_layers(home: Settings, out: dict) -> dict[str, torch.Tensor]:
    """Every quantized layer of a run, dequantized from the store (what each export must reproduce)."""
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    store = open_store(settings=home)
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    layers = json.loads(store.read_bytes(out["stages"]["quantize"]["key"], "index.json"))["layers"]
    return {name: load_qlayer(ctx, entry["ref"]).dequantize() for name, entry in layers.items()}


def test_pack_writes_every_format_and_each_reproduces_the_native_weights(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tasks.checkpoint import load_packed_model
    from tests.helpers.gptq_reader import read_gptq_checkpoint

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=False, fp16_min=True))
    store = open_store(settings=home)
    pack = store.get(out["stages"]["pack"]["key"])
    meta = pack.manifest.metadata
    assert meta["formats"] == ["native", "compressed-tensors", "gptq", "gguf"]
    assert meta["exports"]["gguf"]["ggml_type"] == "Q4_1" and meta["exports"]["gptq"]["checkpoint_format"] == "gptq_v2"
    assert not any(k.endswith("_skipped") for k in meta)
    assert store.verify(out["stages"]["pack"]["key"]).ok  # every export file is in the manifest, hashed

    weights = _dequantized_layers(home, out)
    native = load_packed_model(pack.root / "native")
    ids = torch.randint(0, native.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = native(ids).logits
        ct = AutoModelForCausalLM.from_pretrained(pack.root / "compressed-tensors")
        assert torch.equal(ct(ids).logits, ref)
        gguf_dir = pack.root / "gguf"
        gg = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=meta["exports"]["gguf"]["file"])
        torch.testing.assert_close(gg(ids).logits, ref, rtol=0, atol=1e-5)
    gptq_state = read_gptq_checkpoint(pack.root / "gptq")
    gg_state = gg.state_dict()
    for name, w in weights.items():
        assert torch.equal(gptq_state[f"{name}.weight"], w), name
        assert torch.equal(gg_state[f"{name}.weight"].to(torch.float32), w), name

    # the registered version lists its formats; `quantpipe export` resolves (and copies) each one
    from registry.models import show
    from tasks.export.registered import export_build

    target = f"{out['model_name']}/{out['model_version']}"
    assert show(out["model_name"], out["model_version"], settings=home).tags["formats"] == ",".join(meta["formats"])
    info = export_build(target, "gguf", tmp_path / "llama.cpp", home)
    file = Path(info["location"])
    assert file.parent == tmp_path / "llama.cpp" and file.name == meta["exports"]["gguf"]["file"]
    assert file.read_bytes() == (gguf_dir / file.name).read_bytes()
    info = export_build(out["stages"]["pack"]["key"], "gptq", None, home)
    assert Path(info["location"]) == pack.root / "gptq" and "quantize_config.json" in info["files"]


def test_a_pack_larger_than_a_shard_is_written_and_read_in_shards(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``SHARD_BYTES`` the native checkpoint and the exports are written as HF-style shards with an index
    (so pack holds one shard, not the model); the native loader, transformers and the GPTQ reader read them back
    to exactly the quantized weights."""
    from transformers import AutoModelForCausalLM

    import infra.safetensors_io as sio
    from tasks.checkpoint import load_packed_model
    from tests.helpers.gptq_reader import read_gptq_checkpoint

    monkeypatch.setattr(sio, "SHARD_BYTES", 16 << 10)
    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=False, fp16_min=True))
    store = open_store(settings=home)
    pack = store.get(out["stages"]["pack"]["key"])
    assert store.verify(out["stages"]["pack"]["key"]).ok
    for fmt in ("native", "compressed-tensors", "gptq"):
        files = sorted(p.name for p in (pack.root / fmt).glob("*.safetensors"))
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", (fmt, files)
        index = json.loads((pack.root / fmt / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        assert not (pack.root / fmt / "model.safetensors").exists()

    weights = _dequantized_layers(home, out)
    native = load_packed_model(pack.root / "native")
    gptq_state = read_gptq_checkpoint(pack.root / "gptq")
    ids = torch.randint(0, native.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = native(ids).logits
        ct = AutoModelForCausalLM.from_pretrained(pack.root / "compressed-tensors")
        assert torch.equal(ct(ids).logits, ref)
    for name, w in weights.items():
        assert torch.equal(native.get_submodule(name).dequantized_weight(), w), name
        assert torch.equal(gptq_state[f"{name}.weight"], w), name


def test_export_refuses_formats_a_build_has_not_got(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path
) -> None:
    from infra.errors import ConfigError
    from tasks.export.registered import export_build

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=False).with_overrides(["pack.gptq=false"]))
    target = f"{out['model_name']}/{out['model_version']}"
    with pytest.raises(ConfigError, match=r"has no gguf export: .*quantize\.fp16_min: true"):
        export_build(target, "gguf", None, home)
    with pytest.raises(ConfigError, match="has no gptq export: disabled in recipe"):
        export_build(target, "gptq", None, home)
    with pytest.raises(ConfigError, match="unknown export format 'onnx'"):
        export_build(target, "onnx", None, home)
    assert export_build(target, "compressed-tensors", None, home)["location"].endswith("compressed-tensors")


def test_export_and_lookup_commands(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`quantpipe export NAME/VERSION --format F [--out DIR]` and `quantpipe registry lookup --format F`."""
    from typer.testing import CliRunner

    from flows.cli import app

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=False, fp16_min=True))
    target = f"{out['model_name']}/{out['model_version']}"
    runner = CliRunner()
    copied = runner.invoke(app, ["export", target, "--format", "gguf", "--out", str(tmp_path / "cpp")])
    assert copied.exit_code == 0, copied.output
    assert Path(copied.stdout.strip()).parent == tmp_path / "cpp" and Path(copied.stdout.strip()).is_file()
    looked = runner.invoke(app, ["registry", "lookup", "--name", out["model_name"], "--format", "gptq"])
    assert looked.exit_code == 0, looked.output
    assert (Path(looked.stdout.strip()) / "quantize_config.json").is_file()
    refused = runner.invoke(app, ["export", target, "--format", "onnx"])
    assert refused.exit_code == 2 and "unknown export format" in refused.output
