"""Fixtures for the operations tests: an isolated home with a tiny WikiText-like corpus, tiny model releases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, get_settings
from tests.flows.conftest import write_corpus


@pytest.fixture(scope="session")
def ops_wikitext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ops-wikitext")
    write_corpus(d / "wiki.valid.raw", 400, 1)
    write_corpus(d / "wiki.test.raw", 300, 2)
    return d


@pytest.fixture
def ops_home(tmp_path: Path, ops_wikitext_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """QUANTPIPE_HOME in tmp_path (local store, sqlite MLflow) and the tiny corpus, for this test only."""
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(ops_wikitext_dir))
    yield get_settings(refresh=True)
    monkeypatch.undo()
    get_settings(refresh=True)
