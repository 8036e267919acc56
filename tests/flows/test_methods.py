"""ICQuant, GPTQT, E8P and mixed precision through the unchanged quantize-model flow on a tiny random Llama.

One store for the module: the plain run computes calibration and Hessians once, every method reuses them, so
each method's test runs only quantize → pack → evaluate → register (about a second each).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from infra.errors import ConfigError
from infra.settings import Settings
from infra.store import open_store
from tasks.recipe import parse_recipe
from tests.flows.conftest import isolated_home, tiny_recipe

REPO = Path(__file__).resolve().parents[2]
METHODS: dict[str, dict[str, Any]] = {
    "icquant-rtn": {"method": "icquant-rtn", "bits": 2, "outliers": {"gamma": 0.1}},
    "icquant-gptq": {"method": "gptq", "bits": 3, "outliers": {"gamma": 0.1, "segment": 24}},  # ≡ icquant-gptq
    "gptqt": {"method": "gptqt", "bits": 2, "gptqt": {"multipliers": [0.9, 1.0, 1.1]}},
    "hadamard-e8p": {"method": "hadamard-e8p", "bits": 2},
    "hadamard-e8p-rvq": {"method": "hadamard-e8p", "bits": 3},
    "mixed-gptq": {"method": "gptq", "bitalloc": {"avg_bits": 2.5, "candidate_bits": [2, 3, 4]}},
    "mixed-gptq-group": {"method": "gptq", "bitalloc": {"avg_bits": 2.5, "granularity": "group"}},
    # absolute sensitivities (the random tiny model's layers differ in scale, not in relative sensitivity)
    "mixed-icquant": {
        "method": "icquant-gptq",
        "bitalloc": {"avg_bits": 3.0, "sensitivity": "absolute"},
        "outliers": {"gamma": 0.1},
    },
}
MODULE = {
    "icquant": "ICQuantLinear",
    "bcq": "BCQLinear",
    "affine": "QuantLinear",
    "mixed": "MixedQuantLinear",
    "e8p": "E8PLinear",
}
SKIP_REASON = {
    "icquant": "ICQuant",
    "bcq": "binary coding",
    "affine": "mixed per-layer bit-widths",
    "mixed": "mixed",
    "e8p": "E8P lattice codes",
}


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory, wikitext_dir: Path) -> Iterator[Settings]:
    with pytest.MonkeyPatch.context() as mp:
        yield from isolated_home(mp, tmp_path_factory.mktemp("methods") / "home", wikitext_dir)


@pytest.fixture(scope="module")
def plain(prefect_harness: None, module_home: Settings, tiny_llama_dir: Path) -> dict:
    from flows.quantize import quantize_model

    return quantize_model(str(tiny_llama_dir), tiny_recipe())


@pytest.fixture(scope="module")
def run_method(plain: dict, module_home: Settings, tiny_llama_dir: Path) -> Any:
    """``run_method(name)`` -> (recipe, outcome), each method run through the flow once per module, on demand: the
    tests that read a method's results run it themselves instead of skipping when another test did not."""
    from flows.quantize import quantize_model

    outcomes: dict[str, tuple[Any, dict]] = {}

    def run(method: str) -> tuple[Any, dict]:
        if method not in outcomes:
            recipe = tiny_recipe(**METHODS[method]).model_copy(update={"name": f"tiny-{method}"})
            outcomes[method] = (recipe, quantize_model(str(tiny_llama_dir), recipe))
        return outcomes[method]

    return run


def _check_packed_equals_fake_quant(out: dict, home: Settings, model_dir: Path) -> set[str]:
    from tasks.checkpoint import load_packed_model
    from tasks.models import load_model
    from tasks.qlayer import fake_weight, layer_kind
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    store = open_store(settings=home)
    pack = store.get(out["stages"]["pack"]["key"])
    packed = load_packed_model(pack.root / "native")
    ctx = StageContext(settings=home, store_url=home.effective_store_url)
    index = json.loads(store.read_bytes(out["stages"]["quantize"]["key"], "index.json"))["layers"]
    fake = load_model(model_dir)
    kinds = set()
    for name, entry in index.items():
        q = load_qlayer(ctx, entry["ref"])
        kinds.add(layer_kind(q))
        module = packed.get_submodule(name)
        assert type(module).__name__ == MODULE[layer_kind(q)], name
        original = getattr(module, "dequantized_weight_original", module.dequantized_weight)  # E8P: Uᵀ Ŵ̃ V
        assert torch.equal(original(), fake_weight(q)), name  # bit-exact
        assert entry["bits"] == q.bits
        fake.get_submodule(name).weight.data.copy_(fake_weight(q))
    ids = torch.randint(0, fake.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=0, atol=1e-5)
    assert pack.manifest.metadata["formats"] == ["native"]
    assert any(SKIP_REASON[k] in pack.manifest.metadata["compressed_tensors_skipped"] for k in kinds)
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_through_the_flow(method: str, run_method: Any, module_home: Settings, tiny_llama_dir: Path) -> None:
    recipe, out = run_method(method)
    hits = {stage: info["cache_hit"] for stage, info in out["stages"].items()}
    assert hits["calibration"] and hits["hessians"] and hits["eval-fp"]
    assert not hits["quantize"] and not hits["pack"] and not hits["evaluate"]
    _check_packed_equals_fake_quant(out, module_home, tiny_llama_dir)
    m = out["metrics"]
    assert abs(m["ppl_delta_rel"]) < 0.5, m
    parts = sum(m[f"bits_per_weight_stored_{p}"] for p in ("codes", "positions", "offsets", "grids", "other"))
    assert m["bits_per_weight_stored"] == pytest.approx(parts)
    if recipe.quantize.icquant_base() is not None:
        assert m["bits_per_weight_stored_positions"] > 0
    store = open_store(settings=module_home)
    ev = store.get(out["stages"]["evaluate"]["key"])
    assert "layer_bits.png" in ev.manifest.file_names()
    rows = json.loads(ev.file("layers.json").read_text())
    assert all(r["bpw_total"] > r["bits"] for r in rows)  # measured per layer: codes + positions + grids


@pytest.mark.slow
def test_group_wise_allocation_mixes_widths_inside_layers(run_method: Any, module_home: Settings) -> None:
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext

    _recipe, out = run_method("mixed-gptq-group")
    store = open_store(settings=module_home)
    quant = out["stages"]["quantize"]["key"]
    alloc = json.loads(store.read_bytes(quant, "allocation.json"))
    assert alloc["granularity"] == "group" and alloc["avg_bits"] <= 2.5 + 1e-9
    assert all("#" in item for item in alloc["bits"])
    assert out["metrics"]["bits_per_weight_codes"] == pytest.approx(alloc["avg_bits"])
    ctx = StageContext(settings=module_home, store_url=module_home.effective_store_url)
    index = json.loads(store.read_bytes(quant, "index.json"))["layers"]
    widths = [sorted(load_qlayer(ctx, e["ref"]).parts) for e in index.values()]  # type: ignore[union-attr]
    assert any(len(w) > 1 for w in widths)  # some layer really mixes widths
    for name, avg in alloc["layer_avg_bits"].items():
        assert load_qlayer(ctx, index[name]["ref"]).avg_bits == pytest.approx(avg)  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mixed-gptq", "mixed-icquant"])
def test_mixed_precision_records_the_allocation(method: str, run_method: Any, module_home: Settings) -> None:
    from tasks.quantize import LAYER_VERSION
    from tasks.stage import stage_key

    recipe, out = run_method(method)
    store = open_store(settings=module_home)
    quant = out["stages"]["quantize"]["key"]
    alloc = json.loads(store.read_bytes(quant, "allocation.json"))
    budget = recipe.quantize.bitalloc.avg_bits
    assert alloc["budget"] == budget and alloc["avg_bits"] <= budget + 1e-9
    assert out["metrics"]["bits_per_weight_codes"] == pytest.approx(alloc["avg_bits"])
    assert len(set(alloc["bits"].values())) > 1  # really mixed on this model
    assert store.manifest(quant).metadata["bitalloc_avg_bits"] == alloc["avg_bits"]
    config = json.loads((store.get(out["stages"]["pack"]["key"]).root / "native" / "config.json").read_text())
    assert config["quantization_config"]["layer_bits"] == alloc["bits"]
    index = json.loads(store.read_bytes(quant, "index.json"))["layers"]
    inputs = {"model": out["stages"]["model"]["key"], "hessians": index[next(iter(index))]["ref"]}
    for name, entry in index.items():  # a mixed layer has the key of the uniform recipe at its bits: reusable
        uniform = recipe.quantize.at_bits(alloc["bits"][name])
        inputs["hessians"] = store.manifest(entry["ref"]).inputs["hessians"]
        assert entry["ref"] == str(stage_key("qlayer", LAYER_VERSION, {**uniform.key_config(), "layer": name}, inputs))


@pytest.mark.slow
def test_benchmark_aggregates_and_plots_real_results(run_method: Any, module_home: Settings, tmp_path: Path) -> None:
    """benchmarks/methods_smollm2.py's rows, JSONL, plot and MLflow logging on the tiny model's real outcomes."""
    outcomes = [run_method(m) for m in ("icquant-rtn", "icquant-gptq", "gptqt", "mixed-gptq")]
    spec = importlib.util.spec_from_file_location("methods_bench", REPO / "benchmarks" / "methods_smollm2.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [bench.result_row(r, out, {"model": "tiny-llama"}, 1.0) for r, out in outcomes]
    jsonl = tmp_path / "methods.jsonl"
    bench.append_rows(rows[:2], jsonl)
    bench.append_rows(rows, jsonl)  # a rerun: the latest row per recipe wins
    loaded = bench.load_rows(jsonl)
    assert len(jsonl.read_text().splitlines()) == len(rows) + 2
    assert {r["method"] for r in loaded} >= {"icquant-rtn", "icquant-gptq", "gptqt", "gptq+bitalloc"}
    png = bench.plot_ppl_vs_bits(loaded, tmp_path / "methods.png", title="tiny-llama")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_id = bench.log_to_mlflow(png, loaded, module_home)
    from registry.tracking import get_client

    client = get_client(module_home)
    child = client.search_runs(
        [client.get_run(run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )[0]
    assert {a.path for a in client.list_artifacts(child.info.run_id, "figures")} == {"figures/methods.png"}


BAD = [
    ({"method": "icquant-rtn", "outliers": {"gamma": 0.5}}, "quantize.outliers.gamma: gamma (outlier fraction)"),
    ({"method": "icquant-gptq", "outliers": {"gamma": 0.0}}, "quantize.outliers.gamma"),
    (
        {"method": "icquant-gptq", "outliers": {"index_bits": 17}},
        "quantize.outliers.index_bits: index_bits 17 overflows",
    ),
    ({"bitalloc": {"avg_bits": 1.9, "candidate_bits": [2, 4]}}, "quantize.bitalloc: avg_bits budget 1.9 is below"),
    ({"bitalloc": {"avg_bits": 3, "candidate_bits": [1, 3]}}, "quantize.bitalloc.candidate_bits"),
    ({"bitalloc": {"avg_bits": 3, "granularity": "row"}}, "quantize.bitalloc.granularity"),
    ({"bitalloc": {"avg_bits": 3}, "mode": "sequential"}, "bitalloc needs mode 'parallel'"),
    (
        {"method": "icquant-gptq", "bitalloc": {"avg_bits": 3, "granularity": "group"}},
        "granularity 'group' needs method rtn or gptq",
    ),
    ({"bitalloc": {"avg_bits": 3, "granularity": "group"}, "group_size": -1}, "needs group_size > 0"),
    ({"method": "gptqt", "bits": 4}, "gptqt needs bits"),
    ({"method": "hadamard-e8p", "bits": 4}, "hadamard-e8p codes 8 weights in 16 bits (bits: 2) or 16 + 8 bits"),
    ({"method": "hadamard-e8p", "bits": 2, "e8p": {"scale": 0}}, "quantize.e8p.scale"),
    ({"method": "quip", "outliers": {}}, "quantize.outliers: method quip has no field 'outliers'"),
    ({"outliers": {"gamma": 0.05, "gama": 1}}, "quantize.outliers.gama: Extra inputs are not permitted"),
    ({"method": "gptqt", "bits": 2, "gptqt": {"linear_bits": 4, "share": "row"}}, "quantize.gptqt.share"),
    ({"gptqt": {"linear_bits": 4}}, "quantize.gptqt: method gptq has no field 'gptqt' (gptqt belongs to gptqt)"),
]


@pytest.mark.parametrize(("quantize", "message"), BAD)
def test_bad_method_options_are_one_line_errors(quantize: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_recipe({"quantize": quantize}, source="bad.yaml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_index_field_overflow_is_refused() -> None:
    from tasks.method_checks import max_index_codes

    assert max_index_codes(4096, 14336, 717, 6) < 2**31 - 1  # a real 70B-size layer fits
    assert max_index_codes(2**16, 2**16, 3277, None) > 2**31 - 1  # worst case of B = 1 on a 4G-weight layer


@pytest.mark.slow
def test_preflight_refuses_before_any_artifact(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> None:
    """γ = 0.005 selects no outlier in a 64-column layer: refused by the flow's preflight, the store stays empty."""
    from flows.quantize import quantize_model

    with pytest.raises(ConfigError, match=r"quantize\.outliers\.gamma=0\.005 selects no outlier in model\.layers"):
        quantize_model(str(tiny_llama_dir), tiny_recipe(method="icquant-rtn", outliers={"gamma": 0.005}))
    assert open_store(settings=home).list() == []


def test_keys_only_where_they_matter() -> None:
    plain = tiny_recipe().quantize.key_config()
    assert not {"outliers", "gptqt", "bitalloc"} & set(plain)  # plain recipes keep their keys
    a = tiny_recipe(method="gptq", outliers={}).quantize.key_config()
    b = tiny_recipe(method="icquant-gptq").quantize.key_config()
    assert a == b and a["outliers"]["gamma"] == 0.05
    rtn = tiny_recipe(method="icquant-rtn").quantize.key_config()
    assert "damp" not in rtn and "act_order" not in rtn
    mixed = tiny_recipe(bitalloc={"avg_bits": 2.5}).quantize
    assert (
        "bits" not in mixed.key_config() and mixed.at_bits(3).key_config() == tiny_recipe(bits=3).quantize.key_config()
    )
    gt = tiny_recipe(method="gptqt", bits=3).quantize.key_config()
    assert gt["gptqt"]["linear_bits"] == 4 and "gptqt" not in plain


def test_shipped_recipes_load() -> None:
    from tasks.recipe import load_recipe

    expect = {
        "icquant-rtn-w2": ("icquant-rtn", 2), "icquant-gptq-w2": ("icquant-gptq", 2),
        "icquant-gptq-w3": ("icquant-gptq", 3), "gptqt-w3": ("gptqt", 3), "gptqt-w2": ("gptqt", 2),
        "mixed-gptq-2.5bit": ("gptq", 2.5), "mixed-gptq-3bit": ("gptq", 3.0),
    }  # fmt: skip
    for name, (method, bits) in expect.items():
        r = load_recipe(name)
        assert r.name == name and r.quantize.effective_method() == method
        assert (r.quantize.bitalloc.avg_bits if r.quantize.bitalloc else r.quantize.bits) == bits
        assert (r.calibration.n_samples, r.calibration.seq_len, r.eval.seq_len, r.eval.n_windows) == (
            128,
            512,
            2048,
            16,
        )


def test_unreadable_coded_qlayer_is_a_one_line_error(module_home: Settings) -> None:
    """A committed qlayer whose layout this code cannot read (here an unknown E8P format version) fails with one
    line naming the artifact and the fix, not a traceback from the unpacker."""
    from safetensors.torch import save

    from infra.errors import CorruptArtifactError
    from tasks.quantize import load_qlayer
    from tasks.stage import StageContext, ensure_artifact

    ctx = StageContext(settings=module_home, store_url=module_home.effective_store_url)
    tensors = {
        "qweight": torch.zeros(2, 1, dtype=torch.int16),
        "scales": torch.ones(2, dtype=torch.float16),
        "e8pmeta": torch.tensor([9, 8, 2], dtype=torch.int32),
    }
    payload = save(tensors, metadata={"format": "e8p", "bits": "2"})
    ref, _ = ensure_artifact(
        ctx, "qlayer", 999, {"test": "unreadable"}, {}, lambda w, _run: w.add_bytes("qweight.safetensors", payload)
    )
    with pytest.raises(CorruptArtifactError, match=r"cannot be read \(unsupported E8P format .*remove it") as exc:
        load_qlayer(ctx, str(ref))
    assert "\n" not in str(exc.value)
