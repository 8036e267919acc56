"""Shared machinery of the reliability suite: the fork server, store snapshots, figures for the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIGURES_ENV = "QUANTPIPE_RELIABILITY_FIGURES"
FULL_ENV = "QUANTPIPE_RELIABILITY_FULL"
STAGE_ORDER = ["model", "calibration", "hessians", "quantize", "pack", "eval-fp", "evaluate"]

TINY_RECIPE_YAML = """\
name: tiny-gptq
calibration: {n_samples: 8, seq_len: 64}
quantize: {method: gptq, bits: 4, group_size: 32}
eval: {seq_len: 128, n_windows: 3}
registry: {max_ppl_increase: 0.5}
"""

_lock = threading.Lock()


def record(category: str, test: str, **figures: Any) -> None:
    """Append one figure record for ``benchmarks/reliability_report.py`` (no-op unless it asked for them)."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    line = json.dumps({"category": category, "test": test, **figures}, default=str)
    with _lock, open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def full_mode() -> bool:
    return os.environ.get(FULL_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------------------ store snapshots
FileSig = tuple[tuple[str, str, int], ...]


def store_files(store_root: Path) -> dict[str, FileSig]:
    """ref -> ((name, sha256, size), ...) of every committed artifact of a local store, read from manifests."""
    from infra.store import LocalStore

    store = LocalStore(store_root)
    out = {}
    for ref in store.list():
        m = store.manifest(ref)
        out[str(ref)] = tuple(sorted((f.name, f.sha256, f.size) for f in m.files))
    return out


def manifest_bytes(store_root: Path) -> dict[str, bytes]:
    """ref -> raw manifest.json bytes (identical bytes = the artifact was not recomputed)."""
    out = {}
    base = store_root / "artifacts"
    if not base.is_dir():
        return out
    for m in sorted(base.glob("*/*/manifest.json")):
        out[f"{m.parent.parent.name}/{m.parent.name}"] = m.read_bytes()
    return out


def verify_all(store_root: Path) -> list[str]:
    """Problems of every committed artifact, each read by a fresh store object (no in-process memo)."""
    from infra.store import LocalStore

    store = LocalStore(store_root)
    problems = []
    for ref in store.list():
        report = LocalStore(store_root).verify(ref)
        if not report.ok:
            problems.extend(report.problems)
    return problems


def compare_stores(reference: dict[str, FileSig], actual: dict[str, FileSig]) -> list[str]:
    """Differences between two store snapshots: missing/extra keys and per-file sha256 mismatches."""
    diffs = [f"missing {r}" for r in sorted(set(reference) - set(actual))]
    diffs += [f"extra {r}" for r in sorted(set(actual) - set(reference))]
    diffs += [f"files differ: {r}" for r in sorted(set(reference) & set(actual)) if reference[r] != actual[r]]
    return diffs


def progress_point(store_root: Path) -> str:
    """Which stage a killed run was in: the first stage of the flow without a committed artifact."""
    have = {ref.split("/")[0] for ref in manifest_bytes(store_root)}
    for stage in STAGE_ORDER:
        if stage not in have:
            if stage == "model":
                return "startup"
            if stage == "quantize" and "qlayer" in have:
                return "quantize"
            return stage
    return "register"


# ------------------------------------------------------------------------------------------ fork server
@dataclass
class Job:
    argv: list[str]
    env: dict[str, str | None]
    log: Path
    kill_after: float | None = None
    kill_anchor: str | None = None  # glob: the kill clock starts when a file matching it first appears

    def as_json(self) -> dict[str, Any]:
        return {
            "argv": self.argv,
            "env": self.env,
            "log": str(self.log),
            "kill_after": self.kill_after,
            "kill_anchor": self.kill_anchor,
        }


@dataclass
class JobResult:
    rc: int
    killed: bool
    seconds: float
    log: Path

    def outcome(self) -> dict[str, Any] | None:
        """The ``--json`` outcome the CLI printed (None when it was killed or failed)."""
        for line in reversed(self.log.read_text(errors="replace").splitlines()):
            if line.startswith("{") and '"stages"' in line:
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        return None

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class ForkServer:
    """Client of ``tests/reliability/pipeline_child.py``; always stopped by :meth:`close`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.pipeline_child"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"fork server did not start: {ready}")
        self.parent_threads = int(ready["threads"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited (rc {self.proc.poll()})")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def run(self, jobs: list[Job]) -> list[JobResult]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "run", "jobs": [j.as_json() for j in jobs]}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return [
            JobResult(r["rc"], r["killed"], r["seconds"], j.log) for r, j in zip(reply["results"], jobs, strict=True)
        ]

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextmanager
def fork_server(prefect_api_url: str, prefect_home: Path) -> Iterator[ForkServer]:
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_API_URL": prefect_api_url,
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.pop("QUANTPIPE_STORE_URL", None)
    server = ForkServer(env)
    try:
        yield server
    finally:
        server.close()


@dataclass
class PipelineInputs:
    """Everything a child run needs besides its home: the tiny model, the corpus and the recipe file."""

    model_dir: Path
    wikitext_dir: Path
    recipe: Path

    def job(
        self,
        home: Path,
        log: Path,
        *,
        kill_after: float | None = None,
        kill_anchor: str | None = None,
        extra_env: dict | None = None,
        extra_argv: list[str] | None = None,
    ) -> Job:
        env: dict[str, str | None] = {
            "QUANTPIPE_HOME": str(home),
            "QUANTPIPE_WIKITEXT_DIR": str(self.wikitext_dir),
            "QUANTPIPE_STORE_URL": None,
            **(extra_env or {}),
        }
        argv = ["quantize", "--model", str(self.model_dir), "--recipe", str(self.recipe), "--json"]
        argv += extra_argv or []
        return Job(argv=argv, env=env, log=log, kill_after=kill_after, kill_anchor=kill_anchor)


def rerun_without_pack(forks: ForkServer, inputs: PipelineInputs, reference: dict[str, FileSig], home: Path) -> None:
    """Delete the pack and rerun the pipeline in ``home``: it must succeed, leave a store that verifies, and end
    with exactly the reference run's bytes (damaged or forged parts recomputed, never adopted)."""
    from infra.store import LocalStore

    root = home / "store"
    LocalStore(root).delete(next(r for r in reference if r.startswith("pack/")))
    (rerun,) = forks.run([inputs.job(home, home.parent / "rerun.log")])
    assert rerun.rc == 0, rerun.tail()
    assert verify_all(root) == []
    assert compare_stores(reference, store_files(root)) == []
