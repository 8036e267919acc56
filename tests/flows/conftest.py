"""Fixtures for end-to-end flow tests: an isolated home, a tiny WikiText-like corpus, a tiny recipe."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, get_settings
from tasks.recipe import Recipe

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "what",
    "no",
    "more",
    "out",
    "up",
    "into",
    "can",
    "said",
    "quantization",
    "weight",
    "matrix",
    "column",
    "layer",
    "model",
    "grid",
    "error",
    "hessian",
]


def write_corpus(path: Path, n_lines: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 0:
            lines.append(" = Heading {} = ".format(" ".join(rng.choices(_WORDS, k=2))))
        elif i % 5 == 0:
            lines.append(" ")
        else:
            lines.append(" " + " ".join(rng.choices(_WORDS, k=rng.randint(8, 30))) + " . ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_wikitext(d: Path) -> Path:
    """Fill ``d`` as a tiny WikiText-2 raw dir: wiki.valid.raw (calibration) and wiki.test.raw (evaluation)."""
    write_corpus(d / "wiki.valid.raw", 400, 1)
    write_corpus(d / "wiki.test.raw", 300, 2)
    return d


def isolated_home(mp: pytest.MonkeyPatch, home_dir: Path, wikitext_dir: Path) -> Iterator[Settings]:
    """Fixture body: QUANTPIPE_HOME = ``home_dir`` (local store, sqlite MLflow) and the tiny corpus, yielding the
    settings; on teardown the environment is restored and the settings cache refreshed from it."""
    mp.setenv("QUANTPIPE_HOME", str(home_dir))
    mp.setenv("QUANTPIPE_WIKITEXT_DIR", str(wikitext_dir))
    yield get_settings(refresh=True)
    mp.undo()
    get_settings(refresh=True)


@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wikitext(tmp_path_factory.mktemp("wikitext"))


@pytest.fixture
def home(tmp_path: Path, wikitext_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    yield from isolated_home(monkeypatch, tmp_path / "home", wikitext_dir)


def _grid_default(quantize: dict[str, object]) -> dict[str, object]:
    """Group size 32 for the methods with group grids (E8P has one scale per row and no group_size field)."""
    return {} if quantize.get("method") == "hadamard-e8p" else {"group_size": 32}


def tiny_recipe(**quantize: object) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "tiny-gptq",
            "calibration": {"n_samples": 8, "seq_len": 64},
            "quantize": {"method": "gptq", "bits": 4, **_grid_default(quantize), **quantize},
            "eval": {"seq_len": 128, "n_windows": 3},
            "registry": {"max_ppl_increase": 0.5},
        }
    )
