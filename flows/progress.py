"""Rich progress bars for long stages (blocks, layers, windows), shared by nested and concurrent stages.

Disabled (no output at all) unless the caller asks for it, so Prefect workers and tests stay quiet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StageProgress"]

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


class StageProgress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(i)``: marks item ``i`` (0-based) done. ``total`` 0 = unknown; no bar when disabled."""
        if not self.enabled or total <= 0:
            yield lambda i: None
            return
        progress = _shared()
        task_id = progress.add_task(description, total=total)
        try:
            yield lambda i: progress.update(task_id, completed=i + 1)
        finally:
            _release()
