"""Settings sources and redaction; canonical keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.errors import ConfigError
from infra.keys import ArtifactRef, artifact_key, canonical_json
from infra.settings import Settings, default_wikitext_dir, redacted_settings


def test_env_overrides_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "qp.toml"
    toml.write_text('store_url = "s3://from-toml/x"\ns3_region = "eu-west-1"\n')
    monkeypatch.setenv("QUANTPIPE_CONFIG", str(toml))
    monkeypatch.setenv("QUANTPIPE_S3_REGION", "us-west-2")
    s = Settings(home=tmp_path)
    assert s.store_url == "s3://from-toml/x"
    assert s.s3_region == "us-west-2"  # env beats TOML


def test_defaults_are_embedded(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert s.effective_store_url == (tmp_path / "store").as_uri()
    assert s.effective_mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.effective_cache_dir == tmp_path / "cache"


def test_wikitext_default_points_at_shared() -> None:
    found = default_wikitext_dir()
    if found is not None:
        assert (found / "wiki.test.raw").is_file()


def test_secrets_redacted(tmp_path: Path) -> None:
    s = Settings(
        home=tmp_path,
        aws_secret_access_key="fake-very-secret",  # type: ignore[arg-type]
        mlflow_tracking_uri="postgresql://user:hunter2@127.0.0.1/mlflow",
    )
    text = json.dumps(redacted_settings(s))
    assert "fake-very-secret" not in text and "hunter2" not in text
    assert "***" in text
    assert "fake-very-secret" not in repr(s)


def test_unknown_setting_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stor_url"):
        Settings(home=tmp_path, stor_url="x")  # type: ignore[call-arg]


def test_key_is_order_independent_and_sensitive() -> None:
    a = artifact_key("quantize", 1, {"bits": 4, "group": 64}, {"hessians": "h/1"})
    b = artifact_key("quantize", 1, {"group": 64, "bits": 4}, {"hessians": "h/1"})
    assert a == b
    assert a != artifact_key("quantize", 2, {"bits": 4, "group": 64}, {"hessians": "h/1"})
    assert a != artifact_key("quantize", 1, {"bits": 3, "group": 64}, {"hessians": "h/1"})
    assert a != artifact_key("quantize", 1, {"bits": 4, "group": 64}, {"hessians": "h/2"})


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=6))
def test_canonical_json_stable(d: dict) -> None:
    assert canonical_json(d) == canonical_json(dict(reversed(list(d.items()))))
    assert json.loads(canonical_json(d)) == d


def test_nan_cannot_enter_a_key() -> None:
    with pytest.raises(ConfigError, match="non-finite"):
        artifact_key("quantize", 1, {"damp": float("nan")}, {})


@pytest.mark.parametrize("bad", ["", "a/b", "../" + "0" * 64, "Stage/" + "0" * 64, "x/" + "0" * 63, "x/y/z"])
def test_artifact_ref_validation(bad: str) -> None:
    with pytest.raises(ConfigError):
        ArtifactRef(bad)


def test_artifact_ref_parts() -> None:
    ref = ArtifactRef.of("pack", "a" * 64)
    assert ref.stage == "pack" and ref.key == "a" * 64 and ref.short == "pack/aaaaaaaaaaaa"
