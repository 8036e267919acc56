"""The nightly-requantize flow over a watch-list of tiny local "releases" (under Prefect's test harness)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from flows.nightly import ARTIFACT_KEY, ModelEntry, load_watchlist, newest_release_dir, nightly_requantize
from infra.errors import ConfigError
from infra.settings import Settings
from tests.flows.conftest import tiny_recipe
from tests.helpers.models import build_tiny_llama


def _write_watchlist(path: Path, models: list[dict], recipes: list) -> Path:
    path.write_text(yaml.safe_dump({"recipes": recipes, "models": models}))
    return path


def test_newest_release_natural_order_and_nested_layout(tmp_path: Path) -> None:
    for name in ("v9", "v10", "v2"):
        (tmp_path / "rel" / name / "m").mkdir(parents=True)
        (tmp_path / "rel" / name / "m" / "config.json").write_text("{}")
    (tmp_path / "rel" / "notes").mkdir()
    assert newest_release_dir(tmp_path / "rel") == tmp_path / "rel" / "v10" / "m"
    os.utime(tmp_path / "rel" / "v2" / "m" / "config.json", (time.time() + 100, time.time() + 100))
    assert newest_release_dir(tmp_path / "rel", "mtime") == tmp_path / "rel" / "v2" / "m"
    with pytest.raises(ConfigError, match="no release subdirectory"):
        newest_release_dir(tmp_path / "rel" / "notes")


def test_watchlist_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_watchlist(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("recipes: []\nmodels: []\n")
    with pytest.raises(ConfigError, match="recipes"):
        load_watchlist(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("recipes: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_watchlist(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match="exactly one of"):
        ModelEntry.model_validate({"path": "/a", "hub": "org/x"})


def _artifact_markdown() -> str:
    from prefect.artifacts import Artifact

    art = Artifact.get(ARTIFACT_KEY)
    assert art is not None
    return str(art.data)


@pytest.mark.slow
def test_nightly_builds_skips_and_rebuilds_only_new_revisions(
    prefect_harness: None, ops_home: Settings, tmp_path: Path
) -> None:
    from registry.models import list_versions

    rel = tmp_path / "models"
    build_tiny_llama(rel / "alpha", seed=1)
    build_tiny_llama(rel / "beta-releases" / "2024-06-01" / "beta", seed=2)
    build_tiny_llama(rel / "gamma", seed=3)
    recipe = tiny_recipe().model_dump(mode="json")
    wl = _write_watchlist(
        tmp_path / "watchlist.yaml",
        [
            {"path": "models/alpha"},  # relative to the watch-list file
            {"releases": str(rel / "beta-releases")},
            {"path": str(rel / "gamma")},
            {"path": str(tmp_path / "no-such-model")},  # unresolvable: error row, others proceed
            {"hub": "example-org/not-reachable-offline"},  # HF_HUB_OFFLINE=1: error row
            {"path": str(rel / "gamma"), "releases": str(rel)},  # invalid entry
        ],
        [recipe],
    )

    # Night 1: three builds; the bad entries are reported and make the run FAILED after the others finished.
    state = nightly_requantize(watchlist_path=str(wl), return_state=True)
    assert state.is_failed() and "3 of 6 entries failed or could not be resolved" in (state.message or "")
    md = _artifact_markdown()
    assert "3 built, 0 already registered, 0 failed, 3 unresolved" in md
    assert "no-such-model" in md and "does not exist" in md and "not-reachable-offline" in md
    assert "exactly one of path, releases, hub" in md
    versions = list_versions(settings=ops_home)
    assert sorted(v.name for v in versions) == ["alpha.tiny-gptq", "beta.tiny-gptq", "gamma.tiny-gptq"]
    assert all("candidate" in v.aliases for v in versions)

    # Night 2: nothing new -> no runs at all (registry lookups only).
    _write_watchlist(wl, yaml.safe_load(wl.read_text())["models"][:3], [recipe])  # only the good entries
    t0 = time.monotonic()
    second = nightly_requantize(watchlist_path=str(wl), fail_on_error=False)
    assert second["ran"] == 0 and second["skipped"] == 3 and second["errors"] == 0, second
    assert time.monotonic() - t0 < 30
    assert {r["status"] for r in second["rows"]} == {"skipped"}
    assert all(r["ppl"] and r["ppl"] > 1 for r in second["rows"])

    # Night 3: a new release of beta (newest subdir wins) -> exactly one run.
    build_tiny_llama(rel / "beta-releases" / "2024-07-01" / "beta", seed=4)
    third = nightly_requantize(watchlist_path=str(wl), fail_on_error=False)
    assert third["ran"] == 1 and third["registered"] == 1 and third["skipped"] == 2, third
    built = next(r for r in third["rows"] if r["status"] == "registered")
    assert built["model"] == "beta" and built["version"] == "beta.tiny-gptq/2"
    assert len(list_versions("beta.tiny-gptq", settings=ops_home)) == 2
    md = _artifact_markdown()
    assert "| beta |" in md and "registered" in md

    # Night 4: alpha's files change in place (new content digest) -> exactly one run.
    shutil.copyfile(rel / "gamma" / "model.safetensors", rel / "alpha" / "model.safetensors")
    fourth = nightly_requantize(watchlist_path=str(wl), fail_on_error=False)
    assert fourth["ran"] == 1 and fourth["skipped"] == 2, fourth
    assert next(r for r in fourth["rows"] if r["status"] == "registered")["version"] == "alpha.tiny-gptq/2"
