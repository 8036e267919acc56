"""Fixtures for the operations tests: an isolated home with a tiny WikiText-like corpus, tiny model releases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from tests.flows.conftest import isolated_home, write_wikitext


@pytest.fixture(scope="session")
def ops_wikitext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wikitext(tmp_path_factory.mktemp("ops-wikitext"))


@pytest.fixture
def ops_home(tmp_path: Path, ops_wikitext_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """QUANTPIPE_HOME in tmp_path (local store, sqlite MLflow) and the tiny corpus, for this test only."""
    yield from isolated_home(monkeypatch, tmp_path / "home", ops_wikitext_dir)
