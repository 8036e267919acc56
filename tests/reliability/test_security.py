"""Security: no remote code, no pickle, no path traversal, no secrets in logs / MLflow / printed settings,
servers on loopback unless told otherwise."""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import pytest

from infra.errors import ConfigError
from tests.reliability.harness import REPO, PipelineInputs, record

PRODUCT_DIRS = ["quant", "kernels", "infra", "tasks", "flows", "registry", "benchmarks"]


def _sources() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (REPO / d).rglob("*.py"))


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines without comments/docstring-only text, joined across parentheses enough for call detection."""
    return [(i, line.split("#", 1)[0]) for i, line in enumerate(path.read_text().splitlines(), 1)]


def test_no_trust_remote_code() -> None:
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources() + sorted((REPO / "tests").rglob("*.py"))
        if p.name != "test_security.py"
        for i, line in _code_lines(p)
        if re.search(r"trust_remote_code\s*=\s*(True|1|[a-z_]+\))", line) and "False" not in line
    ]
    assert hits == []
    record("security", "no-trust-remote-code", checks=1, passed=1)


def test_no_pickle_loading() -> None:
    patterns = {
        "pickle.load": re.compile(r"\b(c?pickle|dill|joblib|cloudpickle)\.loads?\("),
        "torch.load without weights_only=True": re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"),
        "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
        "transformers without safetensors": re.compile(r"use_safetensors\s*=\s*False"),
    }
    hits = []
    for p in _sources():
        text = p.read_text()
        for name, pattern in patterns.items():
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{p.relative_to(REPO)}:{line}: {name}")
    assert hits == []
    record("security", "no-pickle-loads", checks=len(patterns), passed=len(patterns))


TRAVERSALS = ["../x", "..", "/etc/passwd", "a/../../b", "calibration/..", "x\x00y", "a\\..\\b", "~root", ""]


def test_artifact_keys_and_names_reject_traversal() -> None:
    from infra.keys import ArtifactRef, validate_key, validate_stage
    from infra.store.base import _safe_name
    from registry.models import validate_registry_name

    rejected = 0
    for bad in [*TRAVERSALS, "calibration/" + "../" * 20 + "etc", "model/" + "a" * 64 + "/../x"]:
        for check in (ArtifactRef, validate_key, validate_stage, validate_registry_name):
            with pytest.raises(ConfigError):
                check(bad)
            rejected += 1
    for bad in ["../evil", "/abs/path", "a/../../b", "", "manifest.json"]:
        with pytest.raises(ConfigError):
            _safe_name(bad)
        rejected += 1
    record("security", "path-traversal", checks=rejected, passed=rejected)


def test_local_store_never_leaves_its_root(tmp_path: Path) -> None:
    from infra.keys import artifact_key
    from infra.store import LocalStore

    store = LocalStore(tmp_path / "store")
    for ref in ["../../../etc/" + "a" * 64, "calibration/" + "../" * 3]:
        with pytest.raises(ConfigError):
            store.exists(ref)
    with pytest.raises(ConfigError):
        store.put(
            "calibration",
            artifact_key("calibration", 1, {}, {}),
            {"../../escape.txt": b"x"},
            stage_version=1,
            config={},
        )
    assert not (tmp_path / "escape.txt").exists()


def test_servers_bind_loopback_by_default() -> None:
    services = pytest.importorskip("infra.services")
    assert services.DEFAULT_HOST == "127.0.0.1"
    for fn_name in ("start_prefect_server", "start_mlflow_server", "free_port"):
        fn = getattr(services, fn_name, None)
        if fn is not None:
            assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn_name
    from flows import ops_cli

    assert inspect.signature(ops_cli.serve).parameters["host"].default.default == "127.0.0.1"
    from tests.conftest import free_port  # the test fixtures too

    assert "127.0.0.1" in inspect.getsource(free_port)
    record("security", "loopback-defaults", checks=3, passed=3)


SECRET = "qp-SECRET-aws-9f8e7d6c5b4a"
SECRET_KEY_ID = "fake-key-id-qp-SECRET-0001"
HF_SECRET = "hf_qpSECRETtoken1234567890"
PLAIN_SECRET = "plain-aws-SECRET-0a1b2c3d"
SECRETS = [("aws secret", SECRET), ("aws key id", SECRET_KEY_ID), ("hf token", HF_SECRET), ("env", PLAIN_SECRET)]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted cannot leak either
            pass


@pytest.mark.slow
def test_secrets_never_leak(
    prefect_harness: None,
    rel_inputs: PipelineInputs,
    moto_server: str,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The tiny pipeline on S3 with fake credentials: grep every log record (DEBUG and up), stdout/stderr,
    every MLflow param/tag/metric key of every run and model version, and `quantpipe config` output."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.quantize import quantize_model
    from infra.settings import get_settings
    from registry.tracking import experiment_id, get_client
    from tasks.recipe import load_recipe

    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(rel_inputs.wikitext_dir))
    monkeypatch.setenv("QUANTPIPE_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("QUANTPIPE_STORE_URL", f"s3://{s3_bucket}/secret-run")
    monkeypatch.setenv("QUANTPIPE_AWS_ACCESS_KEY_ID", SECRET_KEY_ID)
    monkeypatch.setenv("QUANTPIPE_AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("QUANTPIPE_HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLAIN_SECRET)
    monkeypatch.setenv("QUANTPIPE_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    settings = get_settings(refresh=True)
    capture = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    watched = [logging.getLogger(n) for n in ("prefect", "prefect.flow_runs", "prefect.task_runs", "quantpipe")]
    for lg in watched:
        lg.addHandler(capture)
    try:
        out = quantize_model(str(rel_inputs.model_dir), load_recipe(rel_inputs.recipe))
        runner = CliRunner()
        printed = [runner.invoke(app, ["config"]).output, runner.invoke(app, ["config", "--json"]).output]
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        for lg in watched:
            lg.removeHandler(capture)
    streams = capfd.readouterr()
    assert out["model_version"] == "1"
    client = get_client(settings)
    mlflow_text = []
    for run in client.search_runs([experiment_id(settings)]):
        mlflow_text.append(json.dumps({"params": run.data.params, "tags": run.data.tags, "name": run.info.run_name}))
    for mv in client.search_model_versions(f"name = '{out['model_name']}'"):
        mlflow_text.append(json.dumps({"tags": mv.tags, "source": mv.source, "description": mv.description}))
    assert mlflow_text and len(capture.lines) > 10
    assert any("***" in p for p in printed)
    corpora = {
        "logs": "\n".join(capture.lines),
        "stdout/stderr": streams.out + streams.err,
        "mlflow": "\n".join(mlflow_text),
        "quantpipe config": "\n".join(printed),
    }
    leaks = [f"{where}: {name}" for where, text in corpora.items() for name, secret in SECRETS if secret in text]
    for where, text in corpora.items():
        for line in text.splitlines():
            if SECRET_KEY_ID in line:
                print("LEAK", where, line[:400])
    get_settings(refresh=True)
    record("security", "secrets-not-leaked", checks=len(corpora) * 4, passed=len(corpora) * 4 - len(leaks))
    assert leaks == []


URL_PASSWORDS = {
    "QUANTPIPE_PREFECT_API_URL": ("http://pu:{pw}@127.0.0.1:4200/api", "prefect-PW-0001"),
    "QUANTPIPE_S3_ENDPOINT_URL": ("http://minio:{pw}@127.0.0.1:9000", "minio-PW-0002"),
    "QUANTPIPE_STORE_URL": ("s3://key:{pw}@bucket/prefix", "store-PW-0003"),
    "QUANTPIPE_MLFLOW_ARTIFACT_LOCATION": ("mlflow-artifacts://art:{pw}@127.0.0.1:5000/a", "artifact-PW-0004"),
    "QUANTPIPE_MLFLOW_TRACKING_URI": ("postgresql://alice:{pw}@127.0.0.1:5432/mlflow", "tracking-PW-0005"),
}


def test_config_hides_passwords_in_every_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantpipe config` (table and --json): no password of any configured URL, encoded or not."""
    from typer.testing import CliRunner

    from flows.cli import app
    from infra.settings import get_settings

    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))
    for var, (template, password) in URL_PASSWORDS.items():
        monkeypatch.setenv(var, template.format(pw=password))
    monkeypatch.setenv("QUANTPIPE_HF_TOKEN", HF_SECRET)
    runner = CliRunner()
    try:
        as_json = runner.invoke(app, ["config", "--json"])
        table = runner.invoke(app, ["config"])
    finally:
        monkeypatch.undo()
        get_settings(refresh=True)
    assert as_json.exit_code == 0 and table.exit_code == 0, as_json.output + table.output
    data = json.loads(as_json.stdout)
    leaks = [
        f"{var} in {where}"
        for var, (_, password) in URL_PASSWORDS.items()
        for where, text in (("--json", as_json.output), ("table", table.output))
        if password in text
    ]
    assert HF_SECRET not in as_json.output + table.output
    checks = 2 * len(URL_PASSWORDS)
    record("security", "config-url-passwords", checks=checks, passed=checks - len(leaks))
    assert leaks == []
    assert data["prefect_api_url"] == "http://pu:***@127.0.0.1:4200/api"
    assert data["s3_endpoint_url"] == "http://minio:***@127.0.0.1:9000"
    assert data["effective_store_url"] == data["store_url"] == "s3://key:***@bucket/prefix"
    assert data["mlflow_artifact_location"] == "mlflow-artifacts://art:***@127.0.0.1:5000/a"
    assert data["effective_mlflow_uri"] == "postgresql://alice:***@127.0.0.1:5432/mlflow"


def test_unreachable_tracking_server_error_hides_password(tmp_path: Path) -> None:
    """`quantpipe registry list` against a closed port, tracking URI with user:password@: exit 2, one line, no
    password on the terminal nor in the log file that gets the details."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    password = "s3cr3tpw"
    env = {
        **os.environ,
        "QUANTPIPE_HOME": str(tmp_path / "home"),
        "QUANTPIPE_MLFLOW_TRACKING_URI": f"http://alice:{password}@127.0.0.1:{free_port()}/",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # MLflow's default retries take minutes against a closed port
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "registry", "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    log = (tmp_path / "home" / "logs" / "quantpipe.log").read_text()
    record("security", "tracking-error-password", checks=2, passed=int(password not in done.stderr + log) * 2)
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "alice:***@127.0.0.1" in lines[0]
    assert password not in done.stdout + done.stderr
    assert "Traceback" in log and password not in log
