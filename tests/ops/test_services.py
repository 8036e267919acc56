"""Local service launchers: health checks, clear errors, process-group shutdown, and `quantpipe serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra.services import ManagedProcess, ServiceError, _spawn, free_port, start_prefect_server, wait_healthy


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port}: the port is in use"):
            start_prefect_server(prefect_home=tmp_path / "p", port=port)


def test_health_timeout_stops_the_whole_group(tmp_path: Path) -> None:
    # A "service" whose child never answers: the parent shell and its sleeping child share the group.
    proc = _spawn("fake", ["sh", "-c", "sleep 60 & sleep 60"], env=dict(os.environ), log_path=tmp_path / "fake.log")
    proc.health_url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(ServiceError, match=r"fake did not become healthy .* within 1 s"):
        wait_healthy(proc, timeout=1)
    assert not proc.group_alive()


def test_early_exit_reports_the_log(tmp_path: Path) -> None:
    proc = _spawn(
        "broken", ["sh", "-c", "echo boom-config-error; exit 3"], env=dict(os.environ), log_path=tmp_path / "b.log"
    )
    proc.health_url = f"http://127.0.0.1:{free_port()}/health"
    with pytest.raises(ServiceError, match=r"(?s)exited with status 3.*boom-config-error"):
        wait_healthy(proc, timeout=30)


@pytest.mark.slow
def test_quantpipe_serve_starts_both_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    pp, mp = free_port(), free_port()
    env = {**os.environ, "QUANTPIPE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    cmd = [str(Path(sys.executable).parent / "quantpipe"), "serve", "--prefect-port", str(pp), "--mlflow-port", str(mp)]
    serve = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    serve_proc = ManagedProcess("serve", serve, tmp_path / "none")  # for group cleanup in finally
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 150
        assert serve.stdout is not None
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops both servers" in line:
                break
        out = "".join(lines)
        assert f"export PREFECT_API_URL=http://127.0.0.1:{pp}/api" in out, out
        assert f"export QUANTPIPE_MLFLOW_TRACKING_URI=http://127.0.0.1:{mp}" in out, out
        assert urllib.request.urlopen(f"http://127.0.0.1:{pp}/api/health", timeout=5).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{mp}/health", timeout=5).status == 200
        assert (tmp_path / "home" / "mlflow.db").is_file()
        assert (tmp_path / "home" / "prefect").is_dir()  # its own PREFECT_HOME

        serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=60)
        assert serve.returncode == 0, out + rest
        assert "services stopped" in rest
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (_port_free(pp) and _port_free(mp)):
            time.sleep(0.2)
        assert _port_free(pp) and _port_free(mp), "a server outlived `quantpipe serve`"
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(tmp_path / "home") not in ps, "orphan process still references the serve home"
    finally:
        if serve.poll() is None:
            serve_proc.stop()
