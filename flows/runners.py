"""Task runners for the per-layer quantization fan-out: threads (default) or a Dask cluster (prefect-dask).

``dask`` / ``QUANTPIPE_DASK_ADDRESS`` selects Dask:

* ``"N"`` (a number) or ``"local"``: a ``distributed.LocalCluster`` of N single-threaded worker *processes*
  (``local`` = the ``workers`` count), bound to 127.0.0.1 with no dashboard; torch in each worker gets
  ``cores // N`` threads so the workers do not oversubscribe the CPU, and the workers report to this
  process's Prefect API (the configured one, or the ephemeral server, started before the cluster).
* ``"tcp://host:8786"`` (anything else): an existing scheduler; its workers need this repo installed, the same
  settings (``QUANTPIPE_*``) and access to the same store (S3 in production), because tasks only pass
  artifact refs and read/write the tensors through the store.

Only the per-layer ``quantize-layer`` tasks are submitted to the runner; the other stages run in the flow's
process. Tasks carry a :class:`tasks.stage.StageContext`, which holds an open store client (boto3 clients do not
pickle): :func:`_picklable_stage_context` registers a reducer that ships the context *without* it, and each
worker reopens the store from ``store_url``.
"""

from __future__ import annotations

import copyreg
import os
from typing import Any

from infra.errors import ConfigError

__all__ = ["DASK_ENV", "dask_task_runner", "task_runner_for"]

DASK_ENV = "QUANTPIPE_DASK_ADDRESS"


def _reduce_stage_context(ctx: Any) -> tuple[Any, tuple[Any, ...]]:
    return type(ctx), (ctx.settings, ctx.store_url, ctx.parent_run_id, ctx.flow_run_id, ctx.progress)


def _picklable_stage_context() -> None:
    from tasks.stage import StageContext

    copyreg.pickle(StageContext, _reduce_stage_context)


def _api_url_for_workers() -> str:
    """The Prefect API the Dask workers must report to: the configured one, or this process's own server
    (started now, :mod:`flows.prefect_backend`), so workers do not each start (and migrate) a server of their own."""
    from flows.prefect_backend import ensure_prefect_backend

    url = ensure_prefect_backend()
    if not url:
        raise ConfigError("Dask workers need a Prefect API: set PREFECT_API_URL (or enable Prefect's ephemeral mode)")
    return url


def dask_task_runner(spec: str, *, workers: int) -> Any:
    """A ``DaskTaskRunner`` for ``spec`` (see the module docstring)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("Dask scale-out needs the 'dask' extra: pip install 'quantpipe[dask]'") from None
    _picklable_stage_context()
    spec = spec.strip()
    if spec.isdigit() or spec == "local":
        n = int(spec) if spec.isdigit() else workers
        if n < 1:
            raise ConfigError(f"--dask {spec}: need at least one worker")
        cores = os.cpu_count() or 1
        threads = str(max(1, cores // n))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PREFECT_API_URL": _api_url_for_workers()}
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": n,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
                "env": env,
            },
        )
    if "://" not in spec:
        raise ConfigError(f"--dask {spec!r}: give a worker count (e.g. 2), 'local', or a scheduler tcp://host:port")
    return DaskTaskRunner(address=spec)


def task_runner_for(workers: int, dask: str | None = None) -> Any:
    """Dask when ``dask`` (or ``$QUANTPIPE_DASK_ADDRESS``) is set, else a thread pool of ``workers``."""
    spec = dask or os.environ.get(DASK_ENV)
    if spec:
        return dask_task_runner(spec, workers=workers)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers)
