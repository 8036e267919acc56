"""End to end through a real Prefect server: deploy, start a worker, trigger with `prefect deployment run`,
wait for COMPLETED and find the registered version. Everything binds 127.0.0.1 and is stopped in finally."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.deploy import NIGHTLY_DEPLOYMENT, QUANTIZE_DEPLOYMENT, REPO_ROOT
from infra.services import ManagedProcess, free_port, prefect_env, start_prefect_server, start_prefect_worker
from infra.settings import Settings
from tasks.recipe import Recipe, load_recipe
from tests.flows.conftest import tiny_recipe

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _cli(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _read(api_url: str, fn: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return fn(client)


def _wait_final(api_url: str, flow_run_id: str, timeout: float, worker: ManagedProcess) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = _read(api_url, lambda c: c.read_flow_run(flow_run_id))
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            pytest.fail(
                f"flow run {flow_run_id} still {run.state_name} after {timeout} s; worker log:\n{worker.log_tail(4000)}"
            )
        time.sleep(1)


def test_prefect_yaml_matches_code() -> None:
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in doc["deployments"]}
    assert by_name["default"]["entrypoint"] == "flows/quantize.py:quantize_model"
    assert by_name["nightly"]["entrypoint"] == "flows/nightly.py:nightly_requantize"
    assert by_name["nightly"]["schedules"][0] == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    recipe = by_name["default"]["parameters"]["recipe"]  # a shipped recipe by name (the run form's picker)
    assert (load_recipe(recipe) if isinstance(recipe, str) else Recipe.model_validate(recipe)) == load_recipe(
        "gptq-w4g64"
    )


def test_deploy_worker_run_registers_a_version(tmp_path: Path, ops_wikitext_dir: Path, tiny_llama_dir: Path) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    qhome = tmp_path / "qhome"
    env_common = {
        "QUANTPIPE_HOME": str(qhome),
        "QUANTPIPE_WIKITEXT_DIR": str(ops_wikitext_dir),
        "QUANTPIPE_WATCHLIST": str(tmp_path / "watchlist.yaml"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    server = start_prefect_server(
        prefect_home=tmp_path / "prefect-server", port=free_port(), timeout=120, log_path=tmp_path / "server.log"
    )
    worker: ManagedProcess | None = None
    api = f"{server.url}/api"
    try:
        timings["server_healthy"] = time.monotonic() - t0
        env = prefect_env(api, tmp_path / "prefect-client", env_common)

        # 1. prefect.yaml deploys as-is (then `quantpipe deploy` overwrites the same two deployments).
        t = time.monotonic()
        out = _cli([str(BIN / "prefect"), "--no-prompt", "work-pool", "create", "quantpipe", "--type", "process"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        out = _cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        timings["prefect_deploy_all"] = time.monotonic() - t
        dep = _read(api, lambda c: c.read_deployment_by_name(NIGHTLY_DEPLOYMENT))
        assert dep.parameters["watchlist_path"] == str(tmp_path / "watchlist.yaml")

        # 2. `quantpipe deploy` (code path: from_source(...).deploy(...), pool already exists).
        t = time.monotonic()
        out = _cli([str(BIN / "quantpipe"), "deploy", "--json", "--cron", "30 3 * * *", "--paused"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        timings["quantpipe_deploy"] = time.monotonic() - t
        names = {r["name"] for r in json.loads(out.stdout)}
        assert names == {QUANTIZE_DEPLOYMENT, NIGHTLY_DEPLOYMENT}

        quantize_dep = _read(api, lambda c: c.read_deployment_by_name(QUANTIZE_DEPLOYMENT))
        schema = quantize_dep.parameter_openapi_schema
        assert set(schema["properties"]) >= {"model", "recipe", "overrides", "name", "store_url"}
        assert schema["required"] == ["model"]
        assert "gptq-w4g64" in schema["properties"]["recipe"]["anyOf"][0]["enum"]  # the recipe picker
        defs = schema["definitions"]
        assert set(defs["Recipe"]["properties"]) >= {"name", "calibration", "quantize", "eval", "registry"}
        gptq = defs["GPTQQuantizeConfig"]["properties"]  # one form section per method
        assert gptq["bits"]["minimum"] == 1 and gptq["bits"]["default"] == 4
        assert "description" in gptq["group_size"] and "damp" not in defs["RTNQuantizeConfig"]["properties"]
        assert quantize_dep.parameters["recipe"] == "gptq-w4g64"
        nightly_dep = _read(api, lambda c: c.read_deployment_by_name(NIGHTLY_DEPLOYMENT))
        assert nightly_dep.schedules[0].schedule.cron == "30 3 * * *"
        assert nightly_dep.schedules[0].schedule.timezone == "UTC"

        # 3. A parameter that fails the schema is refused at trigger time, with the field named.
        bad = _cli(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                QUANTIZE_DEPLOYMENT,
                "--params",
                json.dumps({"model": "x", "recipe": {"quantize": {"bits": "four"}}}),
            ],
            env,
        )
        assert bad.returncode != 0
        assert "bits" in (bad.stdout + bad.stderr)

        # 4. Worker + trigger through the CLI, as the UI would.
        worker = start_prefect_worker(
            "quantpipe",
            api_url=api,
            prefect_home=tmp_path / "prefect-worker",
            log_path=tmp_path / "worker.log",
            extra_env=env_common,
            cwd=tmp_path,
        )
        params = {"model": str(tiny_llama_dir), "recipe": tiny_recipe().model_dump(mode="json")}
        t = time.monotonic()
        out = _cli(
            [str(BIN / "prefect"), "deployment", "run", QUANTIZE_DEPLOYMENT, "--params", json.dumps(params)], env
        )
        assert out.returncode == 0, out.stdout + out.stderr
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
        assert match, out.stdout
        run = _wait_final(api, match.group(1), timeout=150, worker=worker)
        timings["trigger_to_final"] = time.monotonic() - t
        assert run.state.is_completed(), f"{run.state_name}: {run.state.message}\n{worker.log_tail(4000)}"

        from registry.models import lookup

        info = lookup(model="tiny-llama", recipe="tiny-gptq", settings=Settings(home=qhome))
        assert info is not None and info.name == "tiny-llama.tiny-gptq" and "candidate" in info.aliases
        assert info.tags["bits"] == "4"

        # 5. A CLI run against the same server: its stage lines reach the run page (the CLI keeps the terminal
        #    quiet through Prefect's console handler only; PREFECT_LOGGING_LEVEL=WARNING used to drop them).
        cli_env = {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"}
        out = _cli(
            [str(BIN / "quantpipe"), "quantize", "--model", str(tiny_llama_dir), "--recipe", "rtn-w4g64", "--json"]
            + [
                a
                for s in ("calibration.n_samples=8", "calibration.seq_len=64", "eval.seq_len=128", "eval.n_windows=2")
                for a in ("--set", s)
            ],
            cli_env,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        flow_run_id = json.loads(out.stdout.strip().splitlines()[-1])["flow_run_id"]
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = _read(
            api, lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        )
        messages = [log.message for log in logs]
        assert any(m.startswith("result: ppl") for m in messages), messages[:20]
        assert "result: ppl" not in out.stderr  # the terminal stays quiet
    finally:
        if worker is not None:
            worker.stop(signal.SIGINT, timeout=20)  # the worker before the server (ENVIRONMENT.md §2c)
        server.stop(signal.SIGTERM)
        timings["total"] = time.monotonic() - t0
        print("timings", {k: round(v, 1) for k, v in timings.items()})
    assert not server.group_alive() and (worker is None or not worker.group_alive())
    os.environ.get("PYTEST_CURRENT_TEST")
