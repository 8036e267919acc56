"""The one settings model of quantpipe.

Sources, highest priority first: explicit keyword arguments, ``QUANTPIPE_*`` environment variables, a TOML
file (``QUANTPIPE_CONFIG`` or ``$QUANTPIPE_HOME/config.toml`` or ``./quantpipe.toml``), then defaults that
need no set-up at all (local store, sqlite MLflow, ephemeral Prefect).

Example ``quantpipe.toml``::

    home = "/data/quantpipe"
    store_url = "s3://models/quantpipe"
    s3_endpoint_url = "http://127.0.0.1:9000"
    mlflow_tracking_uri = "http://127.0.0.1:5000"
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["Settings", "default_wikitext_dir", "get_settings", "redacted_settings"]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "hf_token", "store_signing_key")


def default_wikitext_dir() -> Path | None:
    """``../shared/data/wikitext-2-raw`` beside the checkout (or the working directory), when present."""
    for base in (_REPO_ROOT, Path.cwd()):
        candidate = (base / ".." / "shared" / "data" / "wikitext-2-raw").resolve()
        if (candidate / "wiki.test.raw").is_file():
            return candidate
    return None


def _toml_path() -> Path | None:
    explicit = os.environ.get("QUANTPIPE_CONFIG")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("QUANTPIPE_HOME", "~/.quantpipe")).expanduser()
    for candidate in (home / "config.toml", Path.cwd() / "quantpipe.toml"):
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    """Effective configuration; every field can be set as ``QUANTPIPE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="QUANTPIPE_", extra="forbid", validate_default=True)

    home: Path = Field(
        default=Path("~/.quantpipe"), description="Root for the local store, caches and the sqlite MLflow DB."
    )
    store_url: str | None = Field(
        default=None,
        description="Artifact store: file:///abs/dir or s3://bucket/prefix. Default file://$home/store.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI. Default sqlite:///$home/mlflow.db."
    )
    mlflow_artifact_location: str | None = Field(
        default=None,
        description="Where MLflow keeps run artifacts. Default $home/mlflow-artifacts (or the store).",
    )
    mlflow_experiment: str = Field(default="quantpipe", description="MLflow experiment for flow runs.")
    prefect_api_url: str | None = Field(
        default=None, description="Prefect API URL; unset means ephemeral Prefect (in-process)."
    )
    wikitext_dir: Path | None = Field(
        default_factory=default_wikitext_dir, description="Directory with wiki.test.raw / wiki.valid.raw."
    )
    data_dirs: Annotated[list[Path] | None, NoDecode] = Field(
        default=None,
        description="The only directories local calibration files may be read from (a JSON list, or paths joined "
        "by ':'). Default: $home/data, the working directory (unless it is / or the user's home) and wikitext_dir.",
    )
    cache_dir: Path | None = Field(default=None, description="Downloads and converted models. Default $home/cache.")
    s3_endpoint_url: str | None = Field(default=None, description="Custom S3 endpoint (MinIO, Ceph, moto).")
    s3_region: str | None = Field(default=None, description="S3 region; default from the AWS config.")
    s3_multipart_threshold_mb: int = Field(default=64, ge=5, description="Files above this use multipart upload.")
    s3_max_attempts: int = Field(default=5, ge=1, description="Attempts for transient S3 errors (with backoff).")
    aws_access_key_id: SecretStr | None = Field(default=None, description="Overrides the standard AWS chain.")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="Overrides the standard AWS chain.")
    aws_session_token: SecretStr | None = Field(default=None, description="Optional STS session token.")
    hf_token: SecretStr | None = Field(default=None, description="Hugging Face token for gated hub models.")
    store_signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC key for artifact manifests (16+ characters). With it, a manifest not written by a holder "
        "of the key is rejected as corrupt: set it for a store others can write to (a shared S3 bucket).",
        min_length=16,
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto picks CUDA when present.")
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default all cores.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("home", "cache_dir", "wikitext_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @field_validator("data_dirs", mode="before")
    @classmethod
    def _parse_dirs(cls, value: Any) -> Any:
        """``QUANTPIPE_DATA_DIRS``: a JSON list (``["/data/a", "/data/b"]``) or ``/data/a:/data/b``; empty = default."""
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            return json.loads(text) if text.startswith("[") else [p for p in text.split(os.pathsep) if p]
        return value

    @field_validator("data_dirs", mode="after")
    @classmethod
    def _expand_dirs(cls, value: list[Path] | None) -> list[Path] | None:
        return [p.expanduser().resolve() for p in value] if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _toml_path()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # Derived locations: properties so that an override of ``home`` moves all of them.
    @property
    def effective_store_url(self) -> str:
        return self.store_url or (self.home / "store").as_uri()

    @property
    def effective_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def effective_mlflow_artifact_location(self) -> str:
        return self.mlflow_artifact_location or (self.home / "mlflow-artifacts").as_uri()

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "cache"

    @property
    def effective_data_dirs(self) -> list[Path]:
        """Roots of local calibration files: ``data_dirs``, or $home/data, the working directory (not when it is
        the filesystem root or the user's home: that would open every file of the worker) and ``wikitext_dir``."""
        if self.data_dirs is not None:
            return list(self.data_dirs)
        dirs = [self.home / "data"]
        cwd = Path.cwd().resolve()
        try:
            user_home = Path.home().resolve()
        except RuntimeError:  # no home directory known
            user_home = None
        if cwd != Path(cwd.anchor) and cwd != user_home:
            dirs.append(cwd)
        if self.wikitext_dir is not None:
            dirs.append(self.wikitext_dir)
        return dirs

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # local: infra must stay importable without touching CUDA at import time

        return "cuda" if torch.cuda.is_available() else "cpu"


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """Effective settings as plain JSON-able values, secrets replaced by ``'***'`` (or ``None`` when unset).

    Secret fields are masked whole; every other text value goes through :mod:`infra.redact` (passwords in URLs,
    secret query parameters, registered secret values), whatever the field: the Prefect API URL, the S3 endpoint,
    the store URL and the MLflow artifact location may all carry ``user:password@``.
    """
    from pydantic import SecretBytes

    from infra.redact import register_settings

    register_settings(settings)  # so those passwords are also masked wherever else they show up
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name in _SECRET_FIELDS or isinstance(value, SecretStr | SecretBytes):
            out[name] = "***" if value is not None else None
        elif isinstance(value, Path):
            out[name] = str(value)
        elif isinstance(value, str):
            out[name] = _redact_uri(value)
        else:
            out[name] = value
    out["effective_store_url"] = _redact_uri(settings.effective_store_url)
    out["effective_mlflow_uri"] = _redact_uri(settings.effective_mlflow_uri)
    out["effective_cache_dir"] = str(settings.effective_cache_dir)
    return out


def _redact_uri(uri: str) -> str:
    """Hide credentials in a URI (``postgresql://user:pw@host`` -> ``postgresql://user:***@host``) and any
    registered secret value in any text: :func:`infra.redact.redact_url`."""
    from infra.redact import redact_url

    return redact_url(uri)


@lru_cache(maxsize=1)
def _cached() -> Settings:
    from pydantic import ValidationError

    from infra.errors import ConfigError

    try:
        return Settings()
    except ValidationError as exc:  # a bad QUANTPIPE_* variable or config file entry: one line naming it
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        where = f"QUANTPIPE_{field.upper()}" if first["type"] != "extra_forbidden" else f"{field!r} in the config file"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {where}: {first['msg']}{more}") from None


def get_settings(refresh: bool = False) -> Settings:
    """Process-wide settings; ``refresh=True`` re-reads the environment (tests, CLI overrides)."""
    if refresh:
        _cached.cache_clear()
    return _cached()
