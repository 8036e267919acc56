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

__all__ = ["eval_protocol", "recipe_identity", "run_register"]

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
