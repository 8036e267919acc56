"""Prefect deployments of quantpipe: ``quantize-model/default`` and ``nightly-requantize/nightly``.

Both run from this checkout (``flow.from_source(source=<repo dir>, entrypoint=...)``) on a ``process`` work
pool (created when missing), so a ``prefect worker start --pool quantpipe`` on a machine with this repo and
its venv executes them. ``prefect.yaml`` at the repository root describes the same two deployments for
``prefect deploy --all``.

* ``quantize-model``: parameters ``model`` (required), ``recipe`` (a shipped recipe by name, picked from an
  enum, default ``gptq-w4g64``; or a full :class:`tasks.recipe.Recipe` whose ``quantize`` section is a oneOf on
  ``method``, so the form shows only the chosen method's options), ``overrides`` (``--set``-style), ``name``
  (registered recipe name; empty: derived from the effective recipe), ``store_url``, ``progress``. Every
  parameter has a description (the flow's docstring) and examples.
* ``nightly-requantize``: parameter ``watchlist_path``; cron ``0 2 * * *`` in UTC by default.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from infra.errors import ConfigError, QuantpipeError

__all__ = [
    "DEFAULT_CRON",
    "DEFAULT_POOL",
    "NIGHTLY_DEPLOYMENT",
    "QUANTIZE_DEPLOYMENT",
    "REPO_ROOT",
    "DeployResult",
    "deploy_all",
    "ensure_process_pool",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "quantpipe"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
QUANTIZE_ENTRYPOINT = "flows/quantize.py:quantize_model"
NIGHTLY_ENTRYPOINT = "flows/nightly.py:nightly_requantize"
QUANTIZE_DEPLOYMENT = "quantize-model/default"
NIGHTLY_DEPLOYMENT = "nightly-requantize/nightly"
DEFAULT_RECIPE = "gptq-w4g64"


@dataclass(frozen=True)
class DeployResult:
    name: str
    deployment_id: str
    schedule: str | None
    work_pool: str


def _api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "no Prefect server configured: set PREFECT_API_URL (``quantpipe serve`` prints it) or pass --api-url"
        )
    return str(url)


def ensure_process_pool(name: str) -> bool:
    """Create the ``process`` work pool ``name`` if missing; ``True`` when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = None
        if pool is not None:
            if pool.type != "process":
                raise ConfigError(f"work pool {name!r} exists with type {pool.type!r}; quantpipe needs 'process'")
            return False
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="quantpipe flows (process worker in a checkout of the repo)",
                )
            )
        except ObjectAlreadyExists:
            return False
        return True


def default_recipe_parameter() -> dict[str, Any]:
    from tasks.recipe import load_recipe

    data: dict[str, Any] = load_recipe(DEFAULT_RECIPE).model_dump(mode="json")
    return data


def deploy_all(
    *,
    work_pool: str = DEFAULT_POOL,
    source: Path = REPO_ROOT,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    watchlist: str | None = None,
    store_url: str | None = None,
    nightly: bool = True,
    paused_schedule: bool = False,
    job_env: dict[str, str] | None = None,
) -> list[DeployResult]:
    """Register both deployments against the configured Prefect API (``PREFECT_API_URL``)."""
    _api_url()
    schedule = _schedule(cron, timezone)
    source = Path(source).resolve()
    if not (source / QUANTIZE_ENTRYPOINT.split(":")[0]).is_file():
        raise ConfigError(f"{source} is not a quantpipe checkout (no {QUANTIZE_ENTRYPOINT.split(':')[0]})")
    ensure_process_pool(work_pool)
    job_variables: dict[str, Any] = {"env": dict(job_env)} if job_env else {}
    results: list[DeployResult] = []
    # Prefect prints its own "deployments created" table on stdout: keep stdout for our results (--json).
    with contextlib.redirect_stdout(sys.stderr):
        _deploy(
            results,
            source,
            work_pool,
            job_variables,
            store_url,
            nightly,
            watchlist,
            schedule,
            cron,
            timezone,
            paused_schedule,
        )
    return results


def _deploy(
    results: list[DeployResult],
    source: Path,
    work_pool: str,
    job_variables: dict[str, Any],
    store_url: str | None,
    nightly: bool,
    watchlist: str | None,
    schedule: Any,
    cron: str,
    timezone: str,
    paused_schedule: bool,
) -> None:
    from prefect import flow

    try:
        quantize = flow.from_source(source=str(source), entrypoint=QUANTIZE_ENTRYPOINT)
        qid = quantize.deploy(  # type: ignore[union-attr]
            name="default",
            work_pool_name=work_pool,
            parameters={"recipe": DEFAULT_RECIPE, "store_url": store_url or "", "progress": False},
            description="Quantize a model with a shipped recipe picked by name, optional overrides and name.",
            tags=["quantpipe"],
            job_variables=job_variables,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,
        )
        results.append(DeployResult(QUANTIZE_DEPLOYMENT, str(qid), None, work_pool))
        if nightly:
            from infra.settings import get_settings

            wl = watchlist or str(get_settings().home / "watchlist.yaml")
            nightly_flow = flow.from_source(source=str(source), entrypoint=NIGHTLY_ENTRYPOINT)
            nid = nightly_flow.deploy(  # type: ignore[union-attr]
                name="nightly",
                work_pool_name=work_pool,
                parameters={"watchlist_path": wl, "store_url": store_url},
                schedules=[schedule],
                paused=paused_schedule,
                description="Requantize new releases of the watched models (skips registered builds).",
                tags=["quantpipe", "nightly"],
                job_variables=job_variables,
                build=False,
                push=False,
                print_next_steps=False,
                ignore_warnings=True,
            )
            results.append(DeployResult(NIGHTLY_DEPLOYMENT, str(nid), f"{cron} ({timezone})", work_pool))
    except QuantpipeError:
        raise
    except Exception as exc:  # connection refused, API validation errors: one line, not a traceback
        text = " ".join(str(exc).split())[:300]
        raise QuantpipeError(f"deploying to {_api_url()} failed: {type(exc).__name__}: {text}") from exc


def _schedule(cron: str, timezone: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"invalid time zone {timezone!r}: use an IANA name such as UTC or Europe/Berlin") from None
    try:
        return Cron(cron, timezone=timezone)
    except (ValidationError, ValueError) as exc:
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(
            f"invalid schedule {cron!r} ({timezone}): {msg.removeprefix('Value error, ')} (e.g. '0 2 * * *', UTC)"
        ) from None


def deployment_id(result: DeployResult) -> UUID:
    return UUID(result.deployment_id)
