"""Shared CLI plumbing: one-line errors instead of tracebacks, details in a log file, credentials never printed.

* :func:`friendly` turns every exception a command raises into one line on stderr (status 2 for a
  :class:`QuantpipeError`, which names what to fix; 1 for anything else) and appends the full traceback to the log
  file ``$QUANTPIPE_HOME/logs/quantpipe.log`` (:func:`log_file`).
* :func:`flow_logs_to_file` keeps Prefect's run loggers from printing a failing run's ERROR lines and tracebacks
  (the failing task, "Encountered exception during execution", the siblings cancelled on shutdown) before that
  line: while the CLI runs a flow they go to the log file (and Prefect's own API handler) instead of the console.
* Everything printed on stderr or written to the log file goes through :mod:`infra.redact`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape

from infra.errors import QuantpipeError
from infra.redact import RedactingFilter, install_log_redaction, redact

__all__ = ["LOG_FILE_NAME", "err_console", "flow_logs_to_file", "friendly", "log_file"]

LOG_FILE_NAME = "quantpipe.log"
# Prefect's loggers of flow and task runs: a failing run logs its exception there at ERROR, with a traceback.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d %(threadName)s] %(message)s"
_PASS_THROUGH = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)

F = TypeVar("F", bound=Callable[..., Any])
_log = logging.getLogger("quantpipe.cli")
_log.propagate = False  # details of a failed command go to the log file only, never to the console


class _RedactingConsole(Console):
    """A console whose printed strings go through :func:`infra.redact.redact` first."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


err_console: Console = _RedactingConsole(stderr=True)
PIPED_WIDTH = 240  # rich cuts tables to 80 columns when stdout is not a terminal: wide enough for URLs and paths


def quiet_prefect() -> None:
    """Keep the terminal for results without starving the run page: Prefect's console handler at WARNING, its
    loggers left at INFO. (``PREFECT_LOGGING_LEVEL=WARNING``, used before, also drops INFO records at the run
    loggers themselves, so a CLI run's stage lines never reached the Prefect API: "This run didn't generate
    logs".) Call before Prefect is imported: its logging config reads the environment once."""
    import os

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def out_console() -> Console:
    """The stdout console of a command: terminal width on a terminal, :data:`PIPED_WIDTH` when piped or captured
    (``quantpipe serve | tee``, a service's log), so tables keep their URLs whole."""
    import sys

    return _RedactingConsole(width=None if sys.stdout.isatty() else PIPED_WIDTH)


install_log_redaction()  # quantpipe's and the libraries' log records (MLflow, Prefect, botocore, ...) are redacted


def log_file() -> Path:
    """``$QUANTPIPE_HOME/logs/quantpipe.log`` (settings' ``home``; the environment or the default when the
    settings themselves are invalid)."""
    try:
        from infra.settings import get_settings

        home = get_settings().home
    except Exception:  # a bad setting is what is being reported: do not fail on it again
        home = Path(os.environ.get("QUANTPIPE_HOME", "~/.quantpipe")).expanduser()
    return home / "logs" / LOG_FILE_NAME


def _file_handler() -> logging.FileHandler | None:
    path = log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # read-only or missing home: the console line is all there is
        return None
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def _record_failure(exc: BaseException, command: str) -> Path | None:
    """Append ``exc`` with its traceback to the log file; the path, or ``None`` when it cannot be written."""
    handler = _file_handler()
    if handler is None:
        return None
    _log.addHandler(handler)
    try:
        _log.error("quantpipe %s failed: %s: %s", command, type(exc).__name__, exc, exc_info=exc)
    finally:
        _log.removeHandler(handler)
        handler.close()
    return Path(handler.baseFilename)


def _print_error(message: str, limit: int = 0, suffix: str = "") -> None:
    line = " ".join(redact(message).split())  # redacted before any cut: a cut URL would escape the pattern
    if limit and len(line) > limit:
        line = line[: limit - 3] + "..."
    line += suffix
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def friendly(fn: F) -> F:
    """One line on stderr for any exception (redacted), the traceback in the log file.

    A :class:`QuantpipeError` (and a pydantic validation error of user input, which the loaders turn into one)
    exits with status 2; any other exception is a bug or an environment failure: status 1, and the line says
    where the details are. Typer/click exits pass through untouched; Ctrl-C is left to ``main``.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except QuantpipeError as exc:
            _record_failure(exc, fn.__name__)
            _print_error(str(exc))
            raise typer.Exit(2) from None
        except (Exception, asyncio.CancelledError) as exc:
            where = _record_failure(exc, fn.__name__)
            detail = f" (details in {where})" if where is not None else ""
            _print_error(f"unexpected {type(exc).__name__}: {exc}", limit=400, suffix=detail)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class _RunLogsToFile(logging.Filter):
    """On Prefect's run loggers: while :func:`flow_logs_to_file` is active, every record is copied to the log file,
    and records at ERROR (or with a traceback) go to the logger's own handlers (Prefect's API handler, so the UI
    keeps them) but not up to the console handler on the root logger. Inactive, it passes everything.

    A logger filter rather than ``propagate = False``: Prefect may re-run its ``dictConfig`` (ephemeral server
    start-up), which replaces handlers but keeps filters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handler: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        handler = self.handler
        if handler is None:
            return True
        if record.levelno >= handler.level:
            handler.handle(record)
        if record.levelno < logging.ERROR and not record.exc_info:
            return True
        for own in logging.getLogger(record.name).handlers:
            if record.levelno >= own.level:
                own.handle(record)
        return False


_RUN_FILTER = _RunLogsToFile()


@contextmanager
def flow_logs_to_file() -> Iterator[Path | None]:
    """While a CLI command runs a flow: Prefect's run-logger errors and tracebacks go to the log file, not to the
    console (the command prints one line for the error afterwards). Yields the log file (``None`` when it cannot
    be written: then nothing is rerouted)."""
    handler = _file_handler()
    if handler is None:
        yield None
        return
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _RUN_FILTER not in logger.filters:
            logger.addFilter(_RUN_FILTER)
    previous, _RUN_FILTER.handler = _RUN_FILTER.handler, handler
    try:
        yield Path(handler.baseFilename)
    finally:
        _RUN_FILTER.handler = previous
        handler.close()
