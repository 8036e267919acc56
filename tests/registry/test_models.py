"""Model registry: registration, idempotency, gates, champion rule, lookups, aliases, downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from infra.errors import ConfigError
from registry import models
from registry.errors import RegistryNotFoundError
from registry.models import (
    ModelVersionInfo,
    PromotionGate,
    demote,
    download_version,
    lineage_tags,
    list_versions,
    lookup,
    promote,
    register_build,
    registry_name,
    show,
    validate_registry_name,
)
from registry.tracking import flow_run

NAME = "SmolLM2-135M-Instruct.gptq-w4g64"
CAL_REF = "calibration/" + "c" * 64


def _client(settings) -> MlflowClient:
    uri = settings.effective_mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _register(
    settings,
    ckpt: Path,
    build_key: str,
    *,
    ppl: float = 12.0,
    gate: PromotionGate | None = None,
    name: str = NAME,
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    revision: str = "rev1",
    recipe: str = "gptq-w4g64",
    bits: int = 4,
    protocol: str | None = None,
) -> ModelVersionInfo:
    with flow_run("quantize", params={}, tags={}, settings=settings) as run_id:
        pass
    tags = {
        "base_model": model,
        "base_revision": revision,
        "recipe": recipe,
        "bits": str(bits),
        "key.calibration": CAL_REF,
        "key.pack": "pack/" + build_key.ljust(64, "0")[:64],
        "hf_token": "hf_SECRET",
        **({"eval_protocol": protocol} if protocol else {}),
    }
    return register_build(
        name,
        ckpt,
        run_id=run_id,
        tags=tags,
        metrics={"ppl": ppl, "ppl_fp": 10.0},
        build_key=build_key,
        gate=gate,
        settings=settings,
    )


def _id(info: ModelVersionInfo | None) -> tuple[str, str] | None:
    return None if info is None else (info.name, info.version)


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "", "x" * 201, "nodot", ".hidden.x", "a..b", "a.b/../c", "a b.c", "a.b'", "-a.b"]
)
def test_invalid_registry_names_raise_config_error(bad):
    with pytest.raises(ConfigError) as err:
        validate_registry_name(bad)
    assert "\n" not in str(err.value)


def test_registry_name_uses_last_path_component():
    assert registry_name("HuggingFaceTB/SmolLM2-135M-Instruct", "gptq-w4g64") == NAME
    assert registry_name("Qwen2.5-0.5B", "rtn-w3") == "Qwen2.5-0.5B.rtn-w3"
    assert validate_registry_name("x" * 100 + "." + "y" * 99) == "x" * 100 + "." + "y" * 99
    with pytest.raises(ConfigError):
        registry_name("model", "../../etc")


def test_invalid_name_rejected_before_touching_mlflow(settings, checkpoint_dir):
    with pytest.raises(ConfigError):
        register_build(
            "../evil", checkpoint_dir, run_id="r", tags={}, metrics={}, build_key="k", gate=None, settings=settings
        )
    with pytest.raises(ConfigError):
        show("a/b", "1", settings=settings)


# ------------------------------------------------------------------------------------------------ gates
@pytest.mark.parametrize(
    ("gate", "metrics", "passed", "reason"),
    [
        (PromotionGate(), {}, True, "no gate"),
        (PromotionGate(max_ppl=15), {"ppl": 14.0}, True, "ppl 14 <= max_ppl 15"),
        (PromotionGate(max_ppl=15), {"ppl": 15.5}, False, "ppl 15.5 > max_ppl 15"),
        (PromotionGate(max_ppl=15), {}, False, "metric 'ppl' missing"),
        (PromotionGate(max_ppl=15), {"ppl": float("nan")}, False, "metric 'ppl' missing"),
        (PromotionGate(max_ppl_increase=0.2), {"ppl": 11.9, "ppl_fp": 10.0}, True, "+19.0% over fp 10"),
        (PromotionGate(max_ppl_increase=0.2), {"ppl": 12.5, "ppl_fp": 10.0}, False, "+25.0% over fp 10"),
        (PromotionGate(max_ppl_increase=0.2), {"ppl": 11.0}, False, "'ppl_fp' missing"),
        (PromotionGate(max_ppl=20, max_ppl_increase=0.1), {"ppl": 12.0, "ppl_fp": 10.0}, False, "+20.0%"),
    ],
)
def test_promotion_gate(gate, metrics, passed, reason):
    ok, why = gate.evaluate(metrics)
    assert ok is passed
    assert reason in why


def test_promotion_gate_is_frozen_and_validated():
    gate = PromotionGate(max_ppl=10)
    with pytest.raises(ValidationError):
        gate.max_ppl = 11  # type: ignore[misc]
    with pytest.raises(ValidationError):
        PromotionGate(max_ppl_increase=-0.1)
    with pytest.raises(ValidationError):
        PromotionGate(max_ppl_inc=0.1)  # type: ignore[call-arg]


def test_model_version_info_normalises_version():
    info = ModelVersionInfo(name=NAME, version=3, source="s")  # type: ignore[arg-type]
    assert info.version == "3"
    assert info.uri == f"models:/{NAME}/3"
    assert info.model_dump()["uri"] == f"models:/{NAME}/3"


# ------------------------------------------------------------------------------------------------ register
def test_register_creates_version_one_with_candidate(settings, checkpoint_dir):
    info = _register(settings, checkpoint_dir, "a" * 64)
    assert info.version == "1"
    assert info.name == NAME
    assert info.uri == f"models:/{NAME}/1"
    assert info.aliases == ["candidate"]  # no gate given: never champion
    assert info.source.endswith("/model")
    assert info.source.startswith(settings.effective_mlflow_artifact_location)
    assert info.tags["build_key"] == "a" * 64
    assert info.tags["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.tags["metric.ppl"] == "12.0"
    assert info.metrics == {"ppl": 12.0, "ppl_fp": 10.0}
    assert info.tags["gate"] == "none"
    assert info.tags["register_status"] == "complete"
    assert "hf_token" not in info.tags
    client = _client(settings)
    assert info.run_id is not None
    assert {f.path for f in client.list_artifacts(info.run_id, "model")} == {
        "model/config.json",
        "model/model.safetensors",
        "model/kernels",
    }
    mv = client.get_model_version(NAME, "1")
    assert mv.run_id == info.run_id


def test_same_build_key_never_duplicates(settings, checkpoint_dir):
    first = _register(settings, checkpoint_dir, "a" * 64)
    again = _register(settings, checkpoint_dir, "a" * 64)
    assert again.version == first.version == "1"
    assert again.run_id == first.run_id
    assert [v.version for v in list_versions(NAME, settings=settings)] == ["1"]
    other = _register(settings, checkpoint_dir, "b" * 64)
    assert other.version == "2"
    assert [v.version for v in list_versions(NAME, settings=settings)] == ["2", "1"]
    assert show(NAME, "candidate", settings=settings).version == "2"


def test_rerun_completes_a_registration_interrupted_before_aliases(settings, checkpoint_dir):
    client = _client(settings)
    with flow_run("crashed", params={}, tags={}, settings=settings) as run_id:
        pass
    client.create_registered_model(NAME)
    client.create_model_version(
        NAME, source="file:///nowhere", run_id=run_id, tags={"build_key": "k1", "gate": "passed"}
    )
    info = _register(settings, checkpoint_dir, "k1", gate=PromotionGate())
    assert info.version == "1"
    assert set(info.aliases) == {"candidate", "champion"}
    assert info.tags["register_status"] == "complete"


def test_gate_pass_sets_champion_and_failure_does_not(settings, checkpoint_dir):
    failed = _register(settings, checkpoint_dir, "k1", ppl=13.0, gate=PromotionGate(max_ppl_increase=0.2))
    assert failed.aliases == ["candidate"]
    assert failed.tags["gate"] == "failed"
    assert "+30.0%" in failed.tags["gate_reason"]
    assert "gate failed" in failed.tags["promotion"]
    assert lookup(name=NAME, alias="champion", settings=settings) is None
    passed = _register(settings, checkpoint_dir, "k2", ppl=11.0, gate=PromotionGate(max_ppl_increase=0.2))
    assert set(passed.aliases) == {"candidate", "champion"}
    assert passed.tags["gate"] == "passed"
    assert show(NAME, "1", settings=settings).aliases == []


def test_champion_compares_only_builds_of_one_evaluation_protocol(settings, checkpoint_dir):
    """A 2-window evaluation's lower ppl must not unseat a champion measured on 16 windows (issue: the gate
    compared perplexities measured under different settings)."""
    gate = PromotionGate(max_ppl=20)
    v1 = _register(settings, checkpoint_dir, "p1", ppl=12.0, gate=gate, protocol="sixteen-windows")
    assert "champion" in v1.aliases
    v2 = _register(settings, checkpoint_dir, "p2", ppl=9.0, gate=gate, protocol="two-windows")
    assert v2.aliases == ["candidate"] and "another protocol" in v2.tags["promotion"]
    v3 = _register(settings, checkpoint_dir, "p3", ppl=11.0, gate=gate, protocol="sixteen-windows")
    assert "champion" in v3.aliases


def test_champion_not_moved_to_worse_build(settings, checkpoint_dir):
    gate = PromotionGate(max_ppl=20)
    v1 = _register(settings, checkpoint_dir, "k1", ppl=12.0, gate=gate)
    assert "champion" in v1.aliases
    v2 = _register(settings, checkpoint_dir, "k2", ppl=13.0, gate=gate)
    assert v2.aliases == ["candidate"]
    assert "champion kept" in v2.tags["promotion"]
    assert show(NAME, "champion", settings=settings).version == "1"
    v3 = _register(settings, checkpoint_dir, "k3", ppl=11.5, gate=gate)
    assert set(v3.aliases) == {"candidate", "champion"}
    v4 = _register(settings, checkpoint_dir, "k4", ppl=11.5, gate=gate)  # equal quality: newest takes over
    assert set(v4.aliases) == {"candidate", "champion"}
    v5 = _register(settings, checkpoint_dir, "k5", ppl=11.0, gate=None)  # better but ungated: no promotion
    assert v5.aliases == ["candidate"]
    assert show(NAME, "champion", settings=settings).version == "4"


def test_register_errors(settings, checkpoint_dir, tmp_path):
    with pytest.raises(RegistryNotFoundError, match="does not exist"):
        register_build(
            NAME, tmp_path / "nope", run_id="r", tags={}, metrics={}, build_key="k", gate=None, settings=settings
        )
    with pytest.raises(RegistryNotFoundError):
        register_build(
            NAME, checkpoint_dir, run_id="0" * 32, tags={}, metrics={}, build_key="k", gate=None, settings=settings
        )
    with pytest.raises(ConfigError):
        register_build(
            NAME, checkpoint_dir, run_id="r", tags={}, metrics={}, build_key="k'x", gate=None, settings=settings
        )


# ------------------------------------------------------------------------------------------------ lookup
@pytest.fixture
def populated(settings, checkpoint_dir):
    """Two models x recipes/bits/revisions; returns {label: ModelVersionInfo}."""
    gate = PromotionGate(max_ppl=100)
    small = "HuggingFaceTB/SmolLM2-135M-Instruct"
    out = {
        "w4_rev1": _register(settings, checkpoint_dir, "b1", gate=gate, revision="rev1", ppl=12.0),
        "w4_rev2": _register(settings, checkpoint_dir, "b2", gate=gate, revision="rev2", ppl=13.0),
        "w3": _register(
            settings, checkpoint_dir, "b3", name="SmolLM2-135M-Instruct.gptq-w3g64", recipe="gptq-w3g64", bits=3
        ),
        "other": _register(settings, checkpoint_dir, "b4", name="Other-1B.gptq-w4g64", model="org/Other-1B", gate=gate),
    }
    assert out["w4_rev2"].tags["base_model"] == small
    return out


def test_lookup_by_tags_newest_wins(settings, populated):
    small = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _id(lookup(model=small, settings=settings)) == _id(populated["w3"])
    assert _id(lookup(model=small, bits=4, settings=settings)) == _id(populated["w4_rev2"])
    assert _id(lookup(model=small, bits=4, revision="rev1", settings=settings)) == _id(populated["w4_rev1"])
    assert _id(lookup(recipe="gptq-w3g64", settings=settings)) == _id(populated["w3"])
    assert _id(lookup(model="org/Other-1B", settings=settings)) == _id(populated["other"])
    assert _id(lookup(name=NAME, settings=settings)) == _id(populated["w4_rev2"])
    assert _id(lookup(bits=4, settings=settings)) == _id(populated["other"])


def test_lookup_by_alias(settings, populated):
    small = "HuggingFaceTB/SmolLM2-135M-Instruct"
    champion = lookup(name=NAME, alias="champion", settings=settings)
    assert champion is not None
    assert champion.version == "1"  # rev2 build had a worse ppl
    assert "champion" in champion.aliases
    assert _id(lookup(model=small, bits=4, alias="champion", settings=settings)) == _id(champion)
    assert _id(lookup(model=small, bits=4, alias="candidate", settings=settings)) == _id(populated["w4_rev2"])
    assert lookup(name=NAME, alias="champion", revision="rev2", settings=settings) is None
    assert lookup(model=small, bits=3, alias="champion", settings=settings) is None  # w3 was ungated


def test_lookup_returns_none_when_nothing_matches(settings, populated):
    assert lookup(model="nobody/nothing", settings=settings) is None
    assert lookup(model="HuggingFaceTB/SmolLM2-135M-Instruct", bits=2, settings=settings) is None
    assert lookup(name="Missing.model", settings=settings) is None
    assert lookup(name="Missing.model", alias="champion", settings=settings) is None
    assert lookup(name=NAME, alias="nosuchalias", settings=settings) is None


def test_lookup_argument_errors(settings):
    with pytest.raises(ConfigError):
        lookup(settings=settings)
    with pytest.raises(ConfigError):
        lookup(model="x' or name = 'y", settings=settings)
    with pytest.raises(ConfigError):
        lookup(name="../x", settings=settings)
    with pytest.raises(ConfigError):
        lookup(name=NAME, alias="v1", settings=settings)


def test_lookup_is_a_single_filtered_search(settings, populated, monkeypatch):
    calls: list[str] = []
    original = MlflowClient.search_model_versions

    def spy(self, filter_string=None, *args, **kwargs):
        calls.append(filter_string)
        return original(self, filter_string, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_model_versions", spy)
    lookup(model="HuggingFaceTB/SmolLM2-135M-Instruct", bits=4, settings=settings)
    assert calls == ["tags.base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct' and tags.bits = '4'"]


# ------------------------------------------------------------------------------------------------ aliases etc.
def test_promote_and_demote(settings, checkpoint_dir):
    _register(settings, checkpoint_dir, "k1")
    _register(settings, checkpoint_dir, "k2")
    promoted = promote(NAME, "1", settings=settings)
    assert promoted.aliases == ["champion"]
    assert show(NAME, "champion", settings=settings).version == "1"
    assert promote(NAME, 2, alias="production", settings=settings).aliases == ["candidate", "production"]
    assert demote(NAME, settings=settings) is True
    assert demote(NAME, settings=settings) is False
    with pytest.raises(RegistryNotFoundError, match="no alias 'champion'"):
        show(NAME, "champion", settings=settings)
    with pytest.raises(RegistryNotFoundError):
        promote(NAME, "9", settings=settings)
    with pytest.raises(RegistryNotFoundError):
        demote("Missing.model", settings=settings)
    with pytest.raises(ConfigError):
        promote(NAME, "1", alias="latest", settings=settings)


def test_show_missing(settings, checkpoint_dir):
    with pytest.raises(RegistryNotFoundError, match="no version 1"):
        show("Missing.model", "1", settings=settings)
    _register(settings, checkpoint_dir, "k1")
    with pytest.raises(RegistryNotFoundError, match="no version 7"):
        show(NAME, "7", settings=settings)


def test_lineage_tags(settings, checkpoint_dir):
    info = _register(settings, checkpoint_dir, "k1")
    tags = lineage_tags(NAME, info.version, settings=settings)
    assert tags == {"key.calibration": CAL_REF, "key.pack": "pack/k1" + "0" * 62}


def test_list_versions_all_models(settings, populated):
    listed = list_versions(settings=settings)
    assert [(v.name, v.version) for v in listed] == [
        ("Other-1B.gptq-w4g64", "1"),
        ("SmolLM2-135M-Instruct.gptq-w3g64", "1"),
        (NAME, "2"),
        (NAME, "1"),
    ]
    assert "champion" in listed[3].aliases
    assert list_versions("Missing.model", settings=settings) == []


def test_download_version_gives_identical_files(settings, checkpoint_dir, tmp_path):
    _register(settings, checkpoint_dir, "k1", gate=PromotionGate())
    expected = _tree(checkpoint_dir)
    by_version = download_version(NAME, "1", tmp_path / "dl1", settings=settings)
    by_alias = download_version(NAME, "champion", tmp_path / "dl2", settings=settings)
    assert _tree(by_version) == expected
    assert _tree(by_alias) == expected
    assert by_version.is_relative_to(tmp_path / "dl1")
    with pytest.raises(RegistryNotFoundError):
        download_version(NAME, "5", tmp_path / "dl3", settings=settings)


def test_module_constants_document_lookup_tags():
    assert (models.TAG_BASE_MODEL, models.TAG_BASE_REVISION, models.TAG_RECIPE, models.TAG_BITS) == (
        "base_model",
        "base_revision",
        "recipe",
        "bits",
    )
