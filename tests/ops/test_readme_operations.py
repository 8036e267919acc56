"""The README's Operations block, run as written in one bash shell: serve, deploy, a worker, a deployment run
watched to completion, a registry lookup, a nightly pass, doctor, and stopping the background jobs.

Only what this machine cannot have is substituted: free ports for 4200/5000, a tiny random Llama for
``smollm2-135m`` (with small calibration/eval overrides so it runs in seconds), and a one-model watch-list for
``watchlist.example.yaml``. Any failing line fails the test (``set -e``); background jobs are killed on exit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.services import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def operations_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Operations") :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "README's Operations section has no bash block"
    return match.group(1)


def test_operations_block_runs_as_written(tmp_path: Path, tiny_llama_dir: Path, ops_wikitext_dir: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the README's wait loop uses it)")
    block = operations_block()
    pp, mp = free_port(), free_port()
    overrides = ["calibration.n_samples=8", "calibration.seq_len=64", "eval.seq_len=128", "eval.n_windows=2"]
    recipe = tmp_path / "tiny-rtn.yaml"
    recipe.write_text(
        "name: tiny-rtn\ncalibration: {n_samples: 8, seq_len: 64}\nquantize: {method: rtn, bits: 4, group_size: 32}\n"
        "eval: {seq_len: 128, n_windows: 2}\n"
    )
    watchlist = tmp_path / "watchlist.yaml"
    watchlist.write_text(f"recipes: [{recipe}]\nmodels:\n  - path: {tiny_llama_dir}\n")
    script = (
        block.replace("source .venv/bin/activate", f"source {Path(sys.executable).parent}/activate")
        .replace("quantpipe serve ", f"quantpipe serve --prefect-port {pp} --mlflow-port {mp} ")
        .replace(":4200", f":{pp}")
        .replace(":5000", f":{mp}")
        .replace('"recipe": "rtn-w4g64"}', f'"recipe": "rtn-w4g64", "overrides": {json.dumps(overrides)}}}')
        .replace("smollm2-135m", str(tiny_llama_dir))
        .replace("watchlist.example.yaml", str(watchlist))
    )
    assert script.count(str(pp)) >= 3 and str(tiny_llama_dir) in script and str(watchlist) in script
    harness = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QUANTPIPE_", "MLFLOW_"))},
        "QUANTPIPE_HOME": str(tmp_path / "home"),
        "QUANTPIPE_WIKITEXT_DIR": str(ops_wikitext_dir),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    work = tmp_path / "shell"
    work.mkdir()
    run = subprocess.run(
        ["bash", "-c", harness], cwd=work, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (work / "serve.log", work / "worker.log") if p.exists()
    )
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}{logs}"
    assert re.search(r"models:/tiny-llama\.rtn-w4g64-[0-9a-f]{8}/1", run.stdout), run.stdout[-3000:]
    assert "Completed" in run.stdout  # `prefect deployment run --watch` reports the final state
