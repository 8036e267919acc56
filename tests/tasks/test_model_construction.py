"""transformers builds models under process-wide switches, so two threads building at once used to leave one
model's parameters on the meta device (a flow's eval-fp failed with "Cannot copy out of meta tensor" when two
runs of one build shared a process). Builds now take one lock (``tasks.models.model_construction``)."""

from __future__ import annotations

import threading
from pathlib import Path

from tasks.driver import BlockStreamer
from tasks.models import load_model


def test_models_built_from_two_threads_at_once_all_have_weights(tiny_llama_dir: Path) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def loads() -> None:
        start.wait()
        try:
            for _ in range(4):
                model = load_model(tiny_llama_dir)
                on_meta = [n for n, p in model.named_parameters() if p.is_meta]
                assert not on_meta, on_meta[:3]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def streams() -> None:  # meta-device skeletons built beside the loads (the block streamer's)
        start.wait()
        try:
            for _ in range(8):
                BlockStreamer(tiny_llama_dir)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loads), threading.Thread(target=loads), threading.Thread(target=streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
