"""``quantpipe doctor``: OK on a healthy setup, FAIL with what to fix on each broken piece, exit 1, ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.reliability.harness import record


def _doctor(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    from flows.cli import app
    from infra.settings import _cached

    for key in ("PREFECT_API_URL", "QUANTPIPE_PREFECT_API_URL", "QUANTPIPE_STORE_URL", "QUANTPIPE_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _cached.cache_clear()
    try:
        result = CliRunner().invoke(app, ["doctor", *args])
    finally:
        _cached.cache_clear()
    assert "Traceback" not in result.output, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1]) if "--json" in args else {}
    return result.exit_code, payload, result.output


def _status(payload: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in payload["checks"]}


def test_doctor_all_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rel_inputs) -> None:
    env = {"QUANTPIPE_HOME": str(tmp_path / "home"), "QUANTPIPE_WIKITEXT_DIR": str(rel_inputs.wikitext_dir)}
    code, payload, _ = _doctor(monkeypatch, env, "--json", "--min-free-gb", "0.01")
    assert code == 0, payload
    assert payload["ok"] is True
    assert set(_status(payload)) == {"settings", "store", "mlflow", "prefect", "disk", "wikitext", "versions"}
    assert set(_status(payload).values()) == {"OK"}
    code, _, text = _doctor(monkeypatch, env, "--min-free-gb", "0.01")
    assert code == 0 and "all checks passed" in text and "quantpipe doctor" in text
    record("doctor", "healthy", checks=7, passed=7)


def test_doctor_reports_each_failure_with_a_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    dead = f"http://127.0.0.1:{free_port()}"
    env = {
        "QUANTPIPE_HOME": str(tmp_path / "home"),
        "QUANTPIPE_STORE_URL": blocker.as_uri(),
        "QUANTPIPE_MLFLOW_TRACKING_URI": dead,
        "PREFECT_API_URL": f"{dead}/api",
        "QUANTPIPE_WIKITEXT_DIR": str(tmp_path / "no-wikitext"),
    }
    code, payload, _ = _doctor(monkeypatch, env, "--json", "--min-free-gb", "1000000")
    assert code == 1 and payload["ok"] is False
    status = _status(payload)
    failed = {n for n, s in status.items() if s == "FAIL"}
    assert failed == {"store", "mlflow", "prefect", "disk", "wikitext"}, status
    fixes = {c["name"]: c["fix"] for c in payload["checks"]}
    assert "QUANTPIPE_STORE_URL" in fixes["store"]
    assert "QUANTPIPE_MLFLOW_TRACKING_URI" in fixes["mlflow"]
    assert "PREFECT_API_URL" in fixes["prefect"]
    assert "QUANTPIPE_HOME" in fixes["disk"]
    assert "QUANTPIPE_WIKITEXT_DIR" in fixes["wikitext"]
    code, _, text = _doctor(monkeypatch, env)
    assert code == 1 and "FAIL" in text and "check(s) failed" in text
    record("doctor", "broken", checks=5, passed=len(failed))


def test_doctor_bad_setting_is_a_failure_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, payload, _ = _doctor(monkeypatch, {"QUANTPIPE_HOME": str(tmp_path), "QUANTPIPE_DEVICE": "tpu"}, "--json")
    assert code == 1 and _status(payload) == {"settings": "FAIL"}
    assert "QUANTPIPE_DEVICE" in payload["checks"][0]["detail"]


def test_doctor_against_s3_and_prefect_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: str, s3_bucket: str, prefect_api_url: str
) -> None:
    env = {
        "QUANTPIPE_HOME": str(tmp_path / "home"),
        "QUANTPIPE_STORE_URL": f"s3://{s3_bucket}/doctor",
        "QUANTPIPE_S3_ENDPOINT_URL": moto_server,
        "PREFECT_API_URL": prefect_api_url,
    }
    code, payload, _ = _doctor(monkeypatch, env, "--json", "--min-free-gb", "0.01")
    status = _status(payload)
    assert status["store"] == "OK" and status["prefect"] == "OK", payload
    env["QUANTPIPE_STORE_URL"] = "s3://no-such-bucket-here/doctor"
    code, payload, _ = _doctor(monkeypatch, env, "--json", "--min-free-gb", "0.01")
    store = next(c for c in payload["checks"] if c["name"] == "store")
    assert code == 1 and store["status"] == "FAIL" and "does not exist" in store["detail"]


def test_doctor_failure_lines_never_carry_a_password() -> None:
    """Exception texts from MLflow/botocore quote the URL they failed on; doctor prints them redacted."""
    from flows.doctor import _one_line

    line = _one_line(RuntimeError("API request to http://alice:s3cr3t-pw-123@127.0.0.1:9/api failed " + "x" * 400))
    assert "s3cr3t-pw-123" not in line and "alice:***@127.0.0.1" in line and len(line) <= 300
