"""``quantpipe bench``: the one-run GPU kernel benchmark (``benchmarks/kernels_gpu.py``) from the CLI.

The measurement code lives in the benchmark script so that it also runs on a GPU machine that has torch and
triton but not the CLI's dependencies; this command loads that script from the repository and forwards the
options (``quantpipe bench --help-bench`` lists them). Without CUDA it exits non-zero with "no CUDA device:
speed unmeasured"; ``--interpret-smoke`` runs the same path on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import typer

__all__ = ["bench", "register"]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_gpu.py"


def _load_script() -> ModuleType:
    if not SCRIPT.is_file():
        raise typer.BadParameter(f"benchmark script not found at {SCRIPT} (run from a quantpipe source checkout)")
    spec = importlib.util.spec_from_file_location("quantpipe_kernels_gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(
    ctx: typer.Context,
    help_bench: bool = typer.Option(False, "--help-bench", help="Show the benchmark script's own options."),
) -> None:
    """Measure HBM bandwidth, fp16 matmul, our W4/W3/W2 kernels, gemlite, Hadamard+W2 and decode tokens/s."""
    script = _load_script()
    argv = ["--help"] if help_bench else list(ctx.args)
    try:
        code = script.main(argv)
    except SystemExit as e:  # argparse --help / bad option
        code = int(e.code or 0)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
