"""Per-layer quantization on a Dask LocalCluster (2 worker processes) through prefect-dask."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from flows.runners import task_runner_for
from infra.errors import ConfigError
from infra.settings import Settings
from tests.flows.conftest import tiny_recipe


def test_runner_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    monkeypatch.delenv("QUANTPIPE_DASK_ADDRESS", raising=False)
    assert isinstance(task_runner_for(3), ThreadPoolTaskRunner)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        local = task_runner_for(1, "2")
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["host"] == "127.0.0.1"
    assert local.cluster_kwargs["env"]["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    monkeypatch.setenv("QUANTPIPE_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    assert task_runner_for(2).address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError, match="worker count"):
        task_runner_for(2, "somewhere")


def test_stage_context_pickles_without_its_store(settings: Settings) -> None:
    from flows.runners import _picklable_stage_context
    from tasks.stage import StageContext

    _picklable_stage_context()
    ctx = StageContext(settings=settings, store_url=settings.effective_store_url, parent_run_id="p", progress=False)
    ctx.store.check()
    clone = pickle.loads(pickle.dumps(ctx))
    assert clone._store is None and clone.store_url == ctx.store_url and clone.parent_run_id == "p"


@pytest.mark.slow
def test_quantize_on_a_local_dask_cluster(
    prefect_harness: None, ops_home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from flows.quantize import quantize_model
    from registry.models import show
    from tasks.recipe import HessianConfig

    # Hessians collected in 2 calibration shards, one per Dask worker, then reduced per block (issue 20).
    sharded = tiny_recipe().model_copy(update={"hessians": HessianConfig(micro_batch=4, shards=2)})
    flow = quantize_model.with_options(task_runner=task_runner_for(2, "2"))
    out = flow(model=str(tiny_llama_dir), recipe=sharded)
    assert out["stages"]["quantize"]["cache_hit"] is False
    assert out["model_name"] == "tiny-llama.tiny-gptq"
    info = show(out["model_name"], out["model_version"], settings=ops_home)
    assert info.tags["key.quantize"] == out["stages"]["quantize"]["key"]

    # Same numbers as the thread-pool runner, recomputed in a second store (the runner is a scheduling
    # choice, not part of any key).
    again = quantize_model(model=str(tiny_llama_dir), recipe=tiny_recipe(), store_url=(tmp_path / "s2").as_uri())
    assert again["stages"]["quantize"]["cache_hit"] is False
    assert again["stages"]["quantize"]["key"] == out["stages"]["quantize"]["key"]
    assert again["stages"]["hessians"]["key"] == out["stages"]["hessians"]["key"]  # shards are not keyed
    assert again["metrics"]["ppl"] == pytest.approx(out["metrics"]["ppl"])
