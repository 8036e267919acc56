"""Artifact store: one interface (:class:`ArtifactStore`), a local and an S3 backend, chosen by URL scheme."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from infra.errors import ConfigError
from infra.settings import Settings, get_settings
from infra.store.base import ArtifactStore, ArtifactWriter, LocalArtifact, VerifyReport
from infra.store.local import LocalStore
from infra.store.s3 import S3Store

__all__ = [
    "ArtifactStore",
    "ArtifactWriter",
    "LocalArtifact",
    "LocalStore",
    "S3Store",
    "VerifyReport",
    "open_store",
]


def open_store(url: str | None = None, settings: Settings | None = None, *, check: bool = False) -> ArtifactStore:
    """The store at ``url`` (default: the settings' store URL); ``check=True`` fails fast when unusable."""
    settings = settings or get_settings()
    url = url or settings.effective_store_url
    scheme = urlparse(url).scheme
    store: ArtifactStore
    if scheme == "file":
        path = unquote(urlparse(url).path)
        if not path:
            raise ConfigError(f"store URL {url!r} has no path: use file:///absolute/dir")
        store = LocalStore(Path(path))
    elif scheme == "" and url.startswith("/"):
        store = LocalStore(Path(url))
    elif scheme == "s3":
        creds: dict[str, str] = {}
        if settings.aws_access_key_id and settings.aws_secret_access_key:
            creds["aws_access_key_id"] = settings.aws_access_key_id.get_secret_value()
            creds["aws_secret_access_key"] = settings.aws_secret_access_key.get_secret_value()
            if settings.aws_session_token:
                creds["aws_session_token"] = settings.aws_session_token.get_secret_value()
        store = S3Store(
            url,
            cache_dir=settings.effective_cache_dir,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            credentials=creds,
            max_attempts=settings.s3_max_attempts,
            multipart_threshold_mb=settings.s3_multipart_threshold_mb,
        )
    else:
        raise ConfigError(
            f"unknown store scheme {scheme!r} in {url!r}: QUANTPIPE_STORE_URL must be file:///dir or s3://bucket/prefix"
        )
    if settings.store_signing_key is not None:
        store.signing_key = settings.store_signing_key.get_secret_value().encode()
    if check:
        store.check()
    return store
