"""Registry fixtures: a fresh sqlite tracking DB and artifact root per test, without paying for migrations.

Creating an MLflow sqlite schema takes 1-2 s; copying an already-migrated empty database takes milliseconds.
So the schema is built once per session and each test gets its own copy (full isolation, no shared state),
with the tracking URI passed explicitly through ``Settings`` instead of ``mlflow.set_tracking_uri``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import pytest

os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "template.db"
    uri = f"sqlite:///{path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    return path


@pytest.fixture
def settings(tmp_path: Path, _mlflow_template_db: Path):
    """Per-test Settings: its own sqlite DB (copied from the template) and artifact root under tmp_path."""
    from infra.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    db = home / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    return Settings(
        home=home,
        mlflow_tracking_uri=f"sqlite:///{db}",
        mlflow_artifact_location=(tmp_path / "mlflow-artifacts").as_uri(),
        mlflow_experiment="quantpipe-test",
    )


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    """A small stand-in for a packed checkpoint: a config, a binary weights file and a nested file."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "kernels").mkdir(parents=True)
    (ckpt / "config.json").write_text('{"model_type": "llama", "bits": 4}\n')
    (ckpt / "model.safetensors").write_bytes(hashlib.sha256(b"w").digest() * 512 + bytes(range(256)))
    (ckpt / "kernels" / "layout.json").write_text('{"layout": "wgemm"}\n')
    return ckpt


@pytest.fixture(autouse=True)
def _no_stray_mlflow_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run each test in an empty working directory and fail if MLflow fell back to ``./mlflow.db``/``./mlruns``
    (which would mean some call ignored the explicit URIs and used MLflow's process-global defaults)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    stray = sorted(p.name for p in cwd.iterdir())
    assert stray == [], f"MLflow wrote {stray} into the working directory"
