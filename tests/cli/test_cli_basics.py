"""CLI surfaces that need no pipeline: config, verify, error formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_config_json_redacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))
    monkeypatch.setenv("QUANTPIPE_AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    result = runner.invoke(app, ["config", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["home"] == str(tmp_path)
    assert data["aws_secret_access_key"] == "***"
    assert "do-not-print-me" not in result.output


def test_unknown_store_scheme_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))
    monkeypatch.setenv("QUANTPIPE_STORE_URL", "ftp://x/y")
    result = runner.invoke(app, ["verify", "--all"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "QUANTPIPE_STORE_URL" in lines[0] and "Traceback" not in result.output


def test_verify_reports_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.keys import artifact_key
    from infra.store import LocalStore

    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))
    store = LocalStore(tmp_path / "store")
    key = artifact_key("calibration", 1, {}, {})
    store.put("calibration", key, {"a.bin": b"abc"}, stage_version=1, config={})
    assert runner.invoke(app, ["verify", "--all"]).exit_code == 0
    (tmp_path / "store" / "artifacts" / "calibration" / key / "a.bin").write_bytes(b"abd")
    result = runner.invoke(app, ["verify", "--all", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["bad"][0]["ref"] == f"calibration/{key}"


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "quantpipe"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "quantize" in out.stdout and "verify" in out.stdout


def test_eval_refuses_windows_beyond_the_models_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path))
    result = runner.invoke(app, ["eval", "-m", str(tiny_llama_dir), "--seq-len", "4096", "--windows", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_position_embeddings (512)" in lines[0]


def test_piped_tables_are_not_cut_to_80_columns() -> None:
    """`quantpipe serve | tee log` used to cut its URL table at 80 columns (rich's width for a non-terminal)."""
    import io
    from contextlib import redirect_stdout

    from rich.table import Table

    from flows.cli_util import PIPED_WIDTH, out_console

    buf = io.StringIO()
    with redirect_stdout(buf):
        console = out_console()
        table = Table("service", "URL")
        table.add_row("mlflow", "http://127.0.0.1:5000/" + "x" * 100)
        console.print(table)
    assert console.width == PIPED_WIDTH
    assert "x" * 100 in buf.getvalue()
