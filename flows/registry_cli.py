"""``quantpipe registry …``: list, show, lookup, promote, demote and lineage of registered builds."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from flows.cli_util import friendly, out_console
from infra.settings import get_settings

registry_app = typer.Typer(no_args_is_help=True, help="MLflow model registry: lookups, promotion, lineage.")
console = out_console()


def _dump(info: Any) -> dict[str, Any]:
    data: dict[str, Any] = info.model_dump()
    return data


def _versions_table(infos: list[Any]) -> Table:
    table = Table("name", "version", "aliases", "ppl", "Δ vs fp", "bits", "base revision")
    for i in infos:
        m = i.metrics
        delta = f"{100 * (m['ppl'] / m['ppl_fp'] - 1):+.1f} %" if "ppl" in m and "ppl_fp" in m else "-"
        table.add_row(
            i.name,
            i.version,
            ",".join(i.aliases) or "-",
            f"{m.get('ppl', float('nan')):.3f}",
            delta,
            i.tags.get("bits", "-"),
            i.tags.get("base_revision", "-")[:24],
        )
    return table


@registry_app.command("list")
@friendly
def list_cmd(name: str = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """Every registered version (of NAME, if given), newest first."""
    from registry.models import list_versions

    infos = list_versions(name, settings=get_settings(refresh=True))
    if as_json:
        typer.echo(json.dumps([_dump(i) for i in infos], default=str))
    else:
        console.print(_versions_table(infos))


@registry_app.command("show")
@friendly
def show_cmd(
    name: str,
    version: str = typer.Argument(..., help="Version number or alias."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One version with its tags (metrics, recipe, artifact keys)."""
    from registry.models import show

    info = show(name, version, settings=get_settings(refresh=True))
    if as_json:
        typer.echo(json.dumps(_dump(info), default=str))
        return
    console.print(_versions_table([info]))
    for k, v in sorted(info.tags.items()):
        console.print(f"  {k} = {v}", highlight=False)


@registry_app.command("lookup")
@friendly
def lookup_cmd(
    model: str = typer.Option(None, "--model"),
    revision: str = typer.Option(None, "--revision"),
    recipe: str = typer.Option(None, "--recipe"),
    bits: int = typer.Option(None, "--bits"),
    alias: str = typer.Option(None, "--alias"),
    name: str = typer.Option(None, "--name"),
    fmt: str = typer.Option(None, "--format", help="Print the location of this export of the version instead."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the model URI of the newest matching version (exit 1 when none matches); with ``--format``, where
    that version's export in this format is (refused with the pack's reason when the build has none)."""
    from registry.models import lookup

    model = _canonical_model(model)
    info = lookup(
        model=model,
        revision=revision,
        recipe=recipe,
        bits=bits,
        alias=alias,
        name=name,
        settings=get_settings(refresh=True),
    )
    if info is None:
        if as_json:
            typer.echo("null")
        else:
            console.print("no registered version matches", style="yellow")
            _explain(model=model, revision=revision, recipe=recipe, bits=bits, alias=alias, name=name)
        raise typer.Exit(1)
    if fmt is not None:
        from tasks.export.registered import export_build

        where = export_build(f"{info.name}/{info.version}", fmt, None, get_settings(refresh=True))
        typer.echo(json.dumps(where, default=str) if as_json else str(where["location"]))
        return
    typer.echo(json.dumps(_dump(info), default=str) if as_json else info.uri)


def _canonical_model(model: str | None) -> str | None:
    """``--model`` as the registry records it: a known alias (``smollm2-135m``) or a checkpoint directory is
    looked up under its canonical base-model name (``SmolLM2-135M-Instruct``)."""
    if model is None:
        return None
    from pathlib import Path

    from tasks.models import CHUNKED_MODELS, DEMO_MODELS, canonical_name

    spec = DEMO_MODELS.get(model) or CHUNKED_MODELS.get(model)
    if spec is not None:
        return spec.display_name
    path = Path(model).expanduser()
    if path.is_dir():
        return canonical_name(path.resolve(), path.resolve().name)
    return model


def _explain(
    *,
    model: str | None,
    revision: str | None,
    recipe: str | None,
    bits: int | None,
    alias: str | None,
    name: str | None,
) -> None:
    """After a miss, say what the registry holds near the query (candidates, gate reasons, which flag is off)."""
    from registry.explain import explain_miss
    from registry.models import TAG_BASE_MODEL, TAG_BASE_REVISION, TAG_BITS, TAG_RECIPE

    given = {TAG_BASE_MODEL: model, TAG_BASE_REVISION: revision, TAG_RECIPE: recipe, TAG_BITS: bits}
    wanted = {k: str(v) for k, v in given.items() if v is not None}
    for line in explain_miss(wanted, name=name, alias=alias, settings=get_settings(refresh=True)):
        console.print(line, highlight=False, soft_wrap=True)


@registry_app.command("promote")
@friendly
def promote_cmd(name: str, version: str, alias: str = typer.Option("champion", "--alias")) -> None:
    """Point ALIAS (default champion) at NAME/VERSION (manual override of the gate)."""
    from registry.models import promote

    info = promote(name, version, alias, settings=get_settings(refresh=True))
    console.print(f"{info.name} version {info.version} is now '{alias}'")


@registry_app.command("demote")
@friendly
def demote_cmd(name: str, alias: str = typer.Option("champion", "--alias")) -> None:
    """Remove ALIAS from NAME."""
    from registry.models import demote

    removed = demote(name, alias, settings=get_settings(refresh=True))
    console.print(f"alias '{alias}' {'removed from' if removed else 'was not set on'} {name}")


@registry_app.command("lineage")
@friendly
def lineage_cmd(name: str, version: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every artifact a registered version was built from, with the data's provenance."""
    from flows.inspect import lineage_tree

    tree, data = lineage_tree(f"{name}/{version}", get_settings(refresh=True))
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print(tree)


__all__ = ["registry_app"]
