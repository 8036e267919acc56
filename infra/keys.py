"""Content-addressed keys for stage outputs.

key = sha256(canonical JSON of {stage, stage_version, config, input_keys}). ``stage_version`` is bumped by hand
when a stage's semantics change, so refactors never invalidate caches while real changes always do. Input keys
are the upstream artifacts' keys, so a changed upstream changes every downstream key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from infra.errors import ConfigError

__all__ = ["ArtifactRef", "artifact_key", "canonical_json", "validate_key", "validate_stage"]

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_STAGE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _normalise(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"non-finite float {value!r} cannot enter an artifact key")
        return value
    if hasattr(value, "model_dump"):
        return _normalise(value.model_dump(mode="json"))
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: the same config always hashes the same."""
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ConfigError(f"invalid artifact key {key!r}: expected 64 lowercase hex characters")
    return key


def validate_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ConfigError(f"invalid stage name {stage!r}: expected [a-z][a-z0-9_-]*")
    return stage


def artifact_key(stage: str, stage_version: int, config: Any, input_keys: Mapping[str, str]) -> str:
    """Key of a stage output; ``input_keys`` maps an input role (e.g. ``"hessians"``) to its ``stage/key``."""
    payload = {
        "stage": validate_stage(stage),
        "stage_version": int(stage_version),
        "config": config,
        "input_keys": dict(input_keys),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class ArtifactRef(str):
    """``"<stage>/<key>"``: the small, hashable handle that crosses task boundaries instead of tensors."""

    __slots__ = ()

    def __new__(cls, value: str) -> ArtifactRef:
        if not isinstance(value, str) or value.count("/") != 1:
            raise ConfigError(f"invalid artifact reference {value!r}: expected '<stage>/<64-hex key>'")
        stage, key = value.split("/")
        validate_stage(stage)
        validate_key(key)
        return super().__new__(cls, value)

    @classmethod
    def of(cls, stage: str, key: str) -> ArtifactRef:
        return cls(f"{stage}/{key}")

    @property
    def stage(self) -> str:
        return self.split("/")[0]

    @property
    def key(self) -> str:
        return self.split("/")[1]

    @property
    def short(self) -> str:
        return f"{self.stage}/{self.key[:12]}"
