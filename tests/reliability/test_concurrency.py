"""Concurrency: several flow runs of the same model/recipe at once, as processes and as threads.

Every artifact is written by exactly one winner (the others discard their staging copy and read the winner's),
so the store ends with the reference run's keys and bytes, nothing torn, and the MLflow registry with one
version per distinct build.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from tests.reliability.conftest import Reference, seed_home
from tests.reliability.harness import ForkServer, PipelineInputs, compare_stores, record, store_files, verify_all

pytestmark = pytest.mark.slow


def _versions(home: Path, name: str) -> list[Any]:
    from registry.models import list_versions

    return list_versions(name, settings=Settings(home=home))


def test_concurrent_processes_same_and_different_builds(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, mlflow_template: Path, tmp_path: Path
) -> None:
    """Three processes on one home: two identical builds and one 3-bit build of the same recipe name."""
    home = seed_home(tmp_path / "home", mlflow_template)
    jobs = [
        rel_inputs.job(home, tmp_path / "a1.log"),
        rel_inputs.job(home, tmp_path / "a2.log"),
        rel_inputs.job(home, tmp_path / "b.log", extra_argv=["--set", "quantize.bits=3"]),
    ]
    results = forks.run(jobs)
    for r in results:
        assert r.rc == 0, r.tail()
    outcomes = [r.outcome() for r in results]
    assert all(o is not None for o in outcomes)
    a1, a2, b = outcomes
    assert a1 and a2 and b
    assert {k: v["key"] for k, v in a1["stages"].items()} == {k: v["key"] for k, v in a2["stages"].items()}
    assert verify_all(home / "store") == []
    files = store_files(home / "store")
    assert compare_stores(reference.files, {r: files[r] for r in files if r in reference.files}) == []
    assert set(reference.files) <= set(files)
    versions = _versions(home, reference.outcome["model_name"])
    build_keys = [v.tags.get("build_key") for v in versions]
    assert len(versions) == 2 and len(set(build_keys)) == 2, [(v.version, v.tags.get("build_key")) for v in versions]
    assert a1["model_version"] == a2["model_version"] != b["model_version"]
    record("concurrency", "processes", runs=3, distinct_builds=2, versions=len(versions), torn=0, mismatches=0)


def test_concurrent_threads_same_build(
    prefect_harness: None,
    rel_inputs: PipelineInputs,
    reference: Reference,
    mlflow_template: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.quantize import quantize_model
    from infra.settings import get_settings
    from tasks.recipe import load_recipe

    home = seed_home(tmp_path / "home", mlflow_template)
    monkeypatch.setenv("QUANTPIPE_HOME", str(home))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(rel_inputs.wikitext_dir))
    get_settings(refresh=True)
    recipe = load_recipe(rel_inputs.recipe)
    outs: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outs.append(quantize_model(str(rel_inputs.model_dir), recipe))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        monkeypatch.undo()
        get_settings(refresh=True)
    assert not errors, errors
    assert len(outs) == 2
    assert verify_all(home / "store") == []
    assert compare_stores(reference.files, store_files(home / "store")) == []
    versions = _versions(home, reference.outcome["model_name"])
    assert len(versions) == 1
    assert outs[0]["model_version"] == outs[1]["model_version"] == versions[0].version
    record("concurrency", "threads", runs=2, distinct_builds=1, versions=len(versions), torn=0, mismatches=0)


def test_evaluate_plots_from_threads(tmp_path: Path) -> None:
    """Six threads drawing the evaluate stage's log-axis plots at once: without the plot lock most of them failed
    with matplotlib's mathtext ParseException (measured 5-6 of 6); with it all succeed and every file is a PNG."""
    from tasks.evaluate import _plots

    layers = {f"l{i}": {"block": i, "proxy_loss_exact": 10.0 ** (-(i % 7))} for i in range(60)}
    errors: list[BaseException] = []

    def draw(k: int) -> None:
        try:
            for j in range(3):
                out = tmp_path / f"t{k}-{j}"
                out.mkdir()
                for name in _plots(out, layers, 30.0, 20.0, 2.1, "t"):
                    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
