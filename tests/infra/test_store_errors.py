"""One-line errors for stores that cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.errors import ConfigError, StoreError, StoreUnreachableError
from infra.settings import Settings
from infra.store import open_store


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown store scheme 'gs'.*QUANTPIPE_STORE_URL"):
        open_store("gs://bucket/x", Settings(home=tmp_path))


def test_s3_url_without_bucket(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no bucket"):
        open_store("s3:///prefix", Settings(home=tmp_path))


def test_unreachable_endpoint(tmp_path: Path) -> None:
    from tests.conftest import free_port

    settings = Settings(home=tmp_path, s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    with pytest.raises(StoreUnreachableError, match="cannot reach S3 endpoint http://127.0.0.1"):
        open_store("s3://bucket/x", settings, check=True)


def test_missing_bucket(tmp_path: Path, moto_server: str, s3_bucket: str) -> None:
    settings = Settings(home=tmp_path, s3_endpoint_url=moto_server, s3_max_attempts=1)
    with pytest.raises(StoreError, match="bucket|S3 error"):
        open_store("s3://no-such-bucket/x", settings, check=True)


def test_missing_credentials(tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    settings = Settings(home=tmp_path, s3_endpoint_url=moto_server, s3_max_attempts=1)
    with pytest.raises(StoreUnreachableError, match="no AWS credentials"):
        open_store("s3://bucket/x", settings, check=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_home(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            open_store((ro / "store").as_uri(), Settings(home=tmp_path), check=True)
    finally:
        ro.chmod(0o700)


def test_unwritable_home_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store directory should be")
    with pytest.raises(StoreError, match="not writable.*QUANTPIPE_STORE_URL"):
        open_store((blocker / "store").as_uri(), Settings(home=tmp_path), check=True)
