"""Kill and resume: SIGKILL a real ``quantpipe quantize`` process at random moments, rerun it, compare bytes.

Each trial runs the pipeline from an empty store and SIGKILLs its process group after a seeded random delay: a
target stage is picked per trial and the delay drawn uniformly inside that stage's time window of the reference
run (timings vary, so the report counts where kills actually landed). Then the pipeline reruns to completion.
Checks per trial:

* every artifact committed before the kill verifies (nothing torn) and is reused by the rerun unchanged
  (identical manifest bytes: not recomputed, not lost);
* the final store has exactly the reference run's keys, each with identical file sha256s;
* the MLflow registry holds exactly one complete version of the build.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.settings import Settings
from tests.reliability.conftest import Reference, seed_home
from tests.reliability.harness import (
    ForkServer,
    PipelineInputs,
    compare_stores,
    full_mode,
    manifest_bytes,
    progress_point,
    record,
    store_files,
    verify_all,
)

pytestmark = pytest.mark.slow

FAST_TRIALS = 4
FULL_TRIALS = 20


def _registry_versions(home: Path, name: str) -> list[Any]:
    from registry.models import list_versions

    return list_versions(name, settings=Settings(home=home))


FAST_STAGES = ["hessians", "quantize", "pack", "register"]
# target stage -> the stage whose committed artifact starts the kill clock
ANCHORS = {
    "calibration": "model",
    "hessians": "calibration",
    "quantize": "hessians",
    "pack": "quantize",
    "evaluate": "pack",
    "register": "evaluate",
}
ALL_STAGES = ["startup", "calibration", "hessians", "quantize", "pack", "evaluate", "register"]


def run_trials(
    forks: ForkServer,
    inputs: PipelineInputs,
    reference: Reference,
    tmp: Path,
    n: int,
    seed: int,
    stages: list[str],
    template: Path,
) -> dict[str, Any]:
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    points: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    failures: list[str] = []
    started = time.perf_counter()
    for i in range(n):
        home = seed_home(tmp / f"trial-{seed}-{i}", template)
        target = stages[i % len(stages)]
        lo, hi = reference.timeline[target]
        # The kill clock starts when the stage before the target commits (its manifest appears), so the kill
        # lands inside the target stage however slow startup is on a loaded machine; the offset is a random
        # fraction of the target's duration in the reference run.
        delay = (hi - lo) * rng.random()
        anchor = ANCHORS.get(target)
        if anchor is None:
            delay += lo
        targets[target] += 1
        (killed,) = forks.run(
            [
                inputs.job(
                    home,
                    tmp / f"trial-{seed}-{i}-killed.log",
                    kill_after=delay,
                    kill_anchor=str(home / "store" / "artifacts" / anchor / "*" / "manifest.json") if anchor else None,
                )
            ]
        )
        stats["trials"] += 1
        if not killed.killed:
            assert killed.rc == 0, killed.tail()
            stats["finished_before_kill"] += 1
        point = progress_point(home / "store") if killed.killed else "finished"
        points[point] += 1
        torn = verify_all(home / "store")
        stats["torn"] += len(torn)
        before = manifest_bytes(home / "store")
        stats["artifacts_before_resume"] += len(before)

        (resumed,) = forks.run([inputs.job(home, tmp / f"trial-{seed}-{i}-resume.log")])
        if resumed.rc != 0:
            failures.append(f"trial {i} (kill at {delay:.2f}s, {point}): resume failed\n{resumed.tail()}")
            continue
        after = manifest_bytes(home / "store")
        lost = [r for r in before if r not in after]
        recomputed = [r for r in before if r in after and after[r] != before[r]]
        stats["lost"] += len(lost)
        stats["recomputed_after_commit"] += len(recomputed)
        if before and not lost and not recomputed:
            stats["resumes_reused_work"] += 1
        outcome = resumed.outcome() or {}
        stats["stage_cache_hits"] += sum(1 for s in outcome.get("stages", {}).values() if s["cache_hit"])
        diffs = compare_stores(reference.files, store_files(home / "store"))
        stats["mismatches"] += len(diffs)
        versions = _registry_versions(home, reference.outcome["model_name"])
        complete = [v for v in versions if v.tags.get("status", "complete") == "complete"]
        if len(versions) != 1 or len(complete) != 1:
            stats["registry_problems"] += 1
        if diffs or lost or recomputed or torn or len(versions) != 1:
            failures.append(
                f"trial {i} (kill at {delay:.2f}s in {point}): diffs={diffs[:3]} lost={lost[:3]} "
                f"recomputed={recomputed[:3]} torn={torn[:3]} versions={[v.version for v in versions]}"
            )
        else:
            stats["survived"] += 1
    return {
        **{k: stats[k] for k in ("trials", "survived", "resumes_reused_work", "finished_before_kill")},
        **{k: stats[k] for k in ("mismatches", "lost", "torn", "recomputed_after_commit", "registry_problems")},
        "artifacts_committed_before_kill": stats["artifacts_before_resume"],
        "stage_cache_hits_on_resume": stats["stage_cache_hits"],
        "kill_targets": dict(targets),
        "kill_points": dict(points),
        "reference_s": round(reference.seconds, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
    }


def _check(result: dict[str, Any]) -> None:
    assert not result["failures"], "\n".join(result["failures"])
    assert result["mismatches"] == 0 and result["lost"] == 0 and result["torn"] == 0
    assert result["survived"] == result["trials"]


@pytest.mark.reliability_full
def test_reference_run_is_reproducible(forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, tmp_path):
    """A second clean run gives byte-identical artifacts (the kill trials and concurrency tests also show it)."""
    (again,) = forks.run([rel_inputs.job(tmp_path / "home", tmp_path / "again.log")])
    assert again.rc == 0, again.tail()
    assert compare_stores(reference.files, store_files(tmp_path / "home" / "store")) == []


def test_kill_and_resume_fast(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, mlflow_template: Path, tmp_path: Path
) -> None:
    result = run_trials(forks, rel_inputs, reference, tmp_path, FAST_TRIALS, 1234, FAST_STAGES, mlflow_template)
    record("kill", "fast", **{k: v for k, v in result.items() if k != "failures"})
    _check(result)
    assert result["resumes_reused_work"] >= 1


@pytest.mark.reliability_full
def test_kill_and_resume_full(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, mlflow_template: Path, tmp_path: Path
) -> None:
    result = run_trials(forks, rel_inputs, reference, tmp_path, FULL_TRIALS, 20260, ALL_STAGES, mlflow_template)
    record("kill", "full", **{k: v for k, v in result.items() if k != "failures"})
    _check(result)
    assert result["resumes_reused_work"] >= FULL_TRIALS // 2


def _mlflow_init_kills(forks: ForkServer, tmp: Path, fractions: list[float]) -> dict[str, Any]:
    """Kill ``quantpipe registry list`` while it creates a new home's MLflow DB; the next call must work."""
    from tests.reliability.harness import Job

    def job(home: Path, log: str, kill_after: float | None = None) -> Job:
        return Job(["registry", "list"], {"QUANTPIPE_HOME": str(home)}, tmp / log, kill_after)

    (clean,) = forks.run([job(tmp / "clean", "clean.log")])
    assert clean.rc == 0, clean.tail()
    survived = killed = 0
    problems = []
    for i, fraction in enumerate(fractions):
        home = tmp / f"init-{i}"
        (k,) = forks.run([job(home, f"init-{i}-killed.log", clean.seconds * fraction)])
        killed += int(k.killed)
        (again,) = forks.run([job(home, f"init-{i}-again.log")])
        if again.rc == 0:
            survived += 1
        else:
            problems.append(again.tail(3))
    return {"trials": len(fractions), "killed": killed, "survived": survived, "problems": problems}


def test_kill_during_mlflow_db_creation(forks: ForkServer, tmp_path: Path) -> None:
    """A kill while a fresh home's MLflow DB is being migrated must not leave a half-migrated DB behind."""
    result = _mlflow_init_kills(forks, tmp_path, [0.3, 0.6] if not full_mode() else [0.1, 0.25, 0.4, 0.55, 0.7, 0.85])
    record("kill", "mlflow-db-init", **{k: v for k, v in result.items() if k != "problems"})
    assert result["survived"] == result["trials"], result["problems"]
