"""MLflow run tracking: one parent run per flow, one nested run per stage.

Why it is built this way:

* Every call goes through an explicit :class:`mlflow.MlflowClient` and explicit run ids, never the fluent
  ``mlflow.start_run`` stack. That stack is thread-local/global state, so stages running in worker threads
  (Prefect task runners, per-layer pools) would attach to the wrong parent or to none. Nesting is expressed
  with the ``mlflow.parentRunId`` tag, which is exactly what the fluent API writes.
* Clients are built from :class:`infra.settings.Settings` (tracking *and* registry URI passed explicitly), so
  two settings objects in one process (tests, a CLI pointed at a server) never leak into each other through
  ``mlflow.set_tracking_uri``.
* :func:`configure` is cached per (tracking URI, experiment, artifact location): the first call creates the
  sqlite schema and the experiment (about a second), later calls are a dictionary lookup.
* The experiment always gets an explicit ``artifact_location``; with a sqlite backend MLflow would otherwise
  write artifacts to ``./mlruns`` under whatever directory the process happens to run in.
* Params are flattened, cut to MLflow's limits and stripped of anything that looks like a credential
  (:mod:`registry._sanitize`), because a tracking server is readable by everyone who can reach it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from infra.redact import install_log_redaction, redact_url, register_settings
from infra.settings import Settings, get_settings
from registry._sanitize import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, clean_key, one_line, sanitize
from registry.errors import RegistryError, RegistryNotFoundError

__all__ = [
    "TAG_ARTIFACT_REF",
    "TAG_CACHE_HIT",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_NOTE",
    "TAG_STAGE",
    "StageRun",
    "configure",
    "experiment_id",
    "flow_run",
    "get_client",
    "log_run_artifact",
    "log_run_metrics",
    "mlflow_ui_url",
    "model_version_url",
    "public_url",
    "run_artifact_url",
    "run_artifacts",
    "run_url",
    "set_run_tags",
    "stage_run",
]

log = logging.getLogger(__name__)
# MLflow's exception texts and log lines name the tracking URI, user:password@ included: redact them everywhere.
install_log_redaction()

TAG_PARENT = "mlflow.parentRunId"  # what MLflow's UI and fluent API use for nesting
TAG_KIND = "quantpipe.kind"  # "flow" | "stage"
TAG_STAGE = "stage"  # stage name on stage runs
TAG_CACHE_HIT = "cache_hit"  # "true" | "false" on stage runs
TAG_ARTIFACT_REF = "artifact_ref"  # "<stage>/<key>" of the stage's output
TAG_ERROR = "error"  # one-line exception text on FAILED/KILLED runs
TAG_NOTE = "mlflow.note.content"  # the run's Description in MLflow's UI (rendered as markdown, links clickable)
METRIC_CACHE_SECONDS = "cache_hit_seconds"

_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRIC_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH


@dataclass(frozen=True)
class _Configured:
    client: MlflowClient
    experiment_id: str


_lock = threading.Lock()
_configured: dict[tuple[str, str, str], _Configured] = {}


def _sqlite_parent(uri: str) -> Path | None:
    """Directory that must exist before sqlite can create ``uri``'s database file."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(urlparse(uri).path)
    if not path or path == "/:memory:":
        return None
    return Path(path).parent


def _create_sqlite_atomically(uri: str) -> None:
    """Create a missing sqlite DB with MLflow's full schema under a temporary name, then link it into place.

    MLflow migrates a new sqlite file in many steps; a process killed half-way leaves a DB that every later run
    fails on ("duplicate column name"). Building it aside and publishing it with ``link`` (which fails if the
    name exists) means the DB at ``uri`` is either absent or complete, also when processes race.
    """
    path = Path(unquote(urlparse(uri).path))
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.init")
    tmp.unlink(missing_ok=True)
    # MLflow announces the one-time schema creation at INFO on stderr ("Creating initial MLflow database
    # tables..."): noise before a command's own output, so it is kept below the console threshold meanwhile.
    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}", registry_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # runs the schema migrations
        client.search_registered_models(max_results=1)
        for store in (client._tracking_client.store, client._get_registry_client().store):
            engine = getattr(store, "engine", None)
            if engine is not None:
                engine.dispose()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process published its DB first: use that one
    finally:
        tmp.unlink(missing_ok=True)
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else get_settings()


def _configure(settings: Settings) -> _Configured:
    uri = settings.effective_mlflow_uri
    location = settings.effective_mlflow_artifact_location
    cache_key = (uri, settings.mlflow_experiment, location)
    found = _configured.get(cache_key)
    if found is not None:
        return found
    with _lock:
        found = _configured.get(cache_key)
        if found is not None:
            return found
        os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
        register_settings(settings)  # the tracking URI's password is masked wherever MLflow repeats it
        parent = _sqlite_parent(uri)
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
            _create_sqlite_atomically(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = _ensure_experiment(client, settings.mlflow_experiment, location)
        found = _Configured(client=client, experiment_id=exp_id)
        _configured[cache_key] = found
        return found


def _ensure_experiment(client: MlflowClient, name: str, location: str) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return str(client.create_experiment(name, artifact_location=location))
            except MlflowException as exc:  # another process created it between our two calls
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.artifact_location.rstrip("/") != location.rstrip("/"):
            log.warning(
                "MLflow experiment %r keeps artifacts at %s, not at the configured %s (an existing "
                "experiment's artifact location cannot change; use another mlflow_experiment to move it)",
                name,
                experiment.artifact_location,
                location,
            )
        return str(experiment.experiment_id)
    except MlflowException as exc:
        raise RegistryError(
            f"cannot set up MLflow experiment {name!r} at {_redact(client.tracking_uri)}: {one_line(exc.message, 300)}"
        ) from exc


def _redact(uri: str) -> str:
    return redact_url(uri)


def configure(settings: Settings | None = None) -> None:
    """Point this process's MLflow usage at ``settings`` and make sure the experiment exists.

    Also sets the process-global tracking URI (for code outside this package that uses MLflow's fluent API,
    such as the MLflow UI launcher); everything in :mod:`registry` itself passes URIs explicitly. Idempotent:
    repeated calls with the same settings cost a dictionary lookup.
    """
    settings = _settings(settings)
    _configure(settings)
    import mlflow

    if mlflow.get_tracking_uri() != settings.effective_mlflow_uri:
        mlflow.set_tracking_uri(settings.effective_mlflow_uri)


def get_client(settings: Settings | None = None) -> MlflowClient:
    """A client bound to ``settings``' tracking and registry URI (configured on first use)."""
    return _configure(_settings(settings)).client


def experiment_id(settings: Settings | None = None) -> str:
    """Id of ``settings.mlflow_experiment`` (created on first use)."""
    return _configure(_settings(settings)).experiment_id


def _tags(values: Mapping[str, Any] | None) -> dict[str, str]:
    return sanitize(values, MAX_TAG_LENGTH)


class StageRun:
    """Handle to one stage's run; safe to use from the thread that owns the stage.

    Every method writes immediately (no buffering), so a crash loses nothing that was already logged.
    """

    def __init__(self, client: MlflowClient, run_id: str, stage: str) -> None:
        self._client = client
        self.run_id = run_id
        self.stage = stage

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics (``step`` for per-layer or per-window series)."""
        now = int(time.time() * 1000)
        batch = [
            Metric(key=clean_key(k), value=float(v), timestamp=now, step=int(step or 0)) for k, v in metrics.items()
        ]
        for i in range(0, len(batch), _METRIC_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i : i + _METRIC_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log config values: nested mappings become dotted keys, secrets are dropped, long values cut."""
        _log_params(self._client, self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (same flattening and redaction as params; tags may be overwritten, params may not)."""
        _set_tags(self._client, self.run_id, tags)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents under ``artifact_path`` (default: the dir's name)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        else:
            raise RegistryNotFoundError(f"cannot log artifact {path}: no such file or directory")

    def log_figure_png(self, path: Path | str) -> None:
        """Upload a PNG plot under ``figures/`` so the MLflow UI shows it in the run's artifact view."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise RegistryError(f"log_figure_png expects a .png file, got {path.name!r}")
        self.log_artifact(path, artifact_path="figures")

    def set_output(self, ref: str) -> None:
        """Record the ``<stage>/<key>`` artifact this stage produced (tag ``artifact_ref``)."""
        self.set_tags({TAG_ARTIFACT_REF: str(ref)})

    def record_cache_hit(self, ref: str, seconds: float) -> None:
        """Mark the stage as served from the artifact store: tags ``cache_hit=true``, ``artifact_ref=<ref>``
        and metric ``cache_hit_seconds`` (time spent verifying/loading the cached artifact)."""
        self.set_tags({TAG_CACHE_HIT: "true", TAG_ARTIFACT_REF: str(ref)})
        self.log_metrics({METRIC_CACHE_SECONDS: float(seconds)})


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any] | None) -> None:
    items = [Param(k, v) for k, v in sanitize(params, MAX_PARAM_LENGTH).items()]
    for i in range(0, len(items), _BATCH):
        try:
            client.log_batch(run_id, params=items[i : i + _BATCH])
        except MlflowException as exc:  # typically: a param re-logged with a different value (params are immutable)
            raise RegistryError(f"cannot log params to run {run_id}: {one_line(exc.message, 300)}") from exc


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any] | None) -> None:
    items = [RunTag(k, v) for k, v in _tags(tags).items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[i : i + _BATCH])


@contextmanager
def _terminating(client: MlflowClient, run_id: str) -> Iterator[None]:
    """FINISHED on normal exit, FAILED on an exception, KILLED on Ctrl-C / SystemExit; always re-raises."""
    try:
        yield
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:
            message = one_line(f"{type(exc).__name__}: {exc}", 1000)
            client.set_tag(run_id, TAG_ERROR, message)
            client.set_terminated(run_id, status)
        except Exception:  # never hide the original error behind a tracking error
            log.warning("could not mark MLflow run %s as %s", run_id, status, exc_info=True)
        raise
    else:
        client.set_terminated(run_id, "FINISHED")


def _create_run(
    client: MlflowClient, exp_id: str, run_name: str, tags: Mapping[str, Any] | None, fixed: dict[str, str]
) -> str:
    all_tags = {**_tags(tags), **fixed}
    try:
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    except MlflowException as exc:
        raise RegistryError(f"cannot create MLflow run {run_name!r}: {one_line(exc.message, 300)}") from exc
    return str(run.info.run_id)


@contextmanager
def flow_run(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> Iterator[str]:
    """Open the parent run of one flow execution and yield its run id.

    The id (a string) is what crosses into tasks, which open their own :func:`stage_run` under it.
    """
    conf = _configure(_settings(settings))
    run_id = _create_run(conf.client, conf.experiment_id, name, tags, {TAG_KIND: "flow"})
    with _terminating(conf.client, run_id):
        _log_params(conf.client, run_id, params)
        yield run_id


@contextmanager
def stage_run(
    stage: str,
    *,
    parent_run_id: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> Iterator[StageRun]:
    """Open a run nested under ``parent_run_id`` for one stage and yield a :class:`StageRun` handle.

    Usable from any thread: it only touches the explicit run ids. The run lands in the parent's experiment and
    starts with ``cache_hit=false``; :meth:`StageRun.record_cache_hit` flips it.
    """
    conf = _configure(_settings(settings))
    try:
        parent = conf.client.get_run(parent_run_id)
    except MlflowException as exc:
        raise RegistryNotFoundError(
            f"parent MLflow run {parent_run_id!r} of stage {stage!r} not found: {one_line(exc.message, 200)}"
        ) from exc
    fixed = {TAG_PARENT: parent_run_id, TAG_KIND: "stage", TAG_STAGE: stage, TAG_CACHE_HIT: "false"}
    run_id = _create_run(conf.client, parent.info.experiment_id, stage, tags, fixed)
    handle = StageRun(conf.client, run_id, stage)
    with _terminating(conf.client, run_id):
        handle.log_params(params or {})
        yield handle


# --------------------------------------------------------------------------------------------------- links & parent run
def public_url(url: str | None) -> str | None:
    """``url`` without its userinfo (``user:password@``) and with any other secret redacted: safe for a tag, a
    model card or a log line. ``None`` for anything that is not an ``http(s)`` URL (nothing to link to)."""
    from urllib.parse import urlsplit, urlunsplit

    from infra.redact import redact

    if not url:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return redact(urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), parts.query, "")))


def mlflow_ui_url(settings: Settings | None = None) -> str | None:
    """Base URL of the MLflow UI: the tracking server's own URL when it is one (``http(s)://``), else ``None``
    (a sqlite backend has no UI until ``mlflow ui`` serves it, at an address we cannot know)."""
    return public_url(_settings(settings).effective_mlflow_uri)


def run_url(run_id: str, settings: Settings | None = None) -> str | None:
    """Link to a run's page in the MLflow UI, or ``None`` without a UI URL."""
    base = mlflow_ui_url(settings)
    return f"{base}/#/experiments/{experiment_id(settings)}/runs/{run_id}" if base else None


def run_artifact_url(run_id: str, path: str, settings: Settings | None = None) -> str | None:
    """Link to one artifact (e.g. ``figures/layer_bits.png``) in the run page's artifact view, or ``None``."""
    base = run_url(run_id, settings)
    return f"{base}/artifactPath/{path}" if base else None


def run_artifacts(run_id: str, path: str, settings: Settings | None = None) -> list[str]:
    """Paths of the files directly under ``path`` in a run's artifacts ([] when there are none)."""
    try:
        found = get_client(settings).list_artifacts(run_id, path)
    except (MlflowException, OSError):
        return []
    return sorted(str(f.path) for f in found if not f.is_dir)


def model_version_url(name: str, version: str, settings: Settings | None = None) -> str | None:
    """Link to a registered model version's page in the MLflow UI, or ``None`` without a UI URL."""
    base = mlflow_ui_url(settings)
    return f"{base}/#/models/{name}/versions/{version}" if base else None


def log_run_metrics(run_id: str, metrics: Mapping[str, float], settings: Settings | None = None) -> None:
    """Log metrics on any run by id (the flow's parent run gets the headline numbers this way)."""
    StageRun(get_client(settings), run_id, "").log_metrics(metrics)


def set_run_tags(run_id: str, tags: Mapping[str, Any], settings: Settings | None = None) -> None:
    """Set tags on any run by id (flattened, secrets dropped, values redacted and cut)."""
    _set_tags(get_client(settings), run_id, tags)


def log_run_artifact(
    run_id: str, path: Path | str, artifact_path: str | None = None, settings: Settings | None = None
) -> None:
    """Upload a file (or a directory's contents) to any run by id."""
    StageRun(get_client(settings), run_id, "").log_artifact(path, artifact_path)
