"""Errors detected inside the flow, seen from a real ``quantpipe`` process: one line on stderr, a non-zero status,
and the details (Prefect's run records, the traceback) in ``$QUANTPIPE_HOME/logs/quantpipe.log``.

In-process CliRunner tests (test_bad_inputs.py) cannot see this: Prefect's console handler is bound to the
stderr of the process, not to the runner's captured streams. Each test starts a fresh process with its own
ephemeral Prefect server, as a user's first run does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.reliability.harness import REPO, PipelineInputs, record

pytestmark = pytest.mark.slow


def _quantpipe(args: list[str], home: Path, inputs: PipelineInputs, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "QUANTPIPE_HOME": str(home),
        "QUANTPIPE_WIKITEXT_DIR": str(inputs.wikitext_dir),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "COLUMNS": "100",
    }
    env.pop("PREFECT_API_URL", None)  # ephemeral Prefect, as for a user
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _problems(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What a user should not see on stderr: Prefect's ERROR records, tracebacks, cancelled sibling tasks."""
    bad = ("Traceback", "| ERROR", "ERROR ", "Encountered exception", "Finished in state", "CancelledError", "Crash")
    return [line for line in done.stderr.splitlines() if any(b in line for b in bad)]


def test_bad_input_detected_in_the_flow_is_one_line(rel_inputs: PipelineInputs, tmp_path: Path) -> None:
    """An unsupported architecture is only detected by the flow's model task: exactly one line, status 2."""
    model = tmp_path / "gpt2-model"
    shutil.copytree(rel_inputs.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    home = tmp_path / "home"

    done = _quantpipe(["quantize", "-m", str(model), "-r", str(rel_inputs.recipe)], home, rel_inputs, tmp_path)

    lines = [line for line in done.stderr.splitlines() if line.strip()]
    log = home / "logs" / "quantpipe.log"
    text = log.read_text() if log.is_file() else ""
    clean = done.returncode == 2 and len(lines) == 1 and not _problems(done)
    record("bad-input", "flow-detected-one-line", tried=1, rejected_cleanly=int(clean), message=done.stderr[-300:])
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert re.match(r"error: model .* architecture .*supported", lines[0]), lines[0]
    assert _problems(done) == [], done.stderr
    assert done.stdout.strip() == ""
    # The details went to the log file: Prefect's run records and the traceback of the error.
    assert "Encountered exception during execution" in text, text[-2000:]
    assert "Traceback (most recent call last)" in text and "ConfigError" in text, text[-2000:]


@contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_in_the_flow_is_one_line(rel_inputs: PipelineInputs, tmp_path: Path) -> None:
    """A store that fills up while per-layer tasks run: the failing task, the flow and the siblings the task runner
    cancels on shutdown (``CancelledError``) are all logged by Prefect at ERROR; the user sees one line."""
    home = tmp_path / "home"
    with _small_tmpfs(tmp_path / "small", "560k") as small:
        store = (small / "store").as_uri()
        args = ["quantize", "-m", str(rel_inputs.model_dir), "-r", str(rel_inputs.recipe), "--json", "--store", store]
        done = _quantpipe(args, home, rel_inputs, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    record("store-faults", "cli-disk-full-one-line", tried=1, clean=int(len(errors) == 1 and not _problems(done)))
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "no space left on device" in errors[0], done.stderr
    assert _problems(done) == [], done.stderr
    log = (home / "logs" / "quantpipe.log").read_text()
    assert "Traceback (most recent call last)" in log and "no space left on device" in log
