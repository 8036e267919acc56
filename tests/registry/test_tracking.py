"""Run tracking: nesting, thread use, param hygiene and run status."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import SecretStr

from registry import tracking
from registry._sanitize import MAX_PARAM_LENGTH, clean_key, is_secret_key, sanitize
from registry.errors import RegistryError, RegistryNotFoundError
from registry.tracking import configure, flow_run, get_client, stage_run


def _client(settings) -> MlflowClient:
    uri = settings.effective_mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_configure_creates_experiment_with_artifact_location_and_is_cheap(settings, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_TELEMETRY", raising=False)
    configure(settings)
    assert os.environ["MLFLOW_ENABLE_TELEMETRY"] == "false"
    exp = _client(settings).get_experiment_by_name(settings.mlflow_experiment)
    assert exp is not None
    assert exp.artifact_location.rstrip("/") == settings.effective_mlflow_artifact_location.rstrip("/")
    start = time.perf_counter()
    for _ in range(100):
        configure(settings)
    assert time.perf_counter() - start < 0.5
    assert get_client(settings) is get_client(settings)


def test_configure_creates_missing_home_for_sqlite(tmp_path):
    from infra.settings import Settings

    home = tmp_path / "does" / "not" / "exist"
    s = Settings(home=home, mlflow_tracking_uri=None, mlflow_artifact_location=None, mlflow_experiment="fresh")
    assert tracking.experiment_id(s)
    assert (home / "mlflow.db").is_file()


def test_stage_runs_are_nested_and_finished(settings):
    with flow_run("quantize", params={"model": "tiny"}, tags={"git_sha": "abc"}, settings=settings) as parent:
        assert isinstance(parent, str)
        with stage_run("calibration", parent_run_id=parent, params={"n": 4}, tags={}, settings=settings) as st:
            st.log_metrics({"tokens": 128.0})
        with stage_run("hessians", parent_run_id=parent, params={}, tags={}, settings=settings) as st2:
            pass
    client = _client(settings)
    flow = client.get_run(parent)
    assert flow.info.status == "FINISHED"
    assert flow.data.tags[tracking.TAG_KIND] == "flow"
    assert flow.data.tags["git_sha"] == "abc"
    assert flow.info.artifact_uri.startswith(settings.effective_mlflow_artifact_location)
    for handle, stage in ((st, "calibration"), (st2, "hessians")):
        run = client.get_run(handle.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags[tracking.TAG_STAGE] == stage
        assert run.data.tags[tracking.TAG_CACHE_HIT] == "false"
        assert run.info.run_name == stage
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == flow.info.experiment_id
    assert client.get_run(st.run_id).data.metrics["tokens"] == 128.0


def test_stage_runs_from_worker_threads(settings):
    def work(layer: int) -> str:
        with stage_run(
            f"quantize-layer-{layer}", parent_run_id=parent, params={"layer": layer}, tags={}, settings=settings
        ) as st:
            for step in range(3):
                st.log_metrics({"proxy_loss": layer + step / 10}, step=step)
            return st.run_id

    with flow_run("threads", params={}, tags={}, settings=settings) as parent, ThreadPoolExecutor(4) as pool:
        run_ids = list(pool.map(work, range(8)))
    client = _client(settings)
    assert len(set(run_ids)) == 8
    for layer, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["layer"] == str(layer)
        history = client.get_metric_history(run_id, "proxy_loss")
        assert sorted(m.step for m in history) == [0, 1, 2]


def test_params_flattened_truncated_and_secrets_never_logged(settings):
    secrets = ["hf_abcdef123", "fake-aws-key-id-x", "wJalrXUtnFEMI", "hunter2", "s3cr3t-pw", "sk-live-1"]
    params = {
        "recipe": {"method": "gptq", "bits": 4, "quant": {"group": 64, "sym": True}},
        "hf_token": secrets[0],
        "aws": {"aws_access_key_id": secrets[1], "aws_secret_access_key": secrets[2]},
        "db_password": secrets[3],
        "tracking_uri": f"postgresql://user:{secrets[4]}@db:5432/mlflow",
        "api": SecretStr(secrets[5]),
        "tokenizer": "digest-1",
        "n_tokens": 2048,
        "bos_token_id": 1,
        "long": "x" * 10_000,
        "layers": [0, 1, 2],
    }
    flow_tags = {"authToken": secrets[0], "ok": "yes"}
    with (
        flow_run("p", params=params, tags=flow_tags, settings=settings) as parent,
        stage_run("s", parent_run_id=parent, params=params, tags={}, settings=settings) as st,
    ):
        st.set_tags({"nested": {"password": secrets[3]}, "visible": 1})
    client = _client(settings)
    for run_id in (parent, st.run_id):
        data = client.get_run(run_id).data
        assert data.params["recipe.method"] == "gptq"
        assert data.params["recipe.bits"] == "4"
        assert data.params["recipe.quant.group"] == "64"
        assert data.params["recipe.quant.sym"] == "True"
        assert data.params["tokenizer"] == "digest-1"
        assert data.params["n_tokens"] == "2048"
        assert data.params["bos_token_id"] == "1"
        assert data.params["layers"] == "[0,1,2]"
        assert len(data.params["long"]) == MAX_PARAM_LENGTH == 6000
        assert data.params["tracking_uri"] == "postgresql://user:***@db:5432/mlflow"
        for key in ("hf_token", "aws.aws_access_key_id", "aws.aws_secret_access_key", "db_password", "api"):
            assert key not in data.params
        everything = repr(data.params) + repr(data.tags)
        for secret in secrets:
            assert secret not in everything
    assert client.get_run(parent).data.tags["ok"] == "yes"
    assert "authToken" not in client.get_run(parent).data.tags
    assert client.get_run(st.run_id).data.tags["visible"] == "1"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("hf_token", True),
        ("HF_TOKEN", True),
        ("accessToken", True),
        ("authtoken", True),
        ("aws_secret_access_key", True),
        ("aws_access_key_id", True),
        ("db.password", True),
        ("openai_api_key", True),
        ("credentials.path", True),
        ("tokenizer", False),
        ("n_tokens", False),
        ("tokens_per_sample", False),
        ("pad_token_id", False),
        ("recipe.bits", False),
        ("key.calibration", False),
        ("build_key", False),
    ],
)
def test_is_secret_key(key, secret):
    assert is_secret_key(key) is secret


def test_clean_key_limits_and_characters():
    assert clean_key("a b:c/d-e_f.g") == "a b:c/d-e_f.g"
    assert clean_key("weird$key!") == "weird_key_"
    assert clean_key("a/../b") == "a/_/b"
    long_a, long_b = "k" * 300 + "a", "k" * 300 + "b"
    assert len(clean_key(long_a)) == 250
    assert clean_key(long_a) != clean_key(long_b)
    assert sanitize({"empty": {}}, 10) == {"empty": "{}"}


def test_failing_stage_marks_runs_failed(settings):
    with (
        pytest.raises(ValueError, match="boom"),
        flow_run("f", params={}, tags={}, settings=settings) as parent,
        stage_run("pack", parent_run_id=parent, params={}, tags={}, settings=settings) as st,
    ):
        raise ValueError("boom\nsecond line")
    client = _client(settings)
    stage = client.get_run(st.run_id)
    assert stage.info.status == "FAILED"
    assert stage.data.tags["error"] == "ValueError: boom second line"
    assert client.get_run(parent).info.status == "FAILED"


def test_keyboard_interrupt_marks_run_killed(settings):
    with pytest.raises(KeyboardInterrupt), flow_run("k", params={}, tags={}, settings=settings) as parent:
        raise KeyboardInterrupt
    assert _client(settings).get_run(parent).info.status == "KILLED"


def test_stage_handle_artifacts_tags_and_cache_hit(settings, tmp_path: Path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.txt").write_text("a")
    png = tmp_path / "ppl.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    ref = "calibration/" + "ab" * 32
    with (
        flow_run("a", params={}, tags={}, settings=settings) as parent,
        stage_run("evaluate", parent_run_id=parent, params={}, tags={}, settings=settings) as st,
    ):
        st.log_params({"tasks": ["wikitext"]})
        st.set_tags({"eval_script": "v1"})
        st.log_artifact(report)
        st.log_artifact(plots)
        st.log_figure_png(png)
        st.record_cache_hit(ref, 0.25)
        with pytest.raises(RegistryError):
            st.log_figure_png(report)
        with pytest.raises(RegistryNotFoundError):
            st.log_artifact(tmp_path / "missing")
    client = _client(settings)
    run = client.get_run(st.run_id)
    assert run.data.tags[tracking.TAG_CACHE_HIT] == "true"
    assert run.data.tags[tracking.TAG_ARTIFACT_REF] == ref
    assert run.data.tags["eval_script"] == "v1"
    assert run.data.metrics["cache_hit_seconds"] == 0.25
    assert run.data.params["tasks"] == '["wikitext"]'
    top = {f.path for f in client.list_artifacts(st.run_id)}
    assert top == {"report.json", "plots", "figures"}
    assert [f.path for f in client.list_artifacts(st.run_id, "figures")] == ["figures/ppl.png"]
    assert [f.path for f in client.list_artifacts(st.run_id, "plots")] == ["plots/a.txt"]


def test_stage_run_with_unknown_parent_raises(settings):
    with (
        pytest.raises(RegistryNotFoundError, match="parent MLflow run"),
        stage_run("x", parent_run_id="0" * 32, params={}, tags={}, settings=settings),
    ):
        pass


def test_relogging_a_param_with_another_value_is_a_one_line_error(settings):
    with (
        flow_run("p", params={"bits": 4}, tags={}, settings=settings) as parent,
        pytest.raises(RegistryError, match="cannot log params"),
        stage_run("s", parent_run_id=parent, params={"bits": 4}, tags={}, settings=settings) as st,
    ):
        st.log_params({"bits": 3})
    assert _client(settings).get_run(st.run_id).info.status == "FAILED"
