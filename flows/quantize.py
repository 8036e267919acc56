"""The ``quantize-model`` flow: calibration → hessians → quantize → pack → evaluate → register.

Each stage is a Prefect task whose result is a small :class:`StageResult` (a ref, never tensors); per-layer
quantization fans out through the flow's task runner. Every stage is an MLflow run nested under one parent run,
and every output is a content-addressed artifact, so a rerun recomputes only what its changed settings touch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, BeforeValidator, Field

from flows.prefect_backend import record_flow_result
from infra.errors import ConfigError, QuantpipeError
from infra.settings import Settings, get_settings
from tasks.recipe import Recipe, RecipeName, resolve_recipe
from tasks.stage import StageContext, StageResult

__all__ = ["QuantizeOutcome", "quantize_model", "run_quantize_pipeline"]


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed task/flow with a traceback; a :class:`QuantpipeError` is a one-line message
    naming what to fix (wrong input, unreachable store), so its log record keeps the line and drops the trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, QuantpipeError):
            record.exc_info = None
            record.exc_text = None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _NoTracebackForUserErrors) for f in _logger.filters):
        _logger.addFilter(_NoTracebackForUserErrors())


class QuantizeOutcome(BaseModel):
    flow_run_id: str | None
    mlflow_run_id: str | None
    model_name: str | None
    model_version: str | None
    stages: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    aliases: list[str] = []


def _progress(ctx: StageContext) -> Any:
    from flows.progress import StageProgress

    return StageProgress(enabled=ctx.progress)


@task(name="model", task_run_name="model {source}", cache_policy=NO_CACHE)
def model_task(ctx: StageContext, source: str, recipe: Recipe | None = None) -> tuple[Any, StageResult]:
    from tasks.calibration import run_model
    from tasks.models import resolve_model

    model = resolve_model(source, ctx.settings, progress=ctx.progress)
    if recipe is not None:
        preflight(ctx, model, recipe)
    return model, run_model(ctx, model)


def preflight(ctx: StageContext, model: Any, recipe: Recipe) -> None:
    """Every cheap check of user input, before the first artifact is committed: a bad recipe, data source or
    model name fails with one line and leaves the store exactly as it was."""
    from tasks.calibration import check_text_source

    validate_recipe_for_model(recipe, model.path)
    if recipe.registry.enabled:
        from registry.models import registry_name
        from tasks.register import recipe_identity

        registry_name(model.name, recipe_identity(recipe)[0])
    cal = recipe.calibration
    check_text_source(cal.dataset, ctx.settings, text_field=cal.text_field)
    check_text_source(recipe.eval.dataset, ctx.settings, split="test")


@task(
    name="calibration",
    task_run_name="calibration {recipe.calibration.n_samples}x{recipe.calibration.seq_len} tokens",
    cache_policy=NO_CACHE,
)
def calibration_task(ctx: StageContext, model: Any, model_ref: str, recipe: Recipe) -> StageResult:
    from tasks.calibration import run_calibration

    return run_calibration(ctx, model, model_ref, recipe.calibration)


@task(name="hessians", cache_policy=NO_CACHE)
def hessians_task(ctx: StageContext, model: Any, model_ref: str, cal_ref: str, recipe: Recipe) -> StageResult:
    from tasks.hessians import run_hessians

    with _progress(ctx).track("hessians: blocks", _n_blocks(model.path)) as advance:
        return run_hessians(ctx, model.path, model_ref, cal_ref, recipe.hessians, progress=advance)


@task(
    name="quantize-layer", task_run_name="quantize {job.name}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1
)
def quantize_layer_task(ctx: StageContext, model_path: Path, model_ref: str, job: Any, recipe: Recipe) -> str:
    from tasks.quantize import quantize_layer

    return quantize_layer(ctx, model_path, model_ref, job, recipe.quantize)


@task(name="pack", task_run_name="pack {recipe.name}", cache_policy=NO_CACHE)
def pack_task(ctx: StageContext, model: Any, model_ref: str, quant_ref: str, recipe: Recipe) -> StageResult:
    from tasks.pack import run_pack

    return run_pack(
        ctx, model.path, model_ref, quant_ref, recipe.quantize, recipe.pack, runtime=recipe.runtime_config()
    )


@task(name="eval-fp", task_run_name="evaluate full precision", cache_policy=NO_CACHE)
def eval_fp_task(ctx: StageContext, model: Any, model_ref: str, recipe: Recipe) -> StageResult:
    from tasks.evaluate import run_eval_fp

    with _progress(ctx).track("eval fp: windows", recipe.eval.n_windows or 0) as advance:
        return run_eval_fp(ctx, model.path, model_ref, recipe.eval, progress=advance)


@task(name="evaluate", task_run_name="evaluate {recipe.name}", cache_policy=NO_CACHE)
def evaluate_task(
    ctx: StageContext, model: Any, pack_ref: str, quant_ref: str, fp_ref: str, recipe: Recipe
) -> StageResult:
    from tasks.evaluate import run_evaluate

    with _progress(ctx).track("evaluate: windows", recipe.eval.n_windows or 0) as advance:
        return run_evaluate(
            ctx, model.path, pack_ref, quant_ref, fp_ref, recipe.eval, title=recipe.name, progress=advance
        )


@task(name="register", task_run_name="register {model.name}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_task(
    ctx: StageContext, model: Any, recipe: Recipe, refs: dict[str, str], metrics: dict[str, float]
) -> StageResult:
    from tasks.register import run_register

    return run_register(ctx, model_name=model.name, revision=model.revision, recipe=recipe, refs=refs, metrics=metrics)


@task(name="hessians-shard", cache_policy=NO_CACHE)
def hessian_shard_task(ctx: StageContext, job: Any) -> list[str]:
    from tasks.hessians import run_hessian_shard

    return run_hessian_shard(ctx, job)


@task(name="hessians-reduce", cache_policy=NO_CACHE)
def hessian_reduce_task(ctx: StageContext, job: Any) -> str:
    from tasks.hessians import run_hessian_reduce

    return run_hessian_reduce(ctx, job)


def _hessians_stage(ctx: StageContext, model: Any, model_ref: str, cal_ref: str, recipe: Recipe) -> StageResult:
    """One task for the stage; with ``hessians.shards`` > 1 one task per calibration shard on the flow's runner
    (threads, or Dask workers with --dask), submitted from the flow so the runner is the flow's, then the reduce."""
    n_blocks = _n_blocks(model.path)
    shards = recipe.hessians.shards
    if shards == 1:
        named = hessians_task.with_options(task_run_name=f"hessians {n_blocks} blocks")
        return named(ctx, model, model_ref, cal_ref, recipe)
    from tasks.hessians import run_hessians

    _configure_threads(ctx.settings, shards)

    def map_shards(jobs: list[Any]) -> list[list[str]]:
        futures = [
            hessian_shard_task.with_options(
                task_run_name=f"hessians shard {job.shard + 1}/{job.of} (samples {job.start}-{job.stop - 1})"
            ).submit(ctx, job)
            for job in jobs
        ]
        return [f.result() for f in futures]

    def map_reduce(jobs: list[Any]) -> Iterator[str]:
        futures = [
            hessian_reduce_task.with_options(
                task_run_name=f"hessians reduce block {job.block} ({len(job.partials)} partials)"
            ).submit(ctx, job)
            for job in jobs
        ]
        return (f.result() for f in futures)

    with _progress(ctx).track("hessians: blocks reduced", n_blocks) as advance:
        return run_hessians(
            ctx,
            model.path,
            model_ref,
            cal_ref,
            recipe.hessians,
            progress=advance,
            map_shards=map_shards,
            map_reduce=map_reduce,
        )


def _n_blocks(model_path: Path) -> int:
    import json

    return int(json.loads((Path(model_path) / "config.json").read_text()).get("num_hidden_layers", 0))


def check_positions(config: dict[str, Any], what: str, seq_len: int) -> None:
    """Refuse windows longer than the model's max_position_embeddings (RoPE was not trained for them)."""
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and 0 < max_positions < seq_len:
        raise ConfigError(
            f"{what}={seq_len} is longer than the model's max_position_embeddings ({max_positions}); "
            f"use at most {max_positions}"
        )


def validate_recipe_for_model(recipe: Recipe, model_path: Path) -> None:
    """Fail before any work when the recipe cannot apply to this model (e.g. a group wider than a layer)."""
    import json

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    widths = [cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0)]
    narrowest = min(w for w in widths if w)
    if recipe.quantize.has("group_size") and recipe.quantize.group_size > narrowest:
        raise ConfigError(
            f"recipe {recipe.name}: quantize.group_size={recipe.quantize.group_size} is larger than "
            f"the narrowest layer input ({narrowest} columns)"
        )
    check_positions(cfg, f"recipe {recipe.name}: calibration.seq_len", recipe.calibration.seq_len)
    check_positions(cfg, f"recipe {recipe.name}: eval.seq_len", recipe.eval.seq_len)
    if recipe.hessians.first_token_weight != 1.0:
        from quant.arch.mapping import mapping_for

        if mapping_for(cfg.get("architectures") or []).moe is not None:
            raise ConfigError(
                f"recipe {recipe.name}: hessians.first_token_weight needs token positions, which routed MoE expert "
                "inputs do not have; leave it at 1 for this model"
            )
    from tasks.method_checks import check_method_shapes
    from tasks.quantize import check_transform_sizes

    check_transform_sizes(model_path, recipe.quantize)
    from tasks.quarot import check_recipe_for_model

    check_recipe_for_model(recipe, model_path)
    check_method_shapes(model_path, recipe.quantize)


MAX_LAYER_WORKERS = 64  # QuantizeConfig.workers' upper bound


def _configure_threads(settings: Settings, workers: int) -> None:
    import torch

    cores = settings.num_threads or os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, workers)))


def run_quantize_pipeline(ctx: StageContext, model_source: str, recipe: Recipe) -> QuantizeOutcome:
    """The flow body; also callable without Prefect (``flow.fn``) for unit tests."""
    from prefect.runtime import flow_run

    from flows.summary import SUMMARY_KEY, build_summary, post_markdown, record_evaluation, record_registration
    from registry.tracking import flow_run as mlflow_flow_run
    from tasks.quarot import prepare_model
    from tasks.register import prefect_flow_run_url
    from tasks.stage import run_logger

    logger = run_logger()
    ctx.flow_run_id = flow_run.get_id()
    stages: dict[str, StageResult] = {}
    with mlflow_flow_run(
        f"quantize:{recipe.name}",
        params={"model": model_source, "recipe": recipe.model_dump(mode="json")},
        tags={
            "recipe": recipe.name,
            "recipe_digest": recipe.digest(),
            "prefect_flow_run_id": ctx.flow_run_id or "",
            "prefect_flow_run_url": prefect_flow_run_url(ctx.flow_run_id) or "",
        },
        settings=ctx.settings,
    ) as parent:
        ctx.parent_run_id = parent
        logger.info(
            "quantize %s with recipe %s (digest %s): MLflow parent run %s",
            model_source,
            recipe.name,
            recipe.digest()[:12],
            parent,
        )
        model, stages["model"] = model_task(ctx, model_source, recipe)
        model_ref = stages["model"].ref
        stages["calibration"] = calibration_task(ctx, model, model_ref, recipe)
        cal_ref = stages["calibration"].ref
        # QuaRot: hessians/quantize/pack run on the rotated fp checkpoint (its key is their model input)
        work, work_ref = prepare_model(ctx, model, model_ref, recipe.rotation)
        qcfg = recipe.quantize
        if qcfg.mode == "parallel":
            stages["hessians"] = _hessians_stage(ctx, work, work_ref, cal_ref, recipe)
        stages["quantize"] = _quantize_stage(ctx, work, work_ref, cal_ref, stages.get("hessians"), recipe)
        quant_ref = stages["quantize"].ref
        stages["pack"] = pack_task(ctx, work, work_ref, quant_ref, recipe)
        stages["eval-fp"] = eval_fp_task(ctx, model, model_ref, recipe)
        stages["evaluate"] = evaluate_task(ctx, model, stages["pack"].ref, quant_ref, stages["eval-fp"].ref, recipe)
        metrics = {k: float(v) for k, v in stages["evaluate"].metadata.items()}
        record_evaluation(ctx, stages, metrics, logger)
        refs = {name: s.ref for name, s in stages.items()}
        if work_ref != model_ref:
            refs["rotated-model"] = work_ref
        if recipe.registry.enabled:
            stages["register"] = register_task(ctx, model, recipe, refs, metrics)
            record_registration(ctx, stages["register"], logger)
    reg = stages.get("register")
    outcome = QuantizeOutcome(
        flow_run_id=ctx.flow_run_id,
        mlflow_run_id=ctx.parent_run_id,
        model_name=reg.metadata["name"] if reg else None,
        model_version=reg.metadata["version"] if reg else None,
        aliases=reg.metadata["aliases"] if reg else [],
        stages={n: {"key": s.ref, "cache_hit": s.cache_hit, "seconds": s.seconds} for n, s in stages.items()},
        metrics=metrics,
    )
    if ctx.flow_run_id is not None:  # a Prefect run: its page gets the summary artifact
        summary = build_summary(ctx.settings, model_source, recipe.name, outcome.model_dump())
        post_markdown(summary.markdown(), SUMMARY_KEY, f"quantpipe run summary: {summary.title}", logger)
    return outcome


def _quantize_stage(
    ctx: StageContext, model: Any, model_ref: str, cal_ref: str, hessians: StageResult | None, recipe: Recipe
) -> StageResult:
    from tasks.quantize import LayerJob, run_quantize

    qcfg = recipe.quantize
    # sequential mode with hessians.shards > 1 splits these threads between its shards itself (tasks.quantize)
    _configure_threads(ctx.settings, qcfg.workers if qcfg.mode == "parallel" else 1)
    progress = _progress(ctx)

    def map_layers(jobs: list[LayerJob]) -> list[str]:
        """At most ``quantize.workers`` layer tasks in flight, whatever task runner the flow got (the CLI's, a
        deployment's default or a nightly run's): the recipe's setting is what sizes torch's threads per task."""
        refs: list[str] = [""] * len(jobs)
        pending: deque[tuple[int, Any]] = deque()
        with progress.track("quantize: layers", len(jobs)) as advance:
            done = 0

            def collect() -> None:
                nonlocal done
                i, fut = pending.popleft()
                refs[i] = fut.result()
                advance(done)
                done += 1

            for i, job in enumerate(jobs):
                if len(pending) >= qcfg.workers:
                    collect()
                pending.append((i, quantize_layer_task.submit(ctx, model.path, model_ref, job, recipe)))
            while pending:
                collect()
        return refs

    started = time.perf_counter()
    with progress.track("quantize: blocks", _n_blocks(model.path) if qcfg.mode == "sequential" else 0) as adv:
        result = run_quantize(
            ctx,
            model.path,
            model_ref,
            qcfg,
            hessians_ref=hessians.ref if hessians else None,
            cal_ref=cal_ref,
            block_refs=hessians.metadata["blocks"] if hessians else None,
            map_layers=map_layers,
            progress=adv,
            forward=recipe.hessians,
        )
    del started
    return result


# The runner only bounds threads; how many layer tasks run at once is the recipe's quantize.workers (map_layers).
@flow(
    name="quantize-model",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_LAYER_WORKERS),
    log_prints=True,
    validate_parameters=True,
)
def quantize_model(
    model: Annotated[str, Field(examples=["HuggingFaceTB/SmolLM2-135M", "/data/models/my-llama", "tiny-llama"])],
    recipe: Annotated[RecipeName | Recipe, Field(examples=["gptq-w4g64", "rtn-w4g64"])] = "gptq-w4g64",
    overrides: Annotated[tuple[str, ...], Field(examples=[["quantize.bits=3", "eval.n_windows=4"]])] = (),
    name: Annotated[str, Field(examples=["my-gptq-w3"])] = "",
    store_url: Annotated[
        str, BeforeValidator(lambda v: v or ""), Field(examples=["file:///data/quantpipe/store", "s3://bucket/store"])
    ] = "",
    progress: Annotated[bool, Field(examples=[False])] = False,
) -> dict[str, Any]:
    """Quantize a model with a shipped recipe (plus optional overrides), evaluate it and register the build.

    Args:
        model: What to quantize: a local Hugging Face model directory, a demo model name or a hub id.
        recipe: A shipped recipe by name (recipes/NAME.yaml), or a full recipe whose quantize section shows only
            the chosen method's options.
        overrides: Optional section.field=value changes, as quantpipe quantize --set (e.g. quantize.bits=3).
        name: Registered recipe name; the model registers as MODEL.NAME. Empty: the recipe's name, with the
            effective recipe's digest appended when overrides changed it.
        store_url: Artifact store (file:// or s3://); empty: the worker's QUANTPIPE_STORE_URL setting.
        progress: Show progress bars in the worker's output.
    """
    recipe = resolve_recipe(recipe, overrides, name)
    settings = get_settings()
    ctx = StageContext(settings=settings, store_url=store_url or settings.effective_store_url, progress=progress)
    ctx.store.check()
    outcome = run_quantize_pipeline(ctx, model, recipe).model_dump()
    record_flow_result(outcome)  # every stage done: a Prefect API lost from here on must not fail the run
    return outcome
