"""The Prefect API a ``quantpipe`` process talks to when no server is configured: its own, never another run's.

Prefect's ephemeral mode (``SubprocessASGIServer``, prefect 3.8.8) draws a port at random from 8000-8999, checks
that it can bind it, releases it and starts ``uvicorn --port P`` in a subprocess. uvicorn binds only after its
lifespan start-up (the database migrations: 5-40 s), and meanwhile Prefect polls ``http://127.0.0.1:P/api/health``.
When two processes draw the same port in that window (two runs at once on one worker), the second one's health
poll is answered by the *first* process's server, so it talks to that server for the whole run; its own uvicorn
then fails with ``address already in use``. When the first run exits, its server goes with it and the second run
fails at the next API call (``httpx.ConnectError`` after about a minute of retries, hundreds of log lines) even
though every stage succeeded. Both ephemeral servers also shared ``~/.prefect/prefect.db``.

:func:`ensure_prefect_backend` (called by the CLI before its first flow run) replaces that with a server this
process owns:

* the listening socket is bound by this process to ``127.0.0.1:0`` (the kernel picks a free port, nothing can
  take it afterwards) and handed to the server subprocess (``python -m flows.prefect_backend``, uvicorn serving
  ``prefect.server.api.server:create_app`` on that socket), so the health poll can only reach our own server;
* the server's ``PREFECT_HOME`` (its sqlite DB) is ``$QUANTPIPE_HOME/prefect`` unless ``PREFECT_HOME`` is set, so
  runs in different homes never share a database; start-ups in one home are serialised by a lock file (the
  migrations of a fresh DB must not run twice at once);
* a supervisor thread restarts the server on the same socket if it dies mid-run (one warning line): API
  requests made meanwhile wait in the socket's backlog instead of failing (task-run events the dead server had
  received but not yet written are lost with it: the run record may miss a few task states, never the run);
* the server exits with this process (``atexit``), and by itself when this process is gone (SIGKILL); its own
  output goes to ``<prefect home>/logs/server-<pid>.log``, kept only when the server failed.

A configured API (``PREFECT_API_URL``, a Prefect profile, or ``QUANTPIPE_PREFECT_API_URL``) is used as is.
:func:`run_surviving_api_loss` keeps a lost API from failing a flow whose body completed (see there).
"""

from __future__ import annotations

import atexit
import contextvars
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from infra.errors import QuantpipeError

__all__ = [
    "PrefectBackend",
    "current_backend",
    "ensure_prefect_backend",
    "go_offline",
    "is_api_loss",
    "record_flow_result",
    "run_surviving_api_loss",
    "with_prefect_backend",
]

T = TypeVar("T")

MAX_RESTARTS = 3
_LOCK_NAME = "quantpipe-server-start.lock"
_lock = threading.Lock()
_backend: PrefectBackend | None = None


def warn(message: str) -> None:
    """One warning line on stderr (stdout stays for results and ``--json``)."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


@dataclass
class PrefectBackend:
    """A Prefect API server subprocess serving a socket this process bound and keeps open."""

    home: Path
    sock: socket.socket
    env: dict[str, str]
    startup_timeout: float
    owner_pid: int = field(default_factory=os.getpid)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    lost: bool = False
    keep_log: bool = False
    port: int = 0
    _stopping: bool = False
    _supervisor: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.port = int(self.sock.getsockname()[1])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        """The server's own output (kept only when something went wrong with it)."""
        return self.home / "logs" / f"server-{self.owner_pid}.log"

    def start(self) -> None:
        """Start the server and wait until it answers (only it can: the socket is ours)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with _home_lock(self.home), open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.prefect_backend", str(self.sock.fileno()), str(os.getpid())],
                env=self.env,
                pass_fds=(self.sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,  # not the CLI's stdout (results, --json) nor its stderr (the server's shutdown noise)
                stderr=log,
            )
            self._wait_healthy(self.process)

    def _wait_healthy(self, process: subprocess.Popen[bytes]) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as client:  # no proxies
            while True:
                rc = process.poll()
                if rc is not None:
                    self.keep_log = True
                    raise QuantpipeError(
                        f"the Prefect API server for this run exited during start-up (status {rc}; log: "
                        f"{self.log_path}); check its database under {self.home} or set PREFECT_API_URL to a "
                        "running server"
                    )
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    _terminate(process)
                    self.keep_log = True
                    raise QuantpipeError(
                        f"the Prefect API server for this run did not answer within {self.startup_timeout:.0f} s "
                        "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a loaded machine, or set "
                        "PREFECT_API_URL to a running server)"
                    )
                time.sleep(0.1)

    def supervise(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name="quantpipe-prefect-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping:
            process = self.process
            if process is None:
                return
            rc = process.wait()
            if self._stopping:
                return
            self.keep_log = True
            if self.restarts >= MAX_RESTARTS:
                warn(
                    f"the Prefect API server of this run exited (status {rc}) {self.restarts + 1} times (log: "
                    f"{self.log_path}); continuing without it (stages and results are unaffected; the Prefect run "
                    "record stays incomplete)"
                )
                self._give_up()
                return
            self.restarts += 1
            warn(
                f"the Prefect API server of this run exited (status {rc}; log: {self.log_path}); restarting it on "
                f"the same port ({self.api_url}), the run continues"
            )
            try:
                self.start()
            except Exception as exc:  # reported; the run goes on without Prefect
                warn(f"could not restart the Prefect API server ({exc}); continuing without it")
                self._give_up()
                return

    def _give_up(self) -> None:
        """No server any more: close the socket (callers get 'connection refused' at once instead of waiting in
        its backlog) and stop Prefect from retrying its API."""
        self.lost = True
        try:
            self.sock.close()
        except OSError:
            pass
        go_offline()

    def stop(self) -> None:
        """Stop the server (idempotent); called at interpreter exit."""
        self._stopping = True
        if os.getpid() != self.owner_pid:
            return  # a forked child does not own the parent's server
        if self.process is not None:
            _terminate(self.process)
        try:
            self.sock.close()
        except OSError:
            pass
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<home>/quantpipe-server-start.lock`` (released when the holder dies)."""
    import fcntl

    fd = os.open(home / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def go_offline() -> None:
    """Stop this process's Prefect client from waiting on a lost API: no retries, no more logs or events to it,
    and the events/logs already queued dropped (Prefect drains them at exit, several seconds per event when the
    API is unreachable: minutes to hours for a long flow). The flow itself keeps running."""
    import prefect.context

    global _offline
    _offline = True
    _install_log_filter()
    os.environ["PREFECT_CLIENT_MAX_RETRIES"] = "0"
    os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
    prefect.context.refresh_global_settings_context()
    try:  # Prefect internals (3.8.8): best effort, the run must not fail here
        from prefect.events.clients import NullEventsClient
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        EventsWorker.set_client_override(NullEventsClient)
        for service in (EventsWorker, APILogWorker):
            for instance in list(getattr(service, "_instances", {}).values()):
                _drop_queued(instance)
    except Exception:  # never fail the run over this
        pass


_offline = False
_NOISY_WHEN_OFFLINE = ("prefect.events.clients", "prefect._internal.concurrency", "prefect.EventsWorker")
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _ApiLossFilter(logging.Filter):
    """Keeps a lost API to the one warning line of this module: drops Prefect's reports of failed API calls
    (tracebacks of a few hundred lines) once the API is known lost, and a flow run's "Encountered exception"
    record when the exception is an API loss after its body completed (:func:`run_surviving_api_loss`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _NOISY_WHEN_OFFLINE:
            return not _offline
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_api_loss(exc):
            token = _call_token.get()
            if _offline or (token is not None and token in _results):
                return False
        return True


def _install_log_filter() -> None:
    for name in (*_NOISY_WHEN_OFFLINE, *_RUN_LOGGERS):
        target = logging.getLogger(name)
        if not any(isinstance(f, _ApiLossFilter) for f in target.filters):
            target.addFilter(_ApiLossFilter())


def _drop_queued(service: Any) -> None:
    import queue

    q = service._queue
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if item is None:  # the stop sentinel: keep it
            q.put_nowait(None)
            q.task_done()
            return
        q.task_done()


def current_backend() -> PrefectBackend | None:
    """The server this process started (None when a configured API is used or nothing was started yet)."""
    backend = _backend
    return backend if backend is not None and backend.owner_pid == os.getpid() else None


def _apply_api_url(url: str) -> None:
    """Point this process's Prefect settings (and its subprocesses, e.g. Dask workers) at ``url``."""
    import prefect.context

    os.environ["PREFECT_API_URL"] = url
    prefect.context.refresh_global_settings_context()


def _startup_timeout(prefect_settings: Any) -> float:
    """``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` when set, else 120 s: Prefect's default of 20 s is
    too short for the migrations of a fresh database on a loaded 2-core machine (measured: > 30 s)."""
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return float(prefect_settings.server.ephemeral.startup_timeout_seconds)
    return 120.0


def ensure_prefect_backend(settings: Any | None = None) -> str | None:
    """Make sure this process has a Prefect API of its own before its first flow run; returns its URL.

    Uses the configured API when there is one (``PREFECT_API_URL``, a profile, ``QUANTPIPE_PREFECT_API_URL``).
    Otherwise starts (once per process) a server on a socket this process reserved, with its database under
    ``$QUANTPIPE_HOME/prefect`` (or ``$PREFECT_HOME`` when set). Returns None when Prefect's own ephemeral mode
    is disabled and no URL is configured (Prefect then reports that itself).
    """
    global _backend
    from prefect.settings import get_current_settings

    with _lock:
        backend = current_backend()
        if backend is not None:
            return backend.api_url
        prefect_settings = get_current_settings()
        if prefect_settings.api.url:
            return str(prefect_settings.api.url)
        if settings is None:
            from infra.settings import get_settings

            settings = get_settings()
        if settings.prefect_api_url:
            _apply_api_url(settings.prefect_api_url)
            return str(settings.prefect_api_url)
        if not prefect_settings.server.ephemeral.enabled:
            return None
        if "PREFECT_HOME" in os.environ:
            home = Path(prefect_settings.home).expanduser()
        else:
            home = Path(settings.home) / "prefect"
        env = {
            **os.environ,
            **prefect_settings.to_environment_variables(exclude_unset=True),
            "PREFECT_HOME": str(home),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        root = str(Path(__file__).resolve().parents[1])  # so that the server process finds this module
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        # Bound here, port chosen by the kernel, held until exit: no other process can serve (or take) it.
        # Not inheritable: only the server process gets it (pass_fds).
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        backend = PrefectBackend(
            home=home,
            sock=sock,
            env=env,
            startup_timeout=_startup_timeout(prefect_settings),
        )
        try:
            backend.start()
        except BaseException:
            backend.stop()
            raise
        atexit.register(backend.stop)
        backend.supervise()
        _backend = backend
        _apply_api_url(backend.api_url)
        return backend.api_url


# ------------------------------------------------------------------------------------------ lost API
_results: dict[int, Any] = {}
_call_token: contextvars.ContextVar[int | None] = contextvars.ContextVar("quantpipe_flow_call", default=None)
_tokens = itertools.count(1)


def record_flow_result(value: Any) -> None:
    """Called by a flow body with its return value, so :func:`run_surviving_api_loss` still has it when Prefect
    then fails to report the flow's final state to a lost API."""
    token = _call_token.get()
    if token is not None and _is_outermost_flow_run():
        _results[token] = value


def _is_outermost_flow_run() -> bool:
    """A subflow's result (e.g. quantize-model inside nightly-requantize) is not the guarded call's result."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = getattr(ctx, "flow_run", None)
    return run is None or getattr(run, "parent_task_run_id", None) is None


def is_api_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause/context chain) is a failure to reach the Prefect API."""
    import httpx

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (httpx.TransportError, ConnectionError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def run_surviving_api_loss(call: Callable[[], T], *, what: str, as_state: bool = False) -> T:
    """Run a flow call; if its body completed (it called :func:`record_flow_result`) but Prefect then failed to
    reach its API (final state report, state hooks), return the body's result with one warning line instead of
    failing a run whose stages all succeeded. Any other failure propagates unchanged. ``as_state``: the call was
    made with ``return_state=True``, so the result is handed back as a Completed state (and a returned non-completed
    state whose exception is an API loss counts as one)."""
    _install_log_filter()
    token = next(_tokens)
    reset = _call_token.set(token)
    try:
        try:
            out = call()
        except Exception as exc:
            if token in _results and is_api_loss(exc):
                return _recovered(token, exc, what=what, as_state=as_state)
            raise
        if as_state and token in _results and not out.is_completed():  # type: ignore[attr-defined]
            error = out.result(raise_on_failure=False)  # type: ignore[attr-defined]
            if isinstance(error, BaseException) and is_api_loss(error):
                return _recovered(token, error, what=what, as_state=as_state)
        return out
    finally:
        _call_token.reset(reset)
        _results.pop(token, None)


def _recovered(token: int, exc: BaseException, *, what: str, as_state: bool) -> Any:
    already_reported = _offline  # the supervisor said so when it gave the server up
    go_offline()
    if not already_reported:
        warn(
            f"{what} finished, but the Prefect API became unreachable ({type(exc).__name__}: {exc}); "
            "the results below are complete, the Prefect run record is not"
        )
    result = _results[token]
    if as_state:
        from prefect.states import Completed

        return Completed(data=result, message="completed; the Prefect API was lost before the final state report")
    return result


def with_prefect_backend(flow_call: Callable[..., T]) -> Callable[..., T]:
    """``flow_call`` (a Prefect flow) run the way the CLI runs flows: on this process's own API
    (:func:`ensure_prefect_backend`) and surviving a lost API once its body completed
    (:func:`run_surviving_api_loss`)."""
    what = str(getattr(flow_call, "name", None) or getattr(flow_call, "__name__", "the flow"))

    def call(*args: Any, **kwargs: Any) -> T:
        ensure_prefect_backend()
        return run_surviving_api_loss(
            lambda: flow_call(*args, **kwargs), what=what, as_state=bool(kwargs.get("return_state"))
        )

    return call


# ------------------------------------------------------------------------------------------ server process
def _serve(fd: int, parent_pid: int) -> None:
    """In the server subprocess: serve Prefect's API app on the inherited socket until told to stop or until the
    parent process is gone."""
    import uvicorn

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, log_level="error", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        server.should_exit = True
        time.sleep(15.0)  # still here (e.g. stuck in start-up): leave anyway
        os._exit(0)

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    server.run(sockets=[sock])


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
