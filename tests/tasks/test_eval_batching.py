"""``eval.batch_size`` scores several windows per forward and gives the per-window results of one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infra.keys import artifact_key
from infra.settings import Settings
from tasks.evaluate import cached_perplexity, perplexity
from tasks.recipe import EvalConfig
from tasks.stage import StageContext


def test_batched_windows_equal_single_windows(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from tasks.models import load_model

    model = load_model(tiny_llama_dir)
    windows = torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))
    forwards: list[int] = []

    def make_model() -> object:
        def counted(batch: torch.Tensor, **kw: object) -> object:
            forwards.append(batch.shape[0])
            return model(batch, **kw)

        return counted

    results = {}
    for bs in (1, 3):
        ctx = StageContext(settings=Settings(home=tmp_path / f"h{bs}"), store_url=(tmp_path / f"s{bs}").as_uri())
        forwards.clear()
        cfg = EvalConfig(seq_len=32, n_windows=5, batch_size=bs)
        key = artifact_key("model", 1, {}, {})
        ctx.store.put("model", key, {"config.json": b"{}"}, stage_version=1, config={})
        results[bs] = cached_perplexity(ctx, f"model/{key}", make_model, windows, cfg)
        assert forwards == ([1] * 5 if bs == 1 else [3, 2])
    assert results[3]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-5)
    assert results[3]["predicted_tokens"] == results[1]["predicted_tokens"] == 5 * 31
    assert results[1]["ppl"] == pytest.approx(perplexity(model, windows)["ppl"], rel=1e-6)
