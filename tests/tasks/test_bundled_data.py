"""The WikiText-2 copy shipped with quantpipe: what the demo reads on a machine with no hub and no ../shared."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.settings import Settings
from tasks import bundled_data
from tasks.bundled_data import WIKITEXT_SHA256, bundled_wikitext_dir
from tasks.calibration import describe_text_source, load_texts


def test_extracts_the_pinned_files(tmp_path: Path) -> None:
    out = bundled_wikitext_dir(tmp_path)
    for name, digest in WIKITEXT_SHA256.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    again = bundled_wikitext_dir(tmp_path)  # second call: verified, not rewritten
    assert again == out


def test_wikitext2_without_a_local_copy_reads_the_bundled_text(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, wikitext_dir=None)
    text, provenance = load_texts("wikitext2", settings, split="test")
    assert text.lstrip().startswith("= Robert Boulter =")
    assert provenance["sha256"] == {"wiki.test.raw": WIKITEXT_SHA256["wiki.test.raw"]}
    assert "shipped with quantpipe" in describe_text_source("wikitext2", settings)


def test_a_damaged_bundle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bundle"
    fake.mkdir()
    (fake / "wiki.test.raw.xz").write_bytes(b"not xz")
    monkeypatch.setattr(bundled_data, "BUNDLED_DIR", fake)
    with pytest.raises(ConfigError, match="missing or damaged"):
        bundled_wikitext_dir(tmp_path / "cache")
