"""Stage ``register``: the packed checkpoint becomes an MLflow model version named ``<model>.<recipe>``.

Not cached in the store: the registry itself is the record, and ``register_build`` is idempotent on the build
key (the pack + evaluate artifact refs), so a rerun never duplicates a version.

Names do not lie: a build whose effective recipe differs from the shipped recipe file of the same name (``--set``
overrides, an edited copy) registers as ``<model>.<recipe>-<digest8>``, with the base recipe and the overridden
fields as tags; and every version carries its evaluation protocol, so the champion rule only compares builds
measured the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from infra.keys import artifact_key, canonical_json
from tasks.recipe import SHIPPED_RECIPES, Recipe, load_recipe
from tasks.stage import StageContext, StageResult

__all__ = ["eval_protocol", "prefect_flow_run_url", "recipe_identity", "run_register"]

_MAX_OVERRIDES_TAG = 4000


def _diff(base: Any, new: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of the fields where ``new`` differs from ``base`` (model_dump dicts), with the new values."""
    if isinstance(base, dict) and isinstance(new, dict):
        out: dict[str, Any] = {}
        for key in sorted(set(base) | set(new)):
            out.update(_diff(base.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if base == new else {prefix.rstrip("."): new}


def recipe_identity(recipe: Recipe) -> tuple[str, dict[str, str]]:
    """(recipe part of the registered name, extra version tags).

    The shipped name when the recipe is the shipped file's (same digest) or is not a shipped name at all (the
    user named it); ``<name>-<digest8>`` plus ``recipe_base`` / ``recipe_overrides`` tags when it claims a
    shipped name but differs from it."""
    shipped_file = SHIPPED_RECIPES / f"{recipe.name}.yaml"
    if not shipped_file.is_file():
        return recipe.name, {}
    shipped = load_recipe(shipped_file)
    if shipped.digest() == recipe.digest():
        return recipe.name, {}
    overrides = _diff(shipped.model_dump(mode="json"), recipe.model_dump(mode="json"))
    text = json.dumps(overrides, sort_keys=True, default=str)
    if len(text) > _MAX_OVERRIDES_TAG:
        text = text[: _MAX_OVERRIDES_TAG - 1] + "…"
    return f"{recipe.name}-{recipe.digest()[:8]}", {"recipe_base": recipe.name, "recipe_overrides": text}


def eval_protocol(recipe: Recipe) -> str:
    """Digest of what a perplexity was measured on (dataset, sequence length, windows): equal digests only."""
    return hashlib.sha256(canonical_json(recipe.eval.key_config()).encode()).hexdigest()[:16]


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI (``PREFECT_UI_URL``, which Prefect derives from ``PREFECT_API_URL``),
    credentials stripped; ``None`` when no UI is known (the ephemeral in-process API has none)."""
    if not flow_run_id:
        return None
    try:
        from prefect.settings import PREFECT_UI_URL

        base = PREFECT_UI_URL.value()
    except Exception:
        return None
    from registry.tracking import public_url

    base = public_url(str(base)) if base else None
    return f"{base}/runs/flow-run/{flow_run_id}" if base else None


def _card(
    ctx: StageContext, info: Any, recipe: Recipe, tags: dict[str, str], metrics: dict[str, float], source_run: str
) -> str:
    from registry.card import ModelCard
    from registry.tracking import run_artifact_url, run_artifacts, run_url

    figures = run_artifacts(source_run, "figures", ctx.settings)
    plots = {p: run_artifact_url(source_run, p, ctx.settings) for p in figures}
    overrides: dict[str, Any] = {}
    if tags.get("recipe_base"):  # the full diff (the tag may be cut to fit MLflow's limit)
        shipped = load_recipe(SHIPPED_RECIPES / f"{tags['recipe_base']}.yaml")
        overrides = _diff(shipped.model_dump(mode="json"), recipe.model_dump(mode="json"))
    ev = recipe.eval
    return ModelCard(
        name=info.name,
        version=info.version,
        base_model=tags["base_model"],
        base_revision=tags["base_revision"],
        recipe=tags["recipe"],
        recipe_digest=recipe.digest(),
        recipe_base=tags.get("recipe_base"),
        overrides=overrides,
        method=recipe.quantize.method,
        bits=recipe.quantize.bits,
        group_size=getattr(recipe.quantize, "group_size", None),
        metrics=metrics,
        eval_protocol=f"{ev.dataset}, {ev.n_windows or 'all'} windows x {ev.seq_len} tokens",
        gate=f"{info.tags.get('gate', '')}: {info.tags.get('gate_reason', '')}".strip(": "),
        formats=tags["formats"].split(","),
        plots=plots,
        source_run_id=source_run,
        source_run_url=run_url(source_run, ctx.settings),
        prefect_flow_run_url=prefect_flow_run_url(ctx.flow_run_id),
        lineage={k.removeprefix("key."): v for k, v in tags.items() if k.startswith("key.")},
    ).markdown()


def run_register(
    ctx: StageContext,
    *,
    model_name: str,
    revision: str,
    recipe: Recipe,
    refs: dict[str, str],
    metrics: dict[str, float],
) -> StageResult:
    from registry.card import registered_model_description
    from registry.models import PromotionGate, describe_version, register_build, registry_name

    started = time.perf_counter()
    recipe_name, identity_tags = recipe_identity(recipe)
    name = registry_name(model_name, recipe_name)
    build_key = artifact_key("register", 1, {"name": name}, {k: refs[k] for k in ("pack", "evaluate")})
    gate = PromotionGate(max_ppl_increase=recipe.registry.max_ppl_increase, max_ppl=recipe.registry.max_ppl)
    tags = {
        "base_model": model_name,
        "base_revision": revision,
        "recipe": recipe_name,
        "recipe_digest": recipe.digest(),
        "method": recipe.quantize.method,
        "bits": str(recipe.quantize.bits),
        "group_size": str(recipe.quantize.group_size),
        "eval_protocol": eval_protocol(recipe),
        "eval_windows": str(recipe.eval.n_windows),
        "eval_seq_len": str(recipe.eval.seq_len),
        **identity_tags,
        **{f"key.{stage}": ref for stage, ref in refs.items()},
    }
    pack = ctx.store.get(refs["pack"])
    # serving exports inside the pack (tasks.export): `quantpipe export NAME/VERSION --format F` resolves them
    tags["formats"] = ",".join(pack.manifest.metadata.get("formats", ["native"]))
    prefix = pack.manifest.file("native/config.json").path.removesuffix("native/config.json")
    checkpoint = pack.root / prefix if prefix else pack.root
    with ctx.tracked(
        "register", params={"name": name, "gate": gate.model_dump()}, tags={"build_key": build_key}
    ) as run:
        # the version's source run is the flow's parent run (metrics, plots, Prefect link), not this child
        source_run = ctx.parent_run_id or (run.run_id if run else _orphan_run(ctx))
        q = recipe.quantize
        info = register_build(
            name,
            checkpoint,
            run_id=source_run,
            tags=tags,
            metrics=metrics,
            build_key=build_key,
            gate=gate,
            settings=ctx.settings,
            model_description=registered_model_description(
                name, base_model=model_name, recipe=recipe_name, method=q.method, bits=q.bits
            ),
        )
        # the card is this build's: written when this run made the version (a rerun finding it keeps its card)
        if info.run_id == source_run or not info.description:
            card_run = info.run_id or source_run
            info = describe_version(
                name, info.version, _card(ctx, info, recipe, tags, metrics, card_run), settings=ctx.settings
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
