"""Launchers for the local services: a Prefect server, an MLflow tracking server and a Prefect worker.

Why it is built this way:

* Every service is a child process started in **its own session / process group** (``start_new_session``), so
  stopping it signals the whole group: ``mlflow server`` runs three processes (parent, uvicorn worker, job
  runner) and a Prefect worker runs one flow-run subprocess per run; signalling only the parent PID can leave
  orphans behind. :meth:`ManagedProcess.stop` sends the polite signal to the group, waits until *every*
  member is gone, and only then escalates to ``SIGKILL``.
* Health is checked over HTTP (``/api/health`` for Prefect, ``/health`` for MLflow). A service that exits
  early, or is not healthy within the timeout, raises :class:`ServiceError` carrying the tail of its log, and
  is stopped before the error propagates (no half-started services).
* Bound to ``127.0.0.1`` unless the caller asks otherwise, with analytics off and Prefect's home under
  ``$QUANTPIPE_HOME/prefect`` so a local server never touches ``~/.prefect``.
* Ports are checked before starting, so "address already in use" is one clear line instead of a log dump.

Only the standard library is used here (``infra`` must stay light); the service binaries come from the same
environment as the running interpreter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from infra.errors import ConfigError, QuantpipeError
from infra.settings import Settings, get_settings

__all__ = [
    "DEFAULT_HOST",
    "ManagedProcess",
    "ServiceError",
    "free_port",
    "mlflow_artifacts_destination",
    "mlflow_server_command",
    "prefect_env",
    "prefect_server_command",
    "running_services",
    "start_mlflow_server",
    "start_prefect_server",
    "start_prefect_worker",
    "wait_healthy",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000


class ServiceError(QuantpipeError):
    """A local service could not be started, did not become healthy, or died."""


# ------------------------------------------------------------------------------------------ processes
@dataclass
class ManagedProcess:
    """A child process that leads its own process group, with its log file and health URL."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    health_url: str = ""
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_alive(self) -> bool:
        """Whether any process of the group is still there (the leader may already be gone)."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a foreign process reused the pgid
            return False
        # A zombie leader (not yet reaped) still "exists": reap it and ask again.
        if self.popen.poll() is not None:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return False
        return True

    def log_tail(self, n_chars: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_chars:].decode("utf-8", errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` to the whole group, wait for all of it, then ``SIGKILL`` what is left.

        Returns the leader's exit code (``None`` if it had to be killed and could not be reaped).
        """
        if self.group_alive():
            self.signal_group(sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.group_alive():
                time.sleep(0.1)
            if self.group_alive():
                self.signal_group(signal.SIGKILL)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and self.group_alive():
                    time.sleep(0.05)
        code: int | None
        try:
            code = self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _bin(name: str) -> str:
    """The console script ``name`` from this interpreter's environment (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"cannot find the `{name}` command next to {sys.executable} or on PATH")
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(
                f"cannot start {what} on {host}:{port}: the port is in use or not bindable ({exc.strerror}); "
                "pick another port"
            ) from None


def _spawn(
    name: str, cmd: list[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,  # own process group: stop() signals every process it spawns
        )
    except OSError as exc:
        log.close()
        raise ServiceError(f"cannot start {name} ({cmd[0]}): {exc}") from None
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log=log)


def wait_healthy(proc: ManagedProcess, timeout: float = 60.0, interval: float = 0.25) -> float:
    """Poll ``proc.health_url`` until it answers 200; returns the seconds it took.

    Raises :class:`ServiceError` (and stops the process) when it exits or the timeout passes.
    """
    started = time.monotonic()
    last = "no answer yet"
    while True:
        if not proc.alive():
            code = proc.popen.returncode
            proc.stop()
            raise ServiceError(
                f"{proc.name} exited with status {code} before it became healthy; log {proc.log_path}:\n"
                f"{proc.log_tail()}"
            )
        try:
            with urllib.request.urlopen(proc.health_url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() - started > timeout:
            proc.stop()
            raise ServiceError(
                f"{proc.name} did not become healthy at {proc.health_url} within {timeout:.0f} s (last: {last}); "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(interval)


# ------------------------------------------------------------------------------------------ prefect
def _base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["MLFLOW_ENABLE_TELEMETRY"] = "false"
    env.setdefault("DO_NOT_TRACK", "1")
    env.update(extra or {})
    return env


def prefect_env(
    api_url: str | None, prefect_home: Path | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a Prefect CLI/worker process talking to ``api_url`` with its own ``PREFECT_HOME``."""
    env = _base_env(extra)
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def prefect_server_command(host: str, port: int) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]


def start_prefect_server(
    *,
    prefect_home: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PREFECT_PORT,
    log_path: Path | None = None,
    timeout: float = 90.0,
    extra_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """``prefect server start`` with its own ``PREFECT_HOME`` (sqlite DB there); waits for ``/api/health``."""
    _check_port_free(host, port, "the Prefect server")
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = _base_env(extra_env)
    env["PREFECT_HOME"] = str(prefect_home)
    for var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(var, None)  # the server must not try to talk to another API
    env.setdefault("PREFECT_SERVER_API_HOST", host)
    env.setdefault("PREFECT_SERVER_API_PORT", str(port))
    proc = _spawn(
        "prefect server",
        prefect_server_command(host, port),
        env=env,
        log_path=log_path or prefect_home / "server.log",
    )
    url_host = _url_host(host)
    proc.url = f"http://{url_host}:{port}"
    proc.health_url = f"{proc.url}/api/health"
    wait_healthy(proc, timeout=timeout)
    return proc


def start_prefect_worker(
    pool: str,
    *,
    api_url: str,
    prefect_home: Path,
    log_path: Path,
    work_queue: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    worker_type: str = "process",
    cwd: Path | None = None,
) -> ManagedProcess:
    """``prefect worker start --pool POOL`` against ``api_url``. Stop it with ``SIGINT`` *before* the server:
    a worker whose server is gone ignores ``SIGTERM`` and keeps retrying (see ENVIRONMENT.md)."""
    cmd = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", worker_type]
    if work_queue:
        cmd += ["--work-queue", work_queue]
    env = prefect_env(api_url, prefect_home, extra_env)
    proc = _spawn(f"prefect worker ({pool})", cmd, env=env, log_path=log_path, cwd=cwd)
    proc.url = api_url
    return proc


# ------------------------------------------------------------------------------------------ mlflow
def mlflow_artifacts_destination(settings: Settings) -> str:
    """Where the tracking server keeps artifacts: next to the store (``<s3 store>/mlflow-artifacts``) or
    ``$QUANTPIPE_HOME/mlflow-artifacts`` for a local store."""
    store = settings.effective_store_url
    if store.startswith("s3://"):
        return store.rstrip("/") + "/mlflow-artifacts"
    return str(settings.home / "mlflow-artifacts")


def mlflow_server_command(backend_uri: str, artifacts_destination: str, host: str, port: int) -> list[str]:
    return [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def start_mlflow_server(
    settings: Settings | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_MLFLOW_PORT,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    log_path: Path | None = None,
    timeout: float = 90.0,
) -> ManagedProcess:
    """``mlflow server`` on sqlite (``$QUANTPIPE_HOME/mlflow.db``) with proxied artifacts; waits for ``/health``."""
    settings = settings or get_settings()
    backend_uri = backend_uri or f"sqlite:///{settings.home / 'mlflow.db'}"
    if backend_uri.startswith("http"):
        raise ConfigError(f"backend store {backend_uri!r} is a server URL; give a database URI (sqlite:///...)")
    dest = artifacts_destination or mlflow_artifacts_destination(settings)
    _check_port_free(host, port, "the MLflow server")
    settings.home.mkdir(parents=True, exist_ok=True)
    if "://" not in dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
    extra: dict[str, str] = {}
    if dest.startswith("s3://"):
        if settings.s3_endpoint_url:
            extra["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
        if settings.s3_region:
            extra["AWS_DEFAULT_REGION"] = settings.s3_region
        if settings.aws_access_key_id and settings.aws_secret_access_key:
            extra["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id.get_secret_value()
            extra["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()
    env = _base_env(extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = _spawn(
        "mlflow server",
        mlflow_server_command(backend_uri, dest, host, port),
        env=env,
        log_path=log_path or settings.home / "logs" / "mlflow-server.log",
        cwd=settings.home,  # anything MLflow writes relative to cwd lands under home, not in the repo
    )
    proc.url = f"http://{_url_host(host)}:{port}"
    proc.health_url = f"{proc.url}/health"
    wait_healthy(proc, timeout=timeout)
    return proc


def _url_host(host: str) -> str:
    """What a client connects to: a wildcard bind is reached through loopback."""
    if host in ("0.0.0.0", "", "::"):
        return DEFAULT_HOST
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ------------------------------------------------------------------------------------------ both
@dataclass
class Services:
    """The running local services and the environment a client needs to use them."""

    prefect: ManagedProcess | None = None
    mlflow: ManagedProcess | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def exports(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.prefect is not None:
            out["PREFECT_API_URL"] = f"{self.prefect.url}/api"
        if self.mlflow is not None:
            out["QUANTPIPE_MLFLOW_TRACKING_URI"] = self.mlflow.url
            out["MLFLOW_TRACKING_URI"] = self.mlflow.url
        return out

    def processes(self) -> list[ManagedProcess]:
        return [p for p in (self.prefect, self.mlflow) if p is not None]

    def stop(self) -> None:
        for proc in reversed(self.processes()):
            proc.stop()


@contextlib.contextmanager
def running_services(
    settings: Settings | None = None,
    *,
    host: str = DEFAULT_HOST,
    prefect_port: int | None = DEFAULT_PREFECT_PORT,
    mlflow_port: int | None = DEFAULT_MLFLOW_PORT,
    timeout: float = 90.0,
) -> Iterator[Services]:
    """Start the Prefect server and/or the MLflow server (``None`` port = skip it); always stops both."""
    settings = settings or get_settings()
    services = Services()
    try:
        if prefect_port is not None:
            t0 = time.monotonic()
            services.prefect = start_prefect_server(
                prefect_home=settings.home / "prefect",
                host=host,
                port=prefect_port,
                log_path=settings.home / "logs" / "prefect-server.log",
                timeout=timeout,
            )
            services.timings["prefect_healthy_s"] = round(time.monotonic() - t0, 2)
        if mlflow_port is not None:
            t0 = time.monotonic()
            services.mlflow = start_mlflow_server(settings, host=host, port=mlflow_port, timeout=timeout)
            services.timings["mlflow_healthy_s"] = round(time.monotonic() - t0, 2)
        yield services
    finally:
        services.stop()
