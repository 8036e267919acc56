"""The CLI surfaces of the flow: ``quantize --json``, ``eval``, ``registry lookup``, ``lineage``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from infra.settings import Settings

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_quantize_json_then_lookup_eval_lineage(
    prefect_harness: None, home: Settings, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "cli-rtn",
                "calibration": {"n_samples": 4, "seq_len": 64},
                "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
                "eval": {"seq_len": 128, "n_windows": 2},
            }
        )
    )
    result = runner.invoke(
        app, ["quantize", "-m", str(tiny_llama_dir), "-r", str(recipe), "--set", "quantize.bits=3", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) >= {"flow_run_id", "mlflow_run_id", "model_name", "model_version", "stages", "metrics"}
    assert out["model_name"] == "tiny-llama.cli-rtn" and out["metrics"]["ppl"] > 1
    assert all(set(v) == {"key", "cache_hit", "seconds"} for v in out["stages"].values())

    looked = runner.invoke(app, ["registry", "lookup", "--model", "tiny-llama", "--bits", "3"])
    assert looked.exit_code == 0 and looked.stdout.strip() == f"models:/tiny-llama.cli-rtn/{out['model_version']}"
    by_path = runner.invoke(app, ["registry", "lookup", "--model", str(tiny_llama_dir), "--bits", "3"])
    assert by_path.exit_code == 0 and by_path.stdout.strip() == looked.stdout.strip()  # the dir's canonical name
    missing = runner.invoke(app, ["registry", "lookup", "--model", "tiny-llama", "--bits", "2"])
    assert missing.exit_code == 1
    assert "match everything but --bits '2'; they have 3" in missing.output

    ev = runner.invoke(
        app,
        [
            "eval",
            "-m",
            str(tiny_llama_dir),
            "--build",
            out["stages"]["pack"]["key"],
            "--seq-len",
            "128",
            "--windows",
            "2",
            "--json",
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(out["metrics"]["ppl"])

    lin = runner.invoke(app, ["lineage", f"{out['model_name']}/{out['model_version']}", "--json"])
    assert lin.exit_code == 0, lin.output
    stages = {a["stage"] for a in json.loads(lin.stdout)["artifacts"].values()}
    assert stages >= {"model", "calibration", "hessians", "quantize", "pack", "evaluate"}


def test_bad_recipe_is_one_line_and_writes_nothing(home: Settings, tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("quantize: {bits: 0}\n")
    result = runner.invoke(app, ["quantize", "-m", str(tiny_llama_dir), "-r", str(recipe)])
    assert result.exit_code == 2
    assert "quantize.bits" in result.output and "Traceback" not in result.output
    assert not (home.home / "store" / "artifacts").exists()
