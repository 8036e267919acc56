"""Each CLI process talks to its own Prefect API, and a lost API does not fail a run whose stages succeeded.

The bug (outside tester): two ``quantpipe quantize`` runs at once on one machine (different QUANTPIPE_HOMEs)
shared one ephemeral Prefect server; when the first process exited, the second failed with a ConnectError
traceback just before registering. Prefect 3.8.8's ``SubprocessASGIServer`` probes a random port of 8000-8999,
releases it and starts uvicorn on it, which binds only after its database migrations; the health poll meanwhile
goes to whatever listens on that port. ``test_raw_ephemeral_mode_talks_to_the_other_process_server`` reproduces
that on demand (the second process's probe is made to pass, as it does by chance when it probes during the first
server's migrations); the other tests check :mod:`flows.prefect_backend`, which the CLI uses instead.

Child processes run ``tests/flows/ephemeral_child.py`` (a tiny flow) or the real CLI on the tiny Llama; their
Prefect databases are copies of one migrated template, so no test pays for the migrations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = "tests.flows.ephemeral_child"


# ------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(tmp: Path) -> dict[str, str]:
    """A child environment with no Prefect server configured (ephemeral mode), isolated from ~/.prefect."""
    env = dict(os.environ)
    for var in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILE", "QUANTPIPE_PREFECT_API_URL"):
        env.pop(var, None)
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "PREFECT_PROFILES_PATH": str(tmp / "no-profiles.toml"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "150",
        }
    )
    return env


@pytest.fixture(scope="module")
def prefect_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty Prefect sqlite DB (``prefect server database upgrade``), copied into every child home."""
    root = tmp_path_factory.mktemp("prefect-template")
    env = _base_env(root) | {"PREFECT_HOME": str(root)}
    cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "prefect.db"


def _seed(prefect_home: Path, template: Path) -> Path:
    prefect_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, prefect_home / "prefect.db")
    return prefect_home


class Child:
    """One child process (own session: its server subprocess is stopped with it)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.out_path = log.with_suffix(".out")
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._out, stderr=self._fh, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child did not finish in {timeout} s; log tail:\n{self.tail()}") from None
        self._fh.close()
        self._out.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._fh.close()
        self._out.close()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.stderr().splitlines()[-n:])

    def result(self) -> dict[str, Any]:
        lines = [ln for ln in self.out_path.read_text().splitlines() if ln.startswith("{")]
        assert lines, f"no result printed; stderr tail:\n{self.tail()}"
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def _child(children: list[Child], env: dict[str, str], log: Path, *args: str) -> Child:
    child = Child([sys.executable, "-m", CHILD, *args], env, log)
    children.append(child)
    return child


def _flow_runs(db: Path) -> dict[str, str]:
    """flow run id -> state type, read from a Prefect sqlite DB."""
    with sqlite3.connect(db) as con:
        return {str(i): str(s) for i, s in con.execute("SELECT id, state_type FROM flow_run")}


def _events(db: Path) -> list[str]:
    """Event names the server persisted (task runs are materialised from these by a background service)."""
    with sqlite3.connect(db) as con:
        return [str(r[0]) for r in con.execute("SELECT event FROM events")]


def _wait_for_health(port: int, timeout: float, child: Child) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.proc.poll() is None, child.tail()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no server on port {port} after {timeout} s:\n{child.tail()}")


def _wait_for_text(child: Child, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in child.stderr():
            return True
        if child.proc.poll() is not None:
            return text in child.stderr()
        time.sleep(0.2)
    return False


def _warnings(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("warning:")]


# ------------------------------------------------------------------------------------------ the bug
@pytest.mark.slow
def test_raw_ephemeral_mode_talks_to_the_other_process_server(
    tmp_path: Path, prefect_db_template: Path, children: list[Child]
) -> None:
    """Reproduction with plain Prefect ephemeral mode (what the CLI did): B's health poll is answered by A's
    server, B's run is recorded in A's database, and B fails (ConnectError) once A has exited."""
    port = _free_port()
    go_a, go_b = tmp_path / "a-may-finish", tmp_path / "a-has-exited"
    env_a = _base_env(tmp_path) | {"PREFECT_HOME": str(_seed(tmp_path / "a", prefect_db_template))}
    env_b = _base_env(tmp_path) | {
        "PREFECT_HOME": str(_seed(tmp_path / "b", prefect_db_template)),
        "PREFECT_CLIENT_MAX_RETRIES": "0",  # fail at the first refused call instead of after a minute of retries
    }
    a = _child(children, env_a, tmp_path / "a.log", "--mode", "raw", "--force-port", str(port), f"wait:{go_a}")
    _wait_for_health(port, 150, a)
    b = _child(
        children,
        env_b,
        tmp_path / "b.log",
        *("--mode", "raw", "--force-port", str(port), "--trust-port"),
        *(f"touch:{go_a}", f"wait:{go_b}", "sleep:0.2"),
    )
    assert a.wait(150) == 0, a.tail()
    go_b.touch()
    # B's flow body is done now; its final state report goes to A's dead server (B then spends minutes draining
    # its queued events into the void: stop it once the failure is in its log).
    failed = _wait_for_text(b, "ConnectError", 150)
    log = b.stderr()
    b.kill()
    assert failed, log[-3000:]
    # (B's own uvicorn, still migrating meanwhile, later fails with "address already in use" if B lives that long)
    assert not b.out_path.read_text().strip(), "B must not have printed a result"
    runs_a = _flow_runs(tmp_path / "a" / "prefect.db")
    assert len(runs_a) == 2, runs_a  # A's run and B's run, both in A's database
    assert _flow_runs(tmp_path / "b" / "prefect.db") == {}  # B's own server never served anything


# ------------------------------------------------------------------------------------------ the fix
@pytest.mark.slow
def test_concurrent_runs_each_use_their_own_server(
    tmp_path: Path, prefect_db_template: Path, children: list[Child]
) -> None:
    """Same choreography through :mod:`flows.prefect_backend` (the CLI's start-up), with Prefect's own port picker
    still forced onto one port: each run gets its own server and database, and B outlives A unharmed."""
    port = _free_port()
    go_a, go_b = tmp_path / "a-may-finish", tmp_path / "a-has-exited"
    homes = {name: tmp_path / f"home-{name}" for name in "ab"}
    for home in homes.values():
        _seed(home / "prefect", prefect_db_template)
    forced = ("--force-port", str(port), "--trust-port")
    a = _child(
        children, _base_env(tmp_path) | {"QUANTPIPE_HOME": str(homes["a"])}, tmp_path / "a.log",
        "--mode", "backend", *forced, f"wait:{go_a}",
    )  # fmt: skip
    b = _child(
        children, _base_env(tmp_path) | {"QUANTPIPE_HOME": str(homes["b"])}, tmp_path / "b.log",
        "--mode", "backend", *forced, f"touch:{go_a}", f"wait:{go_b}", "sleep:0.2",
    )  # fmt: skip
    assert a.wait(200) == 0, a.tail()
    go_b.touch()
    assert b.wait(120) == 0, b.tail()
    ra, rb = a.result(), b.result()
    assert ra["api_url"] != rb["api_url"]
    for child in (a, b):
        assert "address already in use" not in child.stderr()
        assert not _warnings(child.stderr()), child.tail()
    runs_a = _flow_runs(homes["a"] / "prefect" / "prefect.db")
    runs_b = _flow_runs(homes["b"] / "prefect" / "prefect.db")
    assert runs_a == {ra["flow_run_id"]: "COMPLETED"}
    assert runs_b == {rb["flow_run_id"]: "COMPLETED"}
    # task events too: A ran 1 task, B 3 (the very last events of a run may still be unwritten when its server
    # stops at exit, hence the bounds)
    assert _events(homes["a"] / "prefect" / "prefect.db").count("prefect.task-run.Completed") <= 1
    assert _events(homes["b"] / "prefect" / "prefect.db").count("prefect.task-run.Completed") >= 2


@pytest.mark.slow
def test_server_killed_mid_run_is_restarted_on_the_same_port(
    tmp_path: Path, prefect_db_template: Path, children: list[Child]
) -> None:
    home = tmp_path / "home"
    _seed(home / "prefect", prefect_db_template)
    steps = ("sleep:0.2", "kill-server", "sleep:0.2", "sleep:0.2")
    child = _child(children, _base_env(tmp_path) | {"QUANTPIPE_HOME": str(home)}, tmp_path / "c.log",
                   "--mode", "backend", *steps)  # fmt: skip
    assert child.wait(200) == 0, child.tail()
    out = child.result()
    (line,) = _warnings(child.stderr())
    assert "restarting it on the same port" in line and out["api_url"].rstrip("/") in line
    assert "Traceback" not in child.stderr()
    db = home / "prefect" / "prefect.db"
    assert _flow_runs(db) == {out["flow_run_id"]: "COMPLETED"}  # the restarted server recorded the run's end
    # (task-run events the killed server had received but not yet written died with it: best effort only)
    assert "prefect.flow-run.Completed" in _events(db)


@pytest.mark.slow
def test_lost_api_does_not_fail_a_finished_flow(
    tmp_path: Path, prefect_db_template: Path, children: list[Child]
) -> None:
    home = tmp_path / "home"
    _seed(home / "prefect", prefect_db_template)
    steps = ("sleep:0.2", "kill-server", "sleep:0.2")
    child = _child(children, _base_env(tmp_path) | {"QUANTPIPE_HOME": str(home)}, tmp_path / "c.log",
                   "--mode", "backend", "--no-restart", *steps)  # fmt: skip
    assert child.wait(200) == 0, child.tail()
    assert child.result()["flow_run_id"]
    text = child.stderr()
    (line,) = _warnings(text)
    assert "continuing without it" in line
    assert "Traceback" not in text and "ConnectError" not in text, text[-3000:]
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, text[-3000:]


# ------------------------------------------------------------------------------------------ real CLI
def _server_children(pid: int) -> list[int]:
    """Pids of ``flows.prefect_backend`` server processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "flows.prefect_backend" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_cli_quantize_survives_its_server_being_killed(
    tmp_path: Path, prefect_db_template: Path, tiny_llama_dir: Path, children: list[Child]
) -> None:
    """The real ``quantpipe quantize`` on the tiny Llama: its Prefect server is SIGKILLed once calibration is
    committed; the run restarts it, registers the model and exits 0 with one warning line."""
    from tests.flows.conftest import write_wikitext
    from tests.reliability.harness import TINY_RECIPE_YAML

    home = tmp_path / "home"
    _seed(home / "prefect", prefect_db_template)
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    write_wikitext(wiki)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE_YAML)
    env = _base_env(tmp_path) | {"QUANTPIPE_HOME": str(home), "QUANTPIPE_WIKITEXT_DIR": str(wiki)}
    env.pop("QUANTPIPE_STORE_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "quantize", "-m", str(tiny_llama_dir), "-r", str(recipe), "--json"]
    child = Child(argv, env, tmp_path / "cli.log")
    children.append(child)
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline and child.proc.poll() is None:
        if list((home / "store").glob("artifacts/calibration/*/manifest.json")):
            pids = _server_children(child.proc.pid)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    assert killed is not None, f"server never killed mid-run:\n{child.tail()}"
    assert child.wait(300) == 0, child.tail()
    out = child.result()
    assert out["model_version"] and set(out["stages"]) >= {"calibration", "hessians", "evaluate", "register"}
    (line,) = _warnings(child.stderr())
    assert "restarting it on the same port" in line
    assert "Traceback" not in child.stderr()
    assert _flow_runs(home / "prefect" / "prefect.db") == {out["flow_run_id"]: "COMPLETED"}


# ------------------------------------------------------------------------------------------ in-process units
def test_run_surviving_api_loss_returns_the_recorded_result(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    from flows import prefect_backend as pb

    offline: list[bool] = []
    monkeypatch.setattr(pb, "go_offline", lambda: offline.append(True))
    monkeypatch.setattr(pb, "_offline", False)

    def finished_then_lost() -> dict[str, int]:
        pb.record_flow_result({"version": 3})
        raise RuntimeError("state report failed") from httpx.ConnectError("[Errno 111] Connection refused")

    assert pb.run_surviving_api_loss(finished_then_lost, what="quantize-model") == {"version": 3}
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("warning: quantize-model finished, but the Prefect API became unreachable")
    assert offline == [True]


def test_run_surviving_api_loss_propagates_everything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from flows import prefect_backend as pb

    monkeypatch.setattr(pb, "go_offline", lambda: None)

    def lost_before_the_end() -> None:  # the body did not finish: a real failure
        raise httpx.ConnectError("refused")

    def finished_then_other_error() -> None:
        pb.record_flow_result({"version": 3})
        raise ValueError("not an API problem")

    with pytest.raises(httpx.ConnectError):
        pb.run_surviving_api_loss(lost_before_the_end, what="x")
    with pytest.raises(ValueError):
        pb.run_surviving_api_loss(finished_then_other_error, what="x")
    pb.record_flow_result({"outside": True})  # no guarded call: ignored
    assert pb._results == {}


def test_configured_api_is_used_and_no_server_started(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import prefect_backend as pb

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert pb.ensure_prefect_backend() == "http://127.0.0.1:9/api"
    assert pb.current_backend() is None


def test_quantpipe_prefect_api_url_setting_is_applied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import prefect_backend as pb
    from infra.settings import Settings

    applied: list[str] = []
    monkeypatch.setattr(pb, "_apply_api_url", applied.append)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        url = pb.ensure_prefect_backend(Settings(home=tmp_path, prefect_api_url="http://127.0.0.1:4200/api"))
    assert url == "http://127.0.0.1:4200/api" and applied == [url]
    assert pb.current_backend() is None


def test_return_state_calls_get_a_completed_state_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nightly`` calls its flow with ``return_state=True``: the recovered result comes back as a Completed state,
    whether Prefect raised the API loss or returned it as a failed state."""
    import httpx
    from prefect.states import Failed

    from flows import prefect_backend as pb

    monkeypatch.setattr(pb, "go_offline", lambda: None)
    monkeypatch.setattr(pb, "_offline", True)  # (no warning line)

    def raised() -> Any:
        pb.record_flow_result({"registered": 2})
        raise httpx.ReadError("connection reset")

    def returned() -> Any:
        pb.record_flow_result({"registered": 2})
        return Failed(data=httpx.ConnectError("refused"))

    for call in (raised, returned):
        state = pb.run_surviving_api_loss(call, what="nightly-requantize", as_state=True)
        assert state.is_completed() and state.result() == {"registered": 2}
