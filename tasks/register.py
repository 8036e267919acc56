"""Stage ``register``: the packed checkpoint becomes an MLflow model version named ``<model>.<recipe>``.

Not cached in the store: the registry itself is the record, and ``register_build`` is idempotent on the build
key (the pack + evaluate artifact refs), so a rerun never duplicates a version.
"""

from __future__ import annotations

import time
from typing import Any

from infra.keys import artifact_key
from tasks.recipe import Recipe
from tasks.stage import StageContext, StageResult

__all__ = ["run_register"]


def run_register(
    ctx: StageContext,
    *,
    model_name: str,
    revision: str,
    recipe: Recipe,
    refs: dict[str, str],
    metrics: dict[str, float],
) -> StageResult:
    from registry.models import PromotionGate, register_build, registry_name

    started = time.perf_counter()
    name = registry_name(model_name, recipe.name)
    build_key = artifact_key("register", 1, {"name": name}, {k: refs[k] for k in ("pack", "evaluate")})
    gate = PromotionGate(max_ppl_increase=recipe.registry.max_ppl_increase, max_ppl=recipe.registry.max_ppl)
    tags = {
        "base_model": model_name,
        "base_revision": revision,
        "recipe": recipe.name,
        "recipe_digest": recipe.digest(),
        "method": recipe.quantize.method,
        "bits": str(recipe.quantize.bits),
        "group_size": str(recipe.quantize.group_size),
        **{f"key.{stage}": ref for stage, ref in refs.items()},
    }
    pack = ctx.store.get(refs["pack"])
    prefix = pack.manifest.file("native/config.json").path.removesuffix("native/config.json")
    checkpoint = pack.root / prefix if prefix else pack.root
    with ctx.tracked(
        "register", params={"name": name, "gate": gate.model_dump()}, tags={"build_key": build_key}
    ) as run:
        info = register_build(
            name,
            checkpoint,
            run_id=run.run_id if run else _orphan_run(ctx),
            tags=tags,
            metrics=metrics,
            build_key=build_key,
            gate=gate,
            settings=ctx.settings,
        )
        if run is not None:
            run.set_tags({"model_version": info.version, "model_name": name})
    meta: dict[str, Any] = {
        "name": name,
        "version": info.version,
        "aliases": list(info.aliases),
        "uri": info.uri,
        "gate": info.tags.get("gate", ""),
    }
    return StageResult(
        stage="register",
        ref=f"{name}/{info.version}",
        cache_hit=False,
        seconds=round(time.perf_counter() - started, 3),
        metadata=meta,
    )


def _orphan_run(ctx: StageContext) -> str:
    from registry.tracking import experiment_id, get_client

    client = get_client(ctx.settings)
    run = client.create_run(experiment_id(ctx.settings), run_name="register")
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)
