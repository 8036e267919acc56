"""The ``nightly-requantize`` flow: requantize new releases of watched models, skip what is already built.

Watch-list (YAML; relative paths are relative to the file)::

    recipes: [gptq-w4g64, recipes/my-w3.yaml]   # shipped names, YAML paths or inline recipe mappings
    newest_by: name                              # release folders: newest subdir by natural name order | mtime
    models:
      - path: /models/tiny-llama                 # a local HF checkpoint dir (revision = content digest)
      - releases: /releases/smollm2              # a folder of releases; its newest subdir is the model
        recipes: [rtn-w4g64]                     # per-model override of the recipe list
      - hub: HuggingFaceTB/SmolLM2-135M-Instruct # hub id; newest commit of the default branch (or @rev)

For every (model, recipe) pair the newest revision is resolved, the registry is asked (one tag search, not a
store scan) whether a version with that base model, revision, recipe name and recipe digest exists, and only
the missing pairs run through the ``quantize-model`` flow (as subflows). One pair failing (an entry that cannot
be resolved, a recipe that does not validate, a pipeline error) is recorded and the others proceed; a
markdown table artifact summarises the night. Running it twice does nothing the second time.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.prefect_backend import is_api_loss, record_flow_result
from flows.summary import build_summary, headline
from infra.errors import ConfigError, QuantpipeError
from infra.settings import Settings, get_settings
from tasks.recipe import Recipe, load_recipe, parse_recipe

__all__ = [
    "ModelEntry",
    "Release",
    "SummaryRow",
    "Watchlist",
    "load_watchlist",
    "newest_release_dir",
    "nightly_requantize",
    "render_summary",
    "resolve_entry",
]

ARTIFACT_KEY = "nightly-requantize-summary"


class ModelEntry(BaseModel):
    """One watched model: exactly one of ``path``, ``releases`` or ``hub``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(default=None, description="Local HF checkpoint dir.")
    releases: str | None = Field(default=None, description="Folder of releases; the newest subdir wins.")
    hub: str | None = Field(default=None, description="Hub id org/name[@revision].")
    recipes: list[str | dict[str, Any]] | None = Field(default=None, description="Overrides the watch-list recipes.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        given = [k for k in ("path", "releases", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, releases, hub (got {', '.join(given) or 'none'})")
        return self

    @property
    def label(self) -> str:
        return str(self.path or self.releases or self.hub)


class Watchlist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    recipes: list[str | dict[str, Any]] = Field(min_length=1, description="Recipes applied to every model.")
    models: list[dict[str, Any]] = Field(description="Model entries (validated one by one).")
    newest_by: Literal["name", "mtime"] = Field(default="name", description="How a release folder's newest is found.")
    base_dir: Path = Field(default=Path("."), exclude=True)


class Release(BaseModel):
    """A resolved model release: what the pipeline gets (``source``) and what the registry is asked about."""

    source: str
    name: str
    revision: str


class SummaryRow(BaseModel):
    model: str
    revision: str = ""
    recipe: str = ""
    status: Literal["registered", "skipped", "failed", "error"] = "error"
    version: str = ""
    ppl: float | None = None
    ppl_fp: float | None = None
    delta_rel: float | None = None
    promoted: bool | None = None
    seconds: float = 0.0
    error: str = ""
    summary: str = Field(default="", description="The pair's run summary (markdown), for pairs built tonight.")


# ------------------------------------------------------------------------------------------ watch-list
def load_watchlist(path: str | Path) -> Watchlist:
    """Parse and validate the watch-list file (the file itself must be valid; entries are checked later)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"watch-list {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"watch-list {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"watch-list {p}: expected a mapping with 'recipes' and 'models'")
    try:
        return Watchlist.model_validate({**data, "base_dir": p.resolve().parent})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ConfigError(f"watch-list {p}: {loc}: {first['msg']}") from None


def _natural_key(name: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _checkpoint_in(release: Path) -> Path | None:
    """``release`` itself when it holds a ``config.json``, else its only subdir that does (``v2/<model>/``:
    keeps the model's name, which names the registered model, stable across releases)."""
    if (release / "config.json").is_file():
        return release
    inner = [d for d in release.iterdir() if d.is_dir() and (d / "config.json").is_file()]
    return inner[0] if len(inner) == 1 else None


def newest_release_dir(folder: Path, newest_by: str = "name") -> Path:
    """The checkpoint of the newest release in a release folder.

    Releases are the subdirs holding a checkpoint (``<release>/config.json`` or ``<release>/<model>/config.json``);
    the newest is the greatest by natural name order (``v10`` > ``v9``, ``2025-01-02`` > ``2024-12-31``) or,
    with ``newest_by="mtime"``, by the modification time of its ``config.json``.
    """
    if not folder.is_dir():
        raise ConfigError(f"release folder {folder} does not exist")
    releases: dict[Path, Path] = {}
    for d in folder.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            ckpt = _checkpoint_in(d)
            if ckpt is not None:
                releases[d] = ckpt
    if not releases:
        raise ConfigError(
            f"release folder {folder} has no release subdirectory with a checkpoint (<release>/config.json or "
            "<release>/<model>/config.json)"
        )
    if newest_by == "mtime":
        newest = max(releases, key=lambda d: ((releases[d] / "config.json").stat().st_mtime_ns, _natural_key(d.name)))
    else:
        newest = max(releases, key=lambda d: _natural_key(d.name))
    return releases[newest]


def _local(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


def resolve_entry(entry: ModelEntry, settings: Settings, *, base_dir: Path, newest_by: str = "name") -> Release:
    """The newest revision of ``entry``, computed exactly as the pipeline will (``tasks.models.resolve_model``
    for local dirs), so the registry lookup matches the tags the build will carry."""
    from tasks.models import resolve_model

    if entry.path:
        model = resolve_model(str(_local(entry.path, base_dir).resolve()), settings, progress=False)
        return Release(source=str(model.path), name=model.name, revision=model.revision)
    if entry.releases:
        newest = newest_release_dir(_local(entry.releases, base_dir).resolve(), newest_by)
        model = resolve_model(str(newest), settings, progress=False)
        return Release(source=str(model.path), name=model.name, revision=model.revision)
    assert entry.hub is not None
    return _resolve_hub_revision(entry.hub, settings)


def _resolve_hub_revision(hub_id: str, settings: Settings) -> Release:
    """The commit sha of ``org/name[@rev]`` on the hub (needs the hub; offline is a clear per-entry error)."""
    repo_id, _, rev = hub_id.partition("@")
    if repo_id.count("/") != 1 or ".." in repo_id:
        raise ConfigError(f"hub id {hub_id!r} must look like org/name[@revision]")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(
            repo_id,
            revision=rev or None,
            token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        )
    except Exception as exc:
        raise QuantpipeError(
            f"cannot resolve {hub_id} on the Hugging Face hub ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); offline? watch a local dir or release folder instead"
        ) from None
    if not info.sha:
        raise QuantpipeError(f"the hub returned no commit for {hub_id}")
    return Release(source=f"{repo_id}@{info.sha}", name=repo_id.split("/")[1], revision=info.sha)


def _load_recipe_item(item: str | dict[str, Any], base_dir: Path) -> Recipe:
    if isinstance(item, dict):
        return parse_recipe(item, source="(inline in the watch-list)")
    candidate = _local(item, base_dir)
    return load_recipe(candidate if candidate.is_file() else item)


# ------------------------------------------------------------------------------------------ tasks
@task(name="resolve-release", cache_policy=NO_CACHE)
def resolve_release_task(entry: ModelEntry, base_dir: Path, newest_by: str) -> Release:
    return resolve_entry(entry, get_settings(), base_dir=base_dir, newest_by=newest_by)


@task(name="registry-lookup", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def lookup_task(release: Release, recipe: Recipe) -> dict[str, Any] | None:
    from registry.models import lookup
    from tasks.register import recipe_identity

    info = lookup(
        model=release.name,
        revision=release.revision,
        recipe=recipe_identity(recipe)[0],  # the name register gives it (overridden recipes carry a digest suffix)
        recipe_digest=recipe.digest(),
        settings=get_settings(),
    )
    if info is None:
        return None
    return {"version": info.version, "aliases": list(info.aliases), "metrics": info.metrics, "name": info.name}


def _row_from_metrics(row: SummaryRow, metrics: dict[str, float], aliases: list[str]) -> None:
    row.ppl = metrics.get("ppl")
    row.ppl_fp = metrics.get("ppl_fp")
    if metrics.get("ppl_delta_rel") is not None:
        row.delta_rel = metrics["ppl_delta_rel"]
    elif row.ppl and row.ppl_fp:
        row.delta_rel = row.ppl / row.ppl_fp - 1
    row.promoted = "champion" in aliases


def _one_line(exc: BaseException | str) -> str:
    text = (
        exc
        if isinstance(exc, str)
        else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, QuantpipeError)
        else str(exc)
    )
    return " ".join(str(text).split())[:400]


def _pair_summary(release: Release, recipe: Recipe, outcome: dict[str, Any]) -> str:
    """The built pair's run summary as a section of the night's artifact (the subflow posts it on its own run
    page too); empty if it cannot be built, since the table row already holds the result."""
    try:
        summary = build_summary(get_settings(), release.source, recipe.name, outcome)
        summary.title = f"{release.name} × {recipe.name}"
        return summary.markdown(level=2)
    except Exception as exc:  # a summary is never worth a failed night
        return f"## {release.name} × {recipe.name}\n\nno summary: {_one_line(exc)}\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_summary(rows: list[SummaryRow], *, watchlist: str, seconds: float) -> str:
    """The markdown table posted as the run's artifact."""
    counts = {s: sum(r.status == s for r in rows) for s in ("registered", "skipped", "failed", "error")}
    lines = [
        f"# Nightly requantization: {watchlist}",
        "",
        f"{counts['registered']} built, {counts['skipped']} already registered, "
        f"{counts['failed']} failed, {counts['error']} unresolved — {seconds:.1f} s",
        "",
        "| model | revision | recipe | status | version | ppl | Δ vs fp | promoted | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "-" if r.delta_rel is None else f"{100 * r.delta_rel:+.1f} %"
        promoted = "-" if r.promoted is None else ("champion" if r.promoted else "no")
        err = r.error.replace("|", "\\|")
        lines.append(
            f"| {r.model} | `{r.revision[:23] or '-'}` | {r.recipe or '-'} | {r.status} | {r.version or '-'} | "
            f"{_fmt(r.ppl, '.3f')} | {delta} | {promoted} | {err or ''} |"
        )
    for r in rows:  # each pair built tonight: its run's summary (stage table, metrics, version, MLflow links)
        if r.summary:
            lines += ["", r.summary.rstrip()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ flow
@flow(name="nightly-requantize", log_prints=True, validate_parameters=True)
def nightly_requantize(
    watchlist_path: str,
    store_url: str | None = None,
    fail_on_error: bool = True,
) -> dict[str, Any]:
    """Build every (watched model × recipe) whose newest revision has no registered version yet.

    ``fail_on_error``: after every pair was tried and the summary posted, end the run FAILED if any pair
    failed or could not be resolved (so the schedule's failures are visible); ``False`` completes anyway.
    """
    from flows.quantize import quantize_model

    logger = get_run_logger()
    started = time.perf_counter()
    wl = load_watchlist(watchlist_path)
    rows: list[SummaryRow] = []

    recipe_cache: dict[str, Recipe | QuantpipeError] = {}

    def recipes_for(items: list[str | dict[str, Any]]) -> list[tuple[str, Recipe | QuantpipeError]]:
        out = []
        for item in items:
            label = item if isinstance(item, str) else str(item.get("name", "(inline)"))
            key = repr(item)
            if key not in recipe_cache:
                try:
                    recipe_cache[key] = _load_recipe_item(item, wl.base_dir)
                except QuantpipeError as exc:
                    recipe_cache[key] = exc
            out.append((label, recipe_cache[key]))
        return out

    for raw in wl.models:
        label = str(raw.get("path") or raw.get("releases") or raw.get("hub") or raw) if isinstance(raw, dict) else raw
        try:
            entry = ModelEntry.model_validate(raw)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            logger.error("watch-list entry %s is invalid: %s", label, msg)
            rows.append(SummaryRow(model=str(label), status="error", error=f"invalid entry: {msg}"))
            continue
        try:
            release = resolve_release_task(entry, wl.base_dir, wl.newest_by)
        except Exception as exc:
            logger.error("cannot resolve %s: %s", entry.label, _one_line(exc))
            rows.append(SummaryRow(model=entry.label, status="error", error=_one_line(exc)))
            continue
        for recipe_label, recipe in recipes_for(entry.recipes or wl.recipes):
            row = SummaryRow(model=release.name, revision=release.revision, recipe=recipe_label)
            rows.append(row)
            if isinstance(recipe, QuantpipeError):
                row.status, row.error = "error", _one_line(recipe)
                logger.error("%s: %s", release.name, row.error)
                continue
            row.recipe = recipe.name
            t0 = time.perf_counter()
            try:
                found = lookup_task(release, recipe)
                if found is not None:
                    row.status, row.version = "skipped", f"{found['name']}/{found['version']}"
                    _row_from_metrics(row, found["metrics"], found["aliases"])
                    logger.info(
                        "%s %s %s: already registered as %s",
                        release.name,
                        release.revision[:16],
                        recipe.name,
                        row.version,
                    )
                    continue
                logger.info("%s %s %s: building", release.name, release.revision[:16], recipe.name)
                state = quantize_model(model=release.source, recipe=recipe, store_url=store_url, return_state=True)
                if not state.is_completed():
                    row.status = "failed"
                    row.error = _one_line(state.message or state.name or "flow run did not complete")
                    logger.error("%s %s: %s", release.name, recipe.name, row.error)
                else:
                    out = state.result()
                    row.status = "registered"
                    row.version = f"{out.get('model_name')}/{out.get('model_version')}"
                    _row_from_metrics(row, out.get("metrics") or {}, out.get("aliases") or [])
                    row.summary = _pair_summary(release, recipe, out)
                    logger.info(
                        "%s %s: %s, %s", release.name, recipe.name, row.version, headline(out.get("metrics") or {})
                    )
            except Exception as exc:  # one model's failure never stops the others
                row.status, row.error = "failed", _one_line(exc)
                logger.error("%s %s failed: %s", release.name, recipe.name, row.error)
            finally:
                row.seconds = round(time.perf_counter() - t0, 2)

    seconds = time.perf_counter() - started
    markdown = render_summary(rows, watchlist=str(watchlist_path), seconds=seconds)
    try:
        create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="nightly requantization summary")
    except Exception as exc:  # the builds are done and registered: a lost Prefect API must not fail the night
        if not is_api_loss(exc):
            raise
        logger.warning("summary artifact not posted, the Prefect API is unreachable: %s", _one_line(exc))
    print(markdown)
    counts = {
        "ran": sum(r.status in ("registered", "failed") for r in rows),
        "registered": sum(r.status == "registered" for r in rows),
        "skipped": sum(r.status == "skipped" for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "errors": sum(r.status == "error" for r in rows),
    }
    summary: dict[str, Any] = {
        "rows": [r.model_dump(exclude={"summary"}) for r in rows],
        **counts,
        "seconds": round(seconds, 2),
    }
    bad = counts["failed"] + counts["errors"]
    if fail_on_error and bad:
        raise QuantpipeError(
            f"nightly requantization: {bad} of {len(rows)} entries failed or could not be resolved "
            f"(see the '{ARTIFACT_KEY}' artifact); the others completed"
        )
    record_flow_result(summary)  # a Prefect API lost from here on must not fail the night (flows.prefect_backend)
    return summary
