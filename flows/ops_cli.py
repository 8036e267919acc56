"""``quantpipe serve | deploy | nightly``: local services, Prefect deployments, the nightly flow by hand."""

from __future__ import annotations

import json
import signal
import time
from types import FrameType
from typing import Any

import typer
from rich.table import Table

from flows.cli_util import err_console, friendly, out_console, quiet_prefect
from infra.errors import ConfigError
from infra.settings import get_settings

__all__ = ["register"]

console = out_console()
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _TerminatedError(Exception):
    """SIGTERM arrived: leave the serve loop through the same cleanup path as Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _TerminatedError()


@friendly
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default loopback only)."),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect server (API + UI) port."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow tracking server port."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Do not start the Prefect server."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not start the MLflow server."),
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for each health check."),
) -> None:
    """Start a local Prefect server and MLflow tracking server; Ctrl-C (or SIGTERM) stops both."""
    from infra.services import mlflow_artifacts_destination, running_services

    if no_prefect and no_mlflow:
        raise ConfigError("nothing to serve: both --no-prefect and --no-mlflow given")
    settings = get_settings(refresh=True)
    if host not in _LOOPBACK:
        err_console.print(
            f"[yellow]warning:[/] binding {host}: neither server has authentication; anyone who can reach "
            "this interface can run flows and change the registry"
        )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        console.print(f"starting services (home {settings.home}) …")
        with running_services(
            settings,
            host=host,
            prefect_port=None if no_prefect else prefect_port,
            mlflow_port=None if no_mlflow else mlflow_port,
            timeout=timeout,
        ) as services:
            table = Table("service", "URL", "pid", "healthy after", "log")
            if services.prefect:
                p = services.prefect
                table.add_row(
                    "Prefect UI/API", p.url, str(p.pid), f"{services.timings['prefect_healthy_s']} s", str(p.log_path)
                )
            if services.mlflow:
                m = services.mlflow
                table.add_row(
                    "MLflow UI/tracking",
                    m.url,
                    str(m.pid),
                    f"{services.timings['mlflow_healthy_s']} s",
                    str(m.log_path),
                )
            console.print(table)
            if services.mlflow:
                console.print(
                    f"MLflow: backend sqlite:///{settings.home / 'mlflow.db'}, "
                    f"artifacts {mlflow_artifacts_destination(settings)}"
                )
            console.print("in another shell:")
            for key, value in services.exports().items():
                console.print(f"  export {key}={value}", highlight=False)
            console.print("Ctrl-C stops both servers.")
            while True:
                for proc in services.processes():
                    if not proc.alive():
                        from infra.services import ServiceError

                        raise ServiceError(
                            f"{proc.name} exited unexpectedly (status {proc.popen.returncode}); "
                            f"stopping the others. Log {proc.log_path}:\n{proc.log_tail(1500)}"
                        )
                time.sleep(0.5)
    except (KeyboardInterrupt, _TerminatedError):
        console.print("stopping …")
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print("services stopped")


def _parse_env(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"--env {item!r} must look like NAME=value")
        key, value = item.split("=", 1)
        out[key] = value
    return out


@friendly
def deploy(
    pool: str = typer.Option("quantpipe", "--pool", help="Process work pool (created if missing)."),
    cron: str = typer.Option("0 2 * * *", "--cron", help="Nightly schedule (cron, five fields)."),
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of the cron schedule."),
    watchlist: str = typer.Option(
        None, "--watchlist", help="Watch-list YAML (default $QUANTPIPE_HOME/watchlist.yaml)."
    ),
    store: str = typer.Option(None, "--store", help="Artifact store URL the deployments pass to the flows."),
    no_nightly: bool = typer.Option(False, "--no-nightly", help="Only deploy quantize-model."),
    paused: bool = typer.Option(False, "--paused", help="Create the nightly schedule paused."),
    env: list[str] = typer.Option([], "--env", help="NAME=value for the flow-run environment (repeatable)."),
    api_url: str = typer.Option(None, "--api-url", help="Prefect API URL (default PREFECT_API_URL)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register the Prefect deployments quantize-model/default and nightly-requantize/nightly."""
    from flows.deploy import deploy_all

    _quiet()
    kwargs: dict[str, Any] = {
        "work_pool": pool,
        "cron": cron,
        "timezone": timezone,
        "watchlist": watchlist,
        "store_url": store,
        "nightly": not no_nightly,
        "paused_schedule": paused,
        "job_env": _parse_env(list(env)) or None,
    }
    if api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            results = deploy_all(**kwargs)
    else:
        results = deploy_all(**kwargs)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in results]))
        return
    table = Table("deployment", "id", "schedule", "work pool")
    for r in results:
        table.add_row(r.name, r.deployment_id, r.schedule or "-", r.work_pool)
    console.print(table)
    console.print(f"start a worker: prefect worker start --pool {pool}")
    console.print("""trigger: prefect deployment run 'quantize-model/default' --params '{"model": "/path/to/model"}'""")


@friendly
def nightly(
    watchlist: str = typer.Argument(..., help="Watch-list YAML (models x recipes)."),
    store: str = typer.Option(None, "--store", help="Artifact store URL (default from settings)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the nightly requantization once, now, in this process (exit 1 if any entry failed)."""
    from flows.nightly import load_watchlist, nightly_requantize
    from flows.prefect_backend import with_prefect_backend

    _quiet()
    load_watchlist(watchlist)  # a broken file is a one-line error before Prefect starts
    run = with_prefect_backend(nightly_requantize)  # this process's own Prefect API unless one is configured
    state = run(watchlist_path=watchlist, store_url=store, fail_on_error=False, return_state=True)
    summary: dict[str, Any] = state.result()
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    else:
        from flows.nightly import SummaryRow, render_summary

        rows = [SummaryRow.model_validate(r) for r in summary["rows"]]
        console.print(render_summary(rows, watchlist=watchlist, seconds=summary["seconds"]), markup=False)
    if summary["failed"] or summary["errors"]:
        raise typer.Exit(1)


def _quiet() -> None:
    quiet_prefect()


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``deploy`` and ``nightly`` to the ``quantpipe`` app."""
    app.command("serve")(serve)
    app.command("deploy")(deploy)
    app.command("nightly")(nightly)
