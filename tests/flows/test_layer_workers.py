"""``quantize.workers`` bounds the concurrent layer tasks however the flow is started (the CLI gave it a runner;
deployments and nightly runs used the decorator's fixed 2 threads and ignored the setting)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from tests.flows.conftest import tiny_recipe


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrent_layer_tasks_follow_the_recipe(
    workers: int, prefect_harness: None, home: Settings, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.quantize
    from flows.quantize import quantize_model

    real = tasks.quantize.quantize_layer
    lock = threading.Lock()
    active, peak = 0, 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.2)  # let tasks overlap when the runner allows it
            return real(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(tasks.quantize, "quantize_layer", counted)
    recipe = tiny_recipe(method="rtn", workers=workers).model_copy(update={"name": f"tiny-rtn-w{workers}"})
    quantize_model(str(tiny_llama_dir), recipe)  # the decorated flow, as a deployment runs it
    assert peak == workers
