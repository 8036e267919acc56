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


@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wikitext")
    write_corpus(d / "wiki.valid.raw", 400, 1)
    write_corpus(d / "wiki.test.raw", 300, 2)
    return d


@pytest.fixture
def home(tmp_path: Path, wikitext_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(wikitext_dir))
    yield get_settings(refresh=True)
    get_settings(refresh=True)


def tiny_recipe(**quantize: object) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "tiny-gptq",
            "calibration": {"n_samples": 8, "seq_len": 64},
            "quantize": {"method": "gptq", "bits": 4, "group_size": 32, **quantize},
            "eval": {"seq_len": 128, "n_windows": 3},
            "registry": {"max_ppl_increase": 0.5},
        }
    )
