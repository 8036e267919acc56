"""Progress of long stages (blocks, layers, windows): rich bars on the terminal, progress artifacts in Prefect.

The rich bars are shared by nested and concurrent stages and disabled (no output at all) unless the caller asks
for them, so Prefect workers and tests stay quiet. Inside a Prefect flow or task run every tracked stage also gets
a progress artifact on the run page (``create_progress_artifact``), updated at most every
:data:`ARTIFACT_INTERVAL_S` seconds and at the end: a 5-minute hessians stage shows how far it is. Progress is
never worth a failed stage, so an unreachable Prefect API only stops the artifact updates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ARTIFACT_INTERVAL_S", "PrefectProgress", "StageProgress"]

log = logging.getLogger(__name__)
ARTIFACT_INTERVAL_S = 2.0  # at most one progress update per artifact every 2 s (each is an API call)

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"progress": None, "active": 0}


def _shared() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with _LOCK:
        if _STATE["progress"] is None:
            _STATE["progress"] = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
        if _STATE["active"] == 0:
            _STATE["progress"].start()
        _STATE["active"] += 1
        return _STATE["progress"]


def _release() -> None:
    with _LOCK:
        _STATE["active"] -= 1
        if _STATE["active"] == 0 and _STATE["progress"] is not None:
            _STATE["progress"].stop()
            _STATE["progress"] = None


class PrefectProgress:
    """One Prefect progress artifact (0-100 %) for ``total`` items, or nothing outside a Prefect run.

    Created in the caller's run context (so it lands on that flow/task run's Artifacts tab); updates go through
    the client captured then, so ``advance`` may be called from any thread (layer futures are collected in the
    flow's thread, Hessian blocks in the task's)."""

    def __init__(self, description: str, total: int) -> None:
        self.description = description
        self.total = total
        self._id: Any = None
        self._client: Any = None
        self._last = 0.0
        self._done = 0
        self._lock = threading.Lock()
        if total <= 0:
            return
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.client.orchestration import get_client

            self._id = create_progress_artifact(0.0, description=f"{description}: 0 of {total}")
            self._client = get_client(sync_client=True)
            self._last = time.monotonic()
        except Exception as exc:  # progress is never worth a failed stage
            log.debug("no progress artifact for %s: %s", description, exc)
            self._id = None

    def advance(self, i: int) -> None:
        """Item ``i`` (0-based) is done; posts the percentage when the interval passed or the last item is done."""
        if self._id is None:
            return
        with self._lock:
            self._done = max(self._done, min(i + 1, self.total))
            now = time.monotonic()
            if self._done < self.total and now - self._last < ARTIFACT_INTERVAL_S:
                return
            self._last = now
            done = self._done
        self._post(done)

    def finish(self) -> None:
        """Post the final count (the last update may have been throttled)."""
        if self._id is not None:
            self._post(self._done)

    def _post(self, done: int) -> None:
        from prefect.client.schemas.actions import ArtifactUpdate

        try:
            self._client.update_artifact(
                artifact_id=self._id,
                artifact=ArtifactUpdate(
                    data=round(100.0 * done / self.total, 2), description=f"{self.description}: {done} of {self.total}"
                ),
            )
        except Exception as exc:
            log.debug("progress artifact %s not updated (%s); no further updates", self.description, exc)
            self._id = None


class StageProgress:
    def __init__(self, enabled: bool, prefect: bool = True) -> None:
        self.enabled = enabled
        self.prefect = prefect

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(i)``: marks item ``i`` (0-based) done. ``total`` 0 = unknown (nothing shown).

        A rich bar when enabled; a Prefect progress artifact whenever this runs inside a Prefect run."""
        artifact = PrefectProgress(description, total) if self.prefect and total > 0 else None
        if not self.enabled or total <= 0:
            try:
                yield artifact.advance if artifact is not None else (lambda i: None)
            finally:
                if artifact is not None:
                    artifact.finish()
            return
        progress = _shared()
        task_id = progress.add_task(description, total=total)

        def advance(i: int) -> None:
            progress.update(task_id, completed=i + 1)
            if artifact is not None:
                artifact.advance(i)

        try:
            yield advance
        finally:
            _release()
            if artifact is not None:
                artifact.finish()
