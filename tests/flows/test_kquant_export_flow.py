"""``quantpipe export NAME/VERSION --format gguf --gguf-type Q2_K``: a k-quant GGUF GPTQ'd from a registered
build's base model with Hessians from the build's own lineage, as a content-addressed artifact, read back by
transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.quantize import quantize_model
from infra.errors import ConfigError
from infra.settings import Settings
from infra.store import open_store
from tests.flows.conftest import tiny_recipe

pytestmark = pytest.mark.slow


def test_kquant_export_of_a_registered_build(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    from tasks.export.kquant_gguf import kquant_mix
    from tasks.export.registered import KQUANT_STAGE, export_build

    out = quantize_model(str(tiny_llama_dir), tiny_recipe(sym=False))  # sequential GPTQ: no hessians artifact
    target = f"{out['model_name']}/{out['model_version']}"
    info = export_build(target, "gguf", tmp_path / "q2", home, gguf_type="Q2_K")
    file = Path(info["location"])
    assert file.name == "model-Q2_K.gguf" and file.parent == tmp_path / "q2"

    store = open_store(settings=home)
    arts = store.list(KQUANT_STAGE)
    assert len(arts) == 1 and store.verify(str(arts[0])).ok
    assert "hessians" in store.get(str(arts[0])).manifest.inputs
    again = export_build(target, "gguf", None, home, gguf_type="Q2_K")  # cached: the same artifact
    assert Path(again["location"]).read_bytes() == file.read_bytes()

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    for name, qtype in kquant_mix("Q2_K", config).items():
        assert types[f"{names.get_name(name)}.weight"] == qtype, name

    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    from tasks.models import load_model

    fp = load_model(tiny_llama_dir)
    ids = torch.randint(0, config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # a 4-5-bit model of a random tiny llama: close to the fp model, not equal to it
        dq, df = loaded(ids).logits, fp(ids).logits
    assert not torch.equal(dq, df)
    assert float((dq - df).abs().mean()) < 0.5 * float(df.abs().mean())

    with pytest.raises(ConfigError, match="unknown k-quant GGUF type"):
        export_build(target, "gguf", None, home, gguf_type="Q3_K_S")
    with pytest.raises(ConfigError, match="GGUF option"):
        export_build(target, "gptq", None, home, gguf_type="Q2_K")


def test_kquant_export_uses_the_builds_first_token_weight(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A sequential build quantized with hessians.first_token_weight=16 exports with Hessians collected the same
    way (the weight is in the hessians artifact's config), not with uniform tokens."""
    from tasks.export.registered import KQUANT_STAGE, export_build

    recipe = tiny_recipe(sym=False)
    recipe = recipe.model_copy(update={"hessians": recipe.hessians.model_copy(update={"first_token_weight": 16.0})})
    out = quantize_model(str(tiny_llama_dir), recipe)
    export_build(f"{out['model_name']}/{out['model_version']}", "gguf", None, home, gguf_type="Q3_K_M")
    store = open_store(settings=home)
    (art,) = store.list(KQUANT_STAGE)
    hes = store.get(store.get(str(art)).manifest.inputs["hessians"]).manifest
    assert hes.config["first_token_weight"] == 16.0
