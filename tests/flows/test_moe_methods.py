"""Every quantization method on a mixture-of-experts model (Qwen2-MoE: routed experts, a shared expert with its
fp gate, a dense-MLP layer) through the unchanged quantize-model flow: each one quantizes every expert linear and
its packed checkpoint computes what the fake-quantized unfused model computes, or it refuses in one line.

One store for the module: calibration and Hessians are computed once by the plain run and reused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.settings import Settings
from infra.store import open_store
from tests.flows.conftest import isolated_home, tiny_recipe
from tests.flows.test_methods import METHODS as OTHER_METHODS
from tests.helpers.models import build_tiny_family

METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"method": "rtn"},
    "hadamard-gptq": {"method": "hadamard-gptq", "bits": 3},
    **OTHER_METHODS,
}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_family(tmp_path_factory.mktemp("moe") / "qwen2_moe", "qwen2_moe")


@pytest.fixture(scope="module")
def moe_home(tmp_path_factory: pytest.TempPathFactory, wikitext_dir: Path) -> Iterator[Settings]:
    with pytest.MonkeyPatch.context() as mp:
        yield from isolated_home(mp, tmp_path_factory.mktemp("moe-methods") / "home", wikitext_dir)


@pytest.fixture(scope="module")
def plain(prefect_harness: None, moe_home: Settings, moe_dir: Path) -> dict:
    from flows.quantize import quantize_model

    return quantize_model(str(moe_dir), tiny_recipe())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_moe(method: str, plain: dict, moe_home: Settings, moe_dir: Path) -> None:
    from flows.quantize import quantize_model
    from quant.arch import mapping_for
    from tasks.checkpoint import load_packed_model
    from tasks.models import load_model
    from tasks.moe import unfuse_model
    from tasks.qlayer import fake_weight
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    recipe = tiny_recipe(**METHODS[method]).model_copy(update={"name": f"tiny-moe-{method}"})
    out = quantize_model(str(moe_dir), recipe)
    assert out["stages"]["hessians"]["cache_hit"]
    store = open_store(settings=moe_home)
    config = json.loads((moe_dir / "config.json").read_text())
    mapping = mapping_for(config["architectures"])
    index = json.loads(store.read_bytes(out["stages"]["quantize"]["key"], "index.json"))["layers"]
    expected = {
        f"{mapping.blocks}.{i}.{linear}"
        for i in range(config["num_hidden_layers"])
        for g in mapping.groups_for_layer(config, i)
        for linear in g.linears
    }
    assert set(index) == expected and sum(".experts." in n for n in index) == 4 * 3
    packed = load_packed_model(store.get(out["stages"]["pack"]["key"]).root / "native")
    fake = load_model(moe_dir)
    unfuse_model(fake, mapping)
    ctx = StageContext(settings=moe_home, store_url=moe_home.effective_store_url)
    for name, entry in index.items():
        fake.get_submodule(name).weight.data.copy_(fake_weight(load_qlayer(ctx, entry["ref"])))
    ids = torch.randint(0, fake.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = packed(ids).logits, fake(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert out["metrics"]["ppl_delta_rel"] < 1.0, out["metrics"]
