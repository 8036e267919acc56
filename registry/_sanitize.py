"""Turn arbitrary config objects into values MLflow accepts, and keep secrets out of the tracking server.

Why this exists: stage configs are nested (recipes, pydantic models), MLflow params are flat strings with
hard limits (a too-long value or an odd key fails the whole ``log_batch``), and anything logged to a tracking
server is readable by everyone with access to it, forever. Redaction is therefore defensive and key-based:
a caller that passes its whole settings object by mistake still leaks nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretBytes, SecretStr

from infra.redact import redact

try:  # the limits moved around between MLflow releases; the fallbacks are MLflow 3.x values
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - depends on the installed MLflow
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 250, 6000, 8000

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_MODEL_TAG_LENGTH",
    "MAX_PARAM_LENGTH",
    "MAX_TAG_LENGTH",
    "clean_key",
    "flatten",
    "is_secret_key",
    "one_line",
    "sanitize",
]

MAX_KEY_LENGTH: int = MAX_ENTITY_KEY_LENGTH
MAX_PARAM_LENGTH: int = MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH: int = MAX_TAG_VAL_LENGTH
# Model-version tag values are limited by the database column on older servers; 5000 is safe everywhere.
MAX_MODEL_TAG_LENGTH = 5000

_TRUNCATION_MARK = "...[truncated]"
# Substrings that mark a key as secret wherever they occur.
_SECRET_SUBSTRINGS = (
    "secret",
    "password",
    "passwd",
    "key_id",
    "keyid",
    "api_key",
    "apikey",
    "private_key",
    "credential",
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")


def is_secret_key(key: str) -> bool:
    """True when ``key`` names a credential.

    ``secret``, ``password``, ``key_id``, ``api_key``, ... match anywhere. ``token`` matches as a whole word
    (``hf_token``, ``auth-token``, ``accessToken``, ``hftoken``) but not in ``tokenizer``, ``n_tokens`` or
    ``bos_token_id``: those are ordinary, non-secret calibration and model-config fields.
    """
    lowered = _CAMEL.sub("_", key).lower()
    if any(s in lowered for s in _SECRET_SUBSTRINGS):
        return True
    words = [w for w in _WORD_SPLIT.split(lowered) if w]
    for i, word in enumerate(words):
        if word == "token" or (word.endswith("token") and word != "token"):
            following = words[i + 1] if i + 1 < len(words) else ""
            if following not in ("id", "ids"):
                return True
    return False


def one_line(text: str, limit: int) -> str:
    """Collapse whitespace, redact credentials (:func:`infra.redact.redact`) and cut to ``limit`` characters with a
    visible mark. Redaction comes first: a cut through ``user:password@`` would hide it from the URL pattern."""
    text = redact(" ".join(str(text).split()))
    return truncate(text, limit)


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(_TRUNCATION_MARK))] + _TRUNCATION_MARK


def clean_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no path tricks, at most 250 characters.

    A long key is cut and suffixed with a short digest of the full key so two long keys never collide.
    """
    cleaned = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    cleaned = re.sub(r"/+", "/", cleaned).strip("/") or "_"
    # MLflow rejects keys that normalise to another path ("a/../b", "./a"): replace such segments.
    cleaned = "/".join(seg if seg not in (".", "..") else "_" for seg in cleaned.split("/"))
    if len(cleaned) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(str(key).encode()).hexdigest()[:12]
        cleaned = f"{cleaned[: MAX_KEY_LENGTH - 13]}~{digest}"
    return cleaned


def _to_plain(value: Any) -> Any:
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    return value


def flatten(value: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.key, leaf)`` for nested mappings (and pydantic models inside them)."""
    for raw_key, raw in value.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        item = _to_plain(raw)
        if isinstance(item, Mapping) and item:
            yield from flatten(item, key)
        else:
            yield key, item


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, Path | bool | int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)
    elif isinstance(value, list | tuple | set | frozenset | Mapping):
        text = json.dumps(
            sorted(value, key=str) if isinstance(value, set | frozenset) else value,
            default=str,
            sort_keys=True,
            separators=(",", ":"),
        )
    else:
        text = str(value)
    return redact(text)


def sanitize(values: Mapping[str, Any] | None, limit: int) -> dict[str, str]:
    """Flatten, drop secrets, clean keys and cut values to ``limit`` characters.

    A key is dropped (not masked) when any of its dotted parts names a secret, or when its value is a pydantic
    ``SecretStr``/``SecretBytes``; a password embedded in a URI value, a secret query parameter or a registered secret
    value (:mod:`infra.redact`) is replaced by ``***``.
    """
    out: dict[str, str] = {}
    if not values:
        return out
    for key, value in flatten(values):
        if is_secret_key(key) or isinstance(value, SecretStr | SecretBytes):
            continue
        out[clean_key(key)] = truncate(_stringify(value), limit)
    return out
