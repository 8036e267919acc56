"""WikiText-2 raw (test + validation) shipped with quantpipe, so the demo and the default protocol run offline.

The splits are stored xz-compressed under ``tasks/data/wikitext-2-raw/`` (CC BY-SA 3.0, attribution beside them,
0.7 MB) and extracted once into the cache, each checked against its pinned sha256, so a damaged install is
refused rather than measured on. ``QUANTPIPE_WIKITEXT_DIR`` (a local copy) and the dataset name ``wikitext2-hub``
(Hugging Face ``datasets``) stay available.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import uuid
from pathlib import Path

from infra.errors import ConfigError

__all__ = ["BUNDLED_DIR", "WIKITEXT_SHA256", "bundled_wikitext_dir"]

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "wikitext-2-raw"
WIKITEXT_SHA256 = {
    "wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundled_wikitext_dir(cache_dir: Path) -> Path:
    """A directory with the bundled ``wiki.test.raw`` / ``wiki.valid.raw``, extracted (once) under ``cache_dir``."""
    out = Path(cache_dir) / "wikitext-2-raw-bundled"
    out.mkdir(parents=True, exist_ok=True)
    for name, digest in WIKITEXT_SHA256.items():
        target = out / name
        if target.is_file() and _sha256(target) == digest:
            continue
        source = BUNDLED_DIR / f"{name}.xz"
        try:
            data = lzma.decompress(source.read_bytes())
        except (OSError, lzma.LZMAError):
            raise ConfigError(
                f"bundled WikiText-2 file {source} is missing or damaged; reinstall quantpipe or set "
                "QUANTPIPE_WIKITEXT_DIR to a directory with wiki.valid.raw / wiki.test.raw"
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ConfigError(f"bundled WikiText-2 file {source} does not match its pinned sha256; reinstall quantpipe")
        tmp = out / f".{name}.{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, target)  # concurrent extractions write the same bytes; the last rename wins
    return out
