"""Model cards and links: every section present, overrides shown, and no credential reaches MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import Settings
from registry.card import CARD_SECTIONS, ModelCard, registered_model_description
from registry.models import PromotionGate, describe_version, register_build, show
from registry.tracking import flow_run, mlflow_ui_url, model_version_url, public_url, run_artifact_url, run_url


def _card(**kw: object) -> ModelCard:
    base = {
        "name": "m.gptq-w4g64-1a2b3c4d",
        "version": "3",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_revision": "abc123",
        "recipe": "gptq-w4g64-1a2b3c4d",
        "recipe_base": "gptq-w4g64",
        "overrides": {"eval.n_windows": 4, "calibration.n_samples": 32},
        "method": "gptq",
        "bits": 4,
        "group_size": 64,
        "metrics": {"ppl": 27.47, "ppl_fp": 24.14, "bits_per_weight_stored": 4.25},
        "formats": ["native", "gguf"],
        "plots": {"figures/layer_bits.png": "http://mlflow:5000/#/x", "figures/ppl_vs_bits.png": None},
    }
    return ModelCard.model_validate(base | kw)


def test_card_has_every_section_and_the_numbers() -> None:
    md = _card().markdown()
    assert [line for line in md.splitlines() if line.startswith("## ")] == [f"## {s}" for s in CARD_SECTIONS]
    assert "| perplexity (quantized) | 27.47 |" in md and "| perplexity (full precision) | 24.14 |" in md
    assert "| ratio | 1.1379 (+13.8 %) |" in md and "| stored bits / weight | 4.250 |" in md
    assert '"eval.n_windows": 4' in md and "Shipped recipe `gptq-w4g64`" in md
    assert "quantpipe lineage m.gptq-w4g64-1a2b3c4d/3" in md
    assert "--format gguf" in md and "llama-cli -m" in md and "--format gptq" not in md  # only the build's formats
    assert "[figures/layer_bits.png](http://mlflow:5000/#/x)" in md and "`figures/ppl_vs_bits.png`" in md


def test_card_and_links_never_carry_credentials() -> None:
    secret = "s3cr3t-pa55word"
    md = _card(
        prefect_flow_run_url=f"http://u:{secret}@prefect:4200/runs/flow-run/1",
        source_run_url=public_url(f"https://bob:{secret}@mlflow.example:5000/"),
    ).markdown()
    assert secret not in md
    assert public_url(f"https://bob:{secret}@mlflow.example:5000/") == "https://mlflow.example:5000"
    assert public_url("sqlite:////tmp/mlflow.db") is None and public_url(None) is None
    assert secret not in registered_model_description(
        "m.r", base_model=f"x://a:{secret}@h", recipe="r", method="g", bits=4
    )


def test_ui_links_only_for_an_http_tracking_server(settings: Settings) -> None:
    assert mlflow_ui_url(settings) is None and run_url("abc", settings) is None  # sqlite: no UI to link
    http = Settings(home=settings.home, mlflow_tracking_uri="http://alice:pw-123456789@mlflow.local:5000/")
    assert mlflow_ui_url(http) == "http://mlflow.local:5000"
    assert model_version_url("m.r", "2", http) == "http://mlflow.local:5000/#/models/m.r/versions/2"


def test_version_card_and_model_description_are_stored(settings: Settings, checkpoint_dir: Path) -> None:
    with flow_run("quantize:r", settings=settings) as parent:
        info = register_build(
            "m.r",
            checkpoint_dir,
            run_id=parent,
            tags={"base_model": "m", "base_revision": "1", "recipe": "r", "bits": "4"},
            metrics={"ppl": 10.0, "ppl_fp": 9.0},
            build_key="k1",
            gate=PromotionGate(max_ppl_increase=0.5),
            settings=settings,
            model_description=registered_model_description("m.r", base_model="m", recipe="r", method="rtn", bits=4),
        )
        assert info.run_id == parent  # the source run is the run it was given (the flow's parent)
        described = describe_version(
            "m.r", info.version, _card(name="m.r", version=info.version).markdown(), settings=settings
        )
    assert (
        "## Load it" in described.description
        and show("m.r", "1", settings=settings).description == described.description
    )
    from registry.tracking import get_client

    assert "Quantized builds of `m`" in get_client(settings).get_registered_model("m.r").description
    assert run_artifact_url(parent, "figures/a.png", settings) is None


@pytest.mark.parametrize("old", ["", "quantpipe builds (see version tags for lineage)"])
def test_generic_model_description_is_replaced_but_a_written_one_kept(
    settings: Settings, checkpoint_dir: Path, old: str
) -> None:
    from registry.tracking import get_client

    client = get_client(settings)
    client.create_registered_model("m.r", description=old)
    kw = dict(tags={"base_model": "m"}, metrics={}, gate=None, settings=settings, model_description="new text")
    with flow_run("quantize:r", settings=settings) as parent:
        register_build("m.r", checkpoint_dir, run_id=parent, build_key="k1", **kw)
        assert client.get_registered_model("m.r").description == "new text"
        client.update_registered_model("m.r", description="written by a person")
        register_build("m.r", checkpoint_dir, run_id=parent, build_key="k2", **kw)
    assert client.get_registered_model("m.r").description == "written by a person"
