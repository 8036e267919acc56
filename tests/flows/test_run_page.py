"""What an operator sees of one real quantize run: the Prefect run page (logs, task run names, progress and
summary artifacts) and MLflow (parent-run metrics, the version's source run, its model card), all read back
through the Prefect client and an MLflow sqlite backend."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

from flows.quantize import quantize_model
from flows.summary import SUMMARY_KEY
from infra.settings import Settings
from registry.card import CARD_SECTIONS
from tests.flows.conftest import tiny_recipe

pytestmark = pytest.mark.slow

STAGES = ["model", "calibration", "hessians", "quantize", "pack", "eval-fp", "evaluate", "register"]


def _prefect_records(flow_run_id: str) -> tuple[list, list, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run logger sends its records in batches
    fid = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fid]))
        )
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    return logs, artifacts, task_runs


def test_run_page_and_mlflow_tell_the_story(prefect_harness: None, home: Settings, tiny_llama_dir: Path) -> None:
    out = quantize_model(str(tiny_llama_dir), tiny_recipe())
    assert list(out["stages"]) == STAGES
    logs, artifacts, task_runs = _prefect_records(out["flow_run_id"])

    # log lines: every stage's start and end with its short key, hit or miss and seconds; the headline; the version
    text = "\n".join(log.message for log in logs)
    for stage in STAGES[:-1]:
        key = out["stages"][stage]["key"]
        short = f"{key.split('/')[0]}/{key.split('/')[1][:12]}"
        assert f"{stage}: started, key {short}" in text
        assert f"{stage}: cache miss, computed, key {short}," in text
    m = out["metrics"]
    assert f"result: ppl {m['ppl']:.4g} vs fp {m['ppl_fp']:.4g}" in text
    assert f"{m['bits_per_weight_stored']:.3f} stored bits/weight" in text
    assert f"registered {out['model_name']} version {out['model_version']} (aliases: candidate" in text
    assert f"MLflow parent run {out['mlflow_run_id']}" in text

    # task runs named after what they do
    names = {tr.name for tr in task_runs}
    layers = [n for n in names if n.startswith("quantize model.layers.")]
    assert "quantize model.layers.0.mlp.down_proj" in names and len(layers) == 14  # 2 blocks x 7 linears
    assert {"hessians 2 blocks", "evaluate tiny-gptq", "pack tiny-gptq", "register tiny-llama"} <= names
    assert "calibration 8x64 tokens" in names

    # progress artifacts for the long stages, all at 100 %; the summary artifact with the stage table
    progress = {a.description.split(":")[0]: a.data for a in artifacts if a.type == "progress"}
    assert {"hessians", "quantize", "eval fp", "evaluate"} <= set(progress), progress
    assert all(v == 100.0 for v in progress.values()), progress
    (summary,) = [a for a in artifacts if a.key == SUMMARY_KEY]
    assert summary.type == "markdown"
    assert "| stage | key | cache | seconds | MLflow run |" in summary.data
    for stage in STAGES:
        assert f"| {stage} | `" in summary.data
    assert f"{out['model_name']}/{out['model_version']}" in summary.data
    assert f"parent run `{out['mlflow_run_id']}`" in summary.data  # sqlite backend: ids, no UI links

    # MLflow: the parent run has the headline metrics; it is the version's source run; the card is the description
    from registry.models import show
    from registry.tracking import get_client

    client = get_client(home)
    parent = client.get_run(out["mlflow_run_id"])
    pm = parent.data.metrics
    assert pm["ppl"] == pytest.approx(m["ppl"]) and pm["ppl_fp"] == pytest.approx(m["ppl_fp"])
    assert pm["ppl_ratio"] == pytest.approx(m["ppl"] / m["ppl_fp"])
    assert pm["bits_per_weight_stored"] == pytest.approx(m["bits_per_weight_stored"])
    assert {f"seconds.{s}" for s in STAGES[:-1]} <= set(pm)
    prefect_url = parent.data.tags["prefect_flow_run_url"]  # the harness's server has a UI URL
    assert prefect_url.startswith("http://127.0.0.1:") and prefect_url.endswith(f"/runs/flow-run/{out['flow_run_id']}")
    assert f"]({prefect_url})" in parent.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "figures")} >= {"figures/layer_bits.png"}
    info = show(out["model_name"], out["model_version"], settings=home)
    assert info.run_id == out["mlflow_run_id"]
    assert info.source.startswith(parent.info.artifact_uri)
    card = info.description
    for section in CARD_SECTIONS:
        assert f"## {section}" in card
    assert f"quantpipe lineage {out['model_name']}/{out['model_version']}" in card
    assert f"| perplexity (quantized) | {m['ppl']:.4g} |" in card
    assert "quantpipe export tiny-llama.tiny-gptq/1 --format native" in card
    assert f"Prefect flow run: {prefect_url}" in card
    model_desc = client.get_registered_model(out["model_name"]).description
    assert "tiny-llama" in model_desc and "champion" in model_desc


def test_nightly_summary_has_each_built_pair_story(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import yaml
    from prefect.artifacts import Artifact

    from flows.nightly import ARTIFACT_KEY, nightly_requantize

    wl = tmp_path / "watchlist.yaml"
    wl.write_text(
        yaml.safe_dump({"recipes": [tiny_recipe().model_dump(mode="json")], "models": [{"path": str(tiny_llama_dir)}]})
    )
    night = nightly_requantize(watchlist_path=str(wl))
    assert night["registered"] == 1 and "summary" not in night["rows"][0]
    night_md = str(Artifact.get(ARTIFACT_KEY).data)
    assert "## tiny-llama × tiny-gptq" in night_md  # the pair's own section below the night's table
    assert "| stage | key | cache | seconds | MLflow run |" in night_md and "| hessians | `hessians/" in night_md
    assert "### Registry" in night_md and "`tiny-llama.tiny-gptq/1`" in night_md
    pair_md = str(Artifact.get(SUMMARY_KEY).data)  # the subflow's run page has its summary too
    assert "| evaluate | `evaluate/" in pair_md and "tiny-llama.tiny-gptq/1" in pair_md
