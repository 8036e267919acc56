"""Fixtures of the reliability suite: a fork server for real pipeline processes and one reference run.

``@pytest.mark.reliability_full`` tests are skipped unless ``-m reliability_full`` selects them or
``QUANTPIPE_RELIABILITY_FULL=1`` is set (``benchmarks/reliability_report.py --full`` does that).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import (
    TINY_RECIPE_YAML,
    FileSig,
    ForkServer,
    PipelineInputs,
    fork_server,
    full_mode,
    store_files,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = "reliability_full" in (config.getoption("markexpr", "") or "")
    if selected or full_mode():
        return
    skip = pytest.mark.skip(reason="full reliability suite: -m reliability_full or QUANTPIPE_RELIABILITY_FULL=1")
    for item in items:
        if "reliability_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rel_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def rel_inputs(rel_tmp: Path, tiny_llama_dir: Path) -> PipelineInputs:
    from tests.flows.conftest import write_wikitext

    wiki = rel_tmp / "wikitext"
    wiki.mkdir()
    write_wikitext(wiki)
    recipe = rel_tmp / "tiny-gptq.yaml"
    recipe.write_text(TINY_RECIPE_YAML)
    return PipelineInputs(model_dir=tiny_llama_dir, wikitext_dir=wiki, recipe=recipe)


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness: None) -> str:
    """The harness server's API URL, handed to child processes so none starts its own ephemeral server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1"), url
    return str(url)


@pytest.fixture(scope="session")
def forks(prefect_api_url: str, rel_tmp: Path) -> Iterator[ForkServer]:
    with fork_server(prefect_api_url, rel_tmp / "prefect-home") as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_template(rel_tmp: Path) -> Path:
    """An initialised, empty MLflow sqlite DB: copied into run homes so runs skip the schema migration."""
    from infra.settings import Settings
    from registry.tracking import get_client

    home = rel_tmp / "mlflow-template"
    get_client(Settings(home=home))
    return home / "mlflow.db"


def seed_home(home: Path, template: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, home / "mlflow.db")
    return home


@dataclass(frozen=True)
class Reference:
    home: Path
    files: dict[str, FileSig]
    seconds: float
    outcome: dict[str, Any]
    timeline: dict[str, tuple[float, float]]  # stage -> (start, end) seconds after the process started

    @property
    def store(self) -> Path:
        return self.home / "store"

    def copy_home(self, dest: Path) -> Path:
        """A private copy of the reference home (store + MLflow), for tests that damage it."""
        shutil.copytree(self.home, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def reference(forks: ForkServer, rel_inputs: PipelineInputs, rel_tmp: Path, mlflow_template: Path) -> Reference:
    """One uninterrupted run of ``quantpipe quantize`` on the tiny model: the ground truth for the suite."""
    home = seed_home(rel_tmp / "reference-home", mlflow_template)
    started = time.time()
    (result,) = forks.run([rel_inputs.job(home, rel_tmp / "reference.log")])
    assert result.rc == 0, result.tail(40)
    outcome = result.outcome()
    assert outcome is not None, result.tail(40)
    files = store_files(home / "store")
    assert len(files) >= 10
    return Reference(
        home=home, files=files, seconds=result.seconds, outcome=outcome, timeline=_timeline(home, started, result)
    )


def _timeline(home: Path, started: float, result: Any) -> dict[str, tuple[float, float]]:
    """When each stage ran in the reference process, from its artifacts' manifest timestamps."""
    from datetime import datetime

    from infra.store import LocalStore

    store = LocalStore(home / "store")
    ends: dict[str, float] = {}
    for ref in store.list():
        t = datetime.fromisoformat(store.manifest(ref).created_at).timestamp() - started
        ends[ref.stage] = max(ends.get(ref.stage, 0.0), t)
    order = [("startup", "model"), ("calibration", "calibration"), ("hessians", "hessians")]
    order += [("quantize", "quantize"), ("pack", "pack"), ("evaluate", "evaluate")]
    timeline: dict[str, tuple[float, float]] = {}
    previous = 0.0
    for name, stage in order:
        timeline[name] = (previous, ends[stage])
        previous = ends[stage]
    timeline["register"] = (previous, result.seconds)
    return timeline
