"""What a quantize run tells its operator: log lines, the parent MLflow run's numbers and the run's summary artifact.

Why here: the Prefect run page used to show only Prefect's own boilerplate, and the MLflow parent run had params
but no metrics. The flow calls these at three points — after evaluation (:func:`record_evaluation`: headline line,
parent-run metrics and plots), after registration (:func:`record_registration`) and at the end
(:func:`post_summary`: one markdown artifact with the stage table, metrics, registry version and links).

Everything that leaves the process goes through :mod:`infra.redact` (log records are redacted as they are made,
markdown and tags explicitly), and a lost Prefect API never fails a run whose builds are done.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from infra.redact import redact

__all__ = [
    "SUMMARY_KEY",
    "RunSummary",
    "headline",
    "post_markdown",
    "record_evaluation",
    "record_registration",
    "stage_run_ids",
]

log = logging.getLogger(__name__)

SUMMARY_KEY = "quantpipe-summary"
TAG_PREFECT_URL = "prefect_flow_run_url"
HEADLINE_METRICS = ("ppl", "ppl_fp", "ppl_ratio", "ppl_delta_rel", "bits_per_weight_stored", "bits_per_weight_codes")


def headline(metrics: Mapping[str, float]) -> str:
    """``ppl 27.47 vs fp 24.14 (x1.138, +13.8 %), 4.250 stored bits/weight`` (parts that are known)."""
    ppl, fp, bits = metrics.get("ppl"), metrics.get("ppl_fp"), metrics.get("bits_per_weight_stored")
    parts = []
    if ppl is not None:
        text = f"ppl {ppl:.4g}"
        if fp:
            text += f" vs fp {fp:.4g} (x{ppl / fp:.3f}, {100 * (ppl / fp - 1):+.1f} %)"
        parts.append(text)
    if bits is not None:
        parts.append(f"{bits:.3f} stored bits/weight")
    return ", ".join(parts) or "no metrics"


def parent_metrics(stages: Mapping[str, Any], metrics: Mapping[str, float]) -> dict[str, float]:
    """The parent run's metrics: the headline numbers, ``ppl_ratio``, and ``seconds.<stage>`` per stage."""
    out = {k: float(v) for k, v in metrics.items() if k in HEADLINE_METRICS}
    if metrics.get("ppl") is not None and metrics.get("ppl_fp"):
        out["ppl_ratio"] = float(metrics["ppl"]) / float(metrics["ppl_fp"])
    for name, stage in stages.items():
        out[f"seconds.{name}"] = float(stage.seconds)
    return out


def record_evaluation(ctx: Any, stages: Mapping[str, Any], metrics: Mapping[str, float], logger: Any) -> None:
    """Log the headline line; put metrics, plots and the Prefect link on the flow's parent MLflow run."""
    logger.info("result: %s", headline(metrics))
    if ctx.parent_run_id is None:
        return
    from registry.tracking import TAG_NOTE, log_run_artifact, log_run_metrics, set_run_tags
    from tasks.register import prefect_flow_run_url

    log_run_metrics(ctx.parent_run_id, parent_metrics(stages, metrics), ctx.settings)
    evaluate = stages.get("evaluate")
    if evaluate is not None:
        art = ctx.store.get(evaluate.ref)
        for f in art.manifest.files:
            if f.name.endswith(".png"):
                log_run_artifact(ctx.parent_run_id, Path(art.root) / f.path, "figures", ctx.settings)
    url = prefect_flow_run_url(ctx.flow_run_id)
    tags: dict[str, str] = {"quantpipe.headline": headline(metrics)}
    if url:
        tags[TAG_PREFECT_URL] = url
    note = f"**{headline(metrics)}**\n\nPrefect flow run: " + (
        f"[{ctx.flow_run_id}]({url})" if url else f"`{ctx.flow_run_id or '-'}`"
    )
    tags[TAG_NOTE] = redact(note)
    set_run_tags(ctx.parent_run_id, tags, ctx.settings)


def record_registration(ctx: Any, reg: Any, logger: Any) -> None:
    """Log the registered version with its MLflow link; link the parent run to it (tags and description)."""
    from registry.tracking import TAG_NOTE, get_client, model_version_url, run_url, set_run_tags

    name, version = reg.metadata["name"], reg.metadata["version"]
    aliases = ", ".join(reg.metadata.get("aliases") or []) or "none"
    url = model_version_url(name, version, ctx.settings)
    where = url or f"MLflow {redact(ctx.settings.effective_mlflow_uri)}"
    logger.info("registered %s version %s (aliases: %s): %s", name, version, aliases, where)
    if ctx.parent_run_id is None:
        return
    run_link = run_url(ctx.parent_run_id, ctx.settings)
    if run_link:
        logger.info("MLflow run: %s", run_link)
    note = get_client(ctx.settings).get_run(ctx.parent_run_id).data.tags.get(TAG_NOTE, "")
    note += "\n\nRegistered model version: " + (f"[{name}/{version}]({url})" if url else f"`{name}/{version}`")
    set_run_tags(
        ctx.parent_run_id, {"model_name": name, "model_version": version, TAG_NOTE: redact(note)}, ctx.settings
    )


def stage_run_ids(parent_run_id: str, settings: Any) -> dict[str, str]:
    """stage name -> its MLflow child run id (one search; the newest run of a stage wins)."""
    from registry.tracking import TAG_PARENT, TAG_STAGE, experiment_id, get_client

    runs = get_client(settings).search_runs(
        [experiment_id(settings)],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return {r.data.tags.get(TAG_STAGE, r.info.run_name): r.info.run_id for r in runs}


class StageRow(BaseModel):
    stage: str
    key: str
    cache_hit: bool
    seconds: float
    run_id: str | None = None


class RunSummary(BaseModel):
    """The markdown artifact of one quantize run (key :data:`SUMMARY_KEY`)."""

    title: str
    model: str
    recipe: str
    stages: list[StageRow]
    metrics: dict[str, float] = Field(default_factory=dict)
    model_name: str | None = None
    model_version: str | None = None
    aliases: list[str] = Field(default_factory=list)
    parent_run_id: str | None = None
    parent_run_url: str | None = None
    stage_run_urls: dict[str, str] = Field(default_factory=dict)
    model_version_url: str | None = None
    tracking: str = ""

    def markdown(self, level: int = 1) -> str:
        """The summary; ``level`` 2 nests it under a heading of its own (one nightly pair)."""
        h = "#" * level
        total = sum(s.seconds for s in self.stages)
        hits = sum(s.cache_hit for s in self.stages)
        lines = [
            f"{h} {self.title}",
            "",
            f"Model `{self.model}`, recipe `{self.recipe}`: **{headline(self.metrics)}**.",
            "",
            f"{len(self.stages)} stages, {hits} from cache, {total:.1f} s in stages.",
            "",
            "| stage | key | cache | seconds | MLflow run |",
            "|---|---|---|---:|---|",
        ]
        for s in self.stages:
            key = s.key if "/" not in s.key or len(s.key) < 40 else s.key.split("/")[0] + "/" + s.key.split("/")[1][:12]
            url = self.stage_run_urls.get(s.stage)
            run = f"[{s.run_id[:8]}]({url})" if url and s.run_id else (f"`{s.run_id[:8]}`" if s.run_id else "-")
            lines.append(f"| {s.stage} | `{key}` | {'hit' if s.cache_hit else 'miss'} | {s.seconds:.1f} | {run} |")
        lines += ["", f"{h}# Metrics", "", "| metric | value |", "|---|---|"]
        for k, v in self.metrics.items():
            if k in HEADLINE_METRICS or k == "ppl_ratio":
                lines.append(f"| {k} | {v:.4g} |")
        lines += ["", f"{h}# Registry", ""]
        if self.model_name:
            target = f"{self.model_name}/{self.model_version}"
            link = f"[{target}]({self.model_version_url})" if self.model_version_url else f"`{target}`"
            lines.append(f"- model version {link}, aliases: {', '.join(self.aliases) or 'none'}")
            lines.append(f"- lineage: `quantpipe lineage {target}`")
        else:
            lines.append("- not registered (registry disabled in the recipe)")
        lines += ["", f"{h}# MLflow", ""]
        if self.parent_run_id:
            link = (
                f"[{self.parent_run_id}]({self.parent_run_url})" if self.parent_run_url else f"`{self.parent_run_id}`"
            )
            lines.append(f"- parent run {link}")
        if self.tracking:
            lines.append(f"- tracking: `{self.tracking}`")
        return redact("\n".join(lines) + "\n")


def build_summary(settings: Any, model: str, recipe: str, outcome: Mapping[str, Any]) -> RunSummary:
    """The summary of a finished run (``outcome``: :class:`flows.quantize.QuantizeOutcome` as a dict)."""
    from registry.tracking import model_version_url, run_url

    parent = outcome.get("mlflow_run_id")
    run_ids: dict[str, str] = {}
    if parent:
        try:
            run_ids = stage_run_ids(parent, settings)
        except Exception as exc:  # the links are a convenience; the table stands without them
            log.debug("stage runs of %s not found: %s", parent, exc)
    urls = {stage: u for stage, rid in run_ids.items() if (u := run_url(rid, settings))}
    rows = [
        StageRow(stage=n, key=s["key"], cache_hit=s["cache_hit"], seconds=s["seconds"], run_id=run_ids.get(n))
        for n, s in (outcome.get("stages") or {}).items()
    ]
    name, version = outcome.get("model_name"), outcome.get("model_version")
    metrics = dict(outcome.get("metrics") or {})
    return RunSummary(
        title=f"quantize {name or model}",
        model=model,
        recipe=recipe,
        stages=rows,
        metrics=metrics | parent_metrics({}, metrics),
        model_name=name,
        model_version=version,
        aliases=list(outcome.get("aliases") or []),
        parent_run_id=parent,
        parent_run_url=run_url(parent, settings) if parent else None,
        stage_run_urls=urls,
        model_version_url=model_version_url(name, str(version), settings) if name else None,
        tracking=redact(settings.effective_mlflow_uri),
    )


def post_markdown(markdown: str, key: str, description: str, logger: Any) -> bool:
    """Post a markdown artifact on the current run; ``False`` (and a warning) when the Prefect API is lost."""
    from prefect.artifacts import create_markdown_artifact

    from flows.prefect_backend import is_api_loss

    try:
        create_markdown_artifact(markdown=redact(markdown), key=key, description=description)
    except Exception as exc:  # the build is done and registered: a lost Prefect API must not fail it
        if not is_api_loss(exc):
            raise
        logger.warning("summary artifact not posted, the Prefect API is unreachable: %s", type(exc).__name__)
        return False
    return True
