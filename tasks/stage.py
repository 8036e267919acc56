"""The one way a stage runs: key → cache check (verified) → produce into a writer → commit → MLflow.

A stage function never decides on its own whether to recompute: :func:`run_stage` does, and only an artifact
whose manifest exists *and* whose files verify counts as a cache hit. A corrupt artifact is reported by key,
moved aside and recomputed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from infra.keys import ArtifactRef, artifact_key
from infra.settings import Settings
from infra.store import ArtifactStore, ArtifactWriter, open_store

__all__ = ["StageContext", "StageResult", "run_logger", "run_stage"]

log = logging.getLogger("quantpipe.stage")


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """Prefect's run logger inside a flow or task run, so the line lands on the run page; else this module's.

    Records of both are redacted as they are made (:func:`infra.redact.install_log_redaction` watches the
    ``prefect`` and ``quantpipe`` namespaces)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            from prefect import get_run_logger

            return get_run_logger()
    except Exception:  # no Prefect, or a context without a run: the module logger still records the line
        pass
    return log


class StageResult(BaseModel):
    """What crosses task boundaries: a reference, never tensors."""

    stage: str
    ref: str
    cache_hit: bool
    seconds: float
    metadata: dict[str, Any] = {}


@dataclass
class StageContext:
    """Per-flow-run context shared by the stages (settings, store, MLflow parent run)."""

    settings: Settings
    store_url: str
    parent_run_id: str | None = None
    flow_run_id: str | None = None
    progress: bool = True
    _store: ArtifactStore | None = field(default=None, repr=False)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = open_store(self.store_url, self.settings)
        return self._store

    @contextmanager
    def tracked(self, stage: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> Iterator[Any]:
        if self.parent_run_id is None:
            with nullcontext(None) as none:
                yield none
            return
        from registry.tracking import stage_run

        with stage_run(
            stage, parent_run_id=self.parent_run_id, params=params, tags=tags, settings=self.settings
        ) as run:
            yield run


Producer = Callable[[ArtifactWriter, Any], None]


def stage_key(stage: str, version: int, config: Mapping[str, Any], inputs: Mapping[str, str]) -> ArtifactRef:
    return ArtifactRef.of(stage, artifact_key(stage, version, config, inputs))


def ensure_artifact(
    ctx: StageContext,
    stage: str,
    version: int,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    produce: Producer,
    *,
    run: Any = None,
) -> tuple[ArtifactRef, bool]:
    """Return (ref, cache_hit): reuse a verified artifact or produce and commit a new one.

    A cached artifact is reused only when its manifest, its files, the parts it lists and the content of every
    input and part it recorded still check out. A part whose content no longer matches what the index recorded
    (rewritten together with its manifest) is discarded with the index, so recomputing never adopts it; an input
    that changed makes this artifact stale, so it is recomputed from the input as it is now."""
    ref = stage_key(stage, version, config, inputs)
    store = ctx.store
    if store.exists(ref):
        problems, changed = _reuse_problems(store, ref)
        if not problems:
            return ref, True
        log.warning("artifact %s cannot be reused (%s); recomputing", ref, problems[0])
        for link in changed:
            if link not in inputs.values():
                _discard(store, link)
        _discard(store, ref)
    with store.writer(
        stage, ref.key, stage_version=version, config=config, inputs=inputs, producer_run_id=ctx.flow_run_id
    ) as writer:
        produce(writer, run)
        for part in _writer_parts(writer):
            writer.link(part)
    return ref, False


def _discard(store: ArtifactStore, ref: str) -> None:
    from infra.errors import ArtifactNotFoundError

    try:
        store.delete(ref)
    except ArtifactNotFoundError:
        pass


_REF_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}/[0-9a-f]{64}$")


def _part_refs(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if _REF_RE.match(value):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _part_refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _part_refs(v)


def _writer_parts(writer: ArtifactWriter) -> list[str]:
    """Refs an index artifact being written lists in ``index.json``: the index commits to their content."""
    index = writer.dir / "index.json"
    if not index.is_file():
        return []
    return sorted(set(_part_refs(json.loads(index.read_text()))))


def _reuse_problems(store: ArtifactStore, ref: ArtifactRef) -> tuple[list[str], list[str]]:
    """(problems, changed links) that forbid reusing ``ref``: its own verification, then that of the parts an
    index lists in ``index.json`` (per-block Hessians, per-layer weights), so an index whose parts are damaged is
    no cache hit and the stage recomputes (and repairs) them instead of a later stage failing on a corrupt part."""
    report = store.verify(ref)
    if not report.ok:
        return report.problems, report.changed_links
    manifest = store.manifest(ref)
    if "index.json" not in manifest.file_names():
        return [], []
    try:
        index = json.loads(store.read_bytes(ref, "index.json"))
    except ValueError:
        return [f"artifact {ref}: index.json is unreadable"], []
    problems: list[str] = []
    parts = sorted(set(_part_refs(index)))
    unlinked = [p for p in parts if manifest.links and p not in manifest.links]
    if unlinked:
        return [f"artifact {ref}: index.json lists {unlinked[0]}, which its manifest does not commit to"], unlinked
    for part in parts:
        problems.extend(store.verify(part).problems)
    return problems, []


def run_stage(
    ctx: StageContext,
    stage: str,
    version: int,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    produce: Producer,
    *,
    after: Callable[[ArtifactRef, Any, bool], dict[str, Any]] | None = None,
) -> StageResult:
    """One tracked stage execution. ``after(ref, run, cache_hit)`` may log metrics and returns metadata."""
    started = time.perf_counter()
    ref = stage_key(stage, version, config, inputs)
    logger = run_logger()
    logger.info("%s: started, key %s", stage, ref.short)
    with ctx.tracked(
        stage, params=dict(config), tags={"artifact": str(ref), **{f"input.{k}": v for k, v in inputs.items()}}
    ) as run:
        ref, hit = ensure_artifact(ctx, stage, version, config, inputs, produce, run=run)
        seconds = time.perf_counter() - started
        metadata = after(ref, run, hit) if after is not None else {}
        if run is not None:
            if hit:
                run.record_cache_hit(str(ref), seconds)
            else:
                run.log_metrics({"seconds": seconds})
            run.set_output(str(ref))
    logger.info("%s: %s, key %s, %.1f s", stage, "cache hit" if hit else "cache miss, computed", ref.short, seconds)
    return StageResult(stage=stage, ref=str(ref), cache_hit=hit, seconds=round(seconds, 3), metadata=metadata)
