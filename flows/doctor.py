"""``quantpipe doctor``: check the environment and say what to fix.

Checks: settings load, artifact store reachable and writable, MLflow reachable, Prefect API reachable (when one
is configured; ephemeral otherwise), free disk space under the home, the WikiText data path, and the versions of
torch / triton / transformers. Prints a table (or ``--json``) and exits 1 when any check fails. Every check
catches its own errors, so the command never ends in a traceback, and nothing it prints contains a secret.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flows.cli_util import out_console
from infra.settings import Settings

__all__ = ["Check", "register", "run_checks"]

console = out_console()
_TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    status: str  # "OK" | "FAIL"
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def _one_line(exc: BaseException) -> str:
    """The exception as one redacted line: MLflow and botocore errors quote the URLs they failed on, credentials
    included (redacted before truncating, so a cut never lands inside ``user:password@``)."""
    from infra.redact import redact

    text = redact(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _redact(uri: str) -> str:
    from infra.settings import _redact_uri

    return _redact_uri(uri)


def _http_ok(url: str) -> tuple[bool, str]:
    import requests

    try:
        resp = requests.get(url, timeout=_TIMEOUT)
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}"
    return resp.status_code < 400, f"HTTP {resp.status_code}"


def check_store(settings: Settings) -> Check:
    from infra.store import S3Store, open_store

    url = settings.effective_store_url
    fix = "set QUANTPIPE_STORE_URL (file:///dir or s3://bucket/prefix) / QUANTPIPE_HOME, check credentials"
    try:
        store = open_store(url, settings, check=True)  # local: creates dirs and writes a probe file
        if isinstance(store, S3Store):
            probe = store._obj(f".doctor-probe-{uuid.uuid4().hex}")
            store._call(f"write probe to {url}", store.client.put_object, Bucket=store.bucket, Key=probe, Body=b"ok")
            store._call(f"delete probe from {url}", store.client.delete_object, Bucket=store.bucket, Key=probe)
        n = len(store.list())
    except Exception as exc:
        return Check("store", "FAIL", f"{_redact(url)}: {_one_line(exc)}", fix)
    return Check("store", "OK", f"{_redact(url)} reachable and writable ({n} artifacts)")


def check_mlflow(settings: Settings) -> Check:
    uri = settings.effective_mlflow_uri
    fix = "start the tracking server (quantpipe serve) or fix QUANTPIPE_MLFLOW_TRACKING_URI"
    if uri.startswith(("http://", "https://")):
        ok, detail = _http_ok(uri.rstrip("/") + "/health")
        return Check("mlflow", "OK" if ok else "FAIL", f"{_redact(uri)}: {detail}", "" if ok else fix)
    try:
        from registry.tracking import get_client

        get_client(settings).search_experiments(max_results=1)
    except Exception as exc:
        return Check("mlflow", "FAIL", f"{_redact(uri)}: {_one_line(exc)}", fix)
    return Check("mlflow", "OK", f"{_redact(uri)} (experiment {settings.mlflow_experiment!r})")


def check_prefect(settings: Settings) -> Check:
    import os

    url = settings.prefect_api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        return Check("prefect", "OK", "no API configured: flows run on an ephemeral in-process server")
    ok, detail = _http_ok(url.rstrip("/") + "/health")
    fix = "start it (quantpipe serve / prefect server start) or unset PREFECT_API_URL / QUANTPIPE_PREFECT_API_URL"
    return Check("prefect", "OK" if ok else "FAIL", f"{_redact(url)}: {detail}", "" if ok else fix)


def check_disk(settings: Settings, min_free_gb: float) -> Check:
    path: Path = settings.home
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return Check("disk", "FAIL", f"{settings.home}: {_one_line(exc)}", "point QUANTPIPE_HOME at a usable disk")
    free_gb = usage.free / 2**30
    detail = f"{free_gb:.1f} GiB free under {path} (need {min_free_gb:g})"
    if free_gb < min_free_gb:
        return Check("disk", "FAIL", detail, "free disk space or point QUANTPIPE_HOME at a larger disk")
    return Check("disk", "OK", detail)


def check_wikitext(settings: Settings) -> Check:
    fix = "set QUANTPIPE_WIKITEXT_DIR to a directory with wiki.valid.raw and wiki.test.raw"
    d = settings.wikitext_dir
    if d is None:
        return Check("wikitext", "FAIL", "no local WikiText-2 (would need the Hugging Face hub)", fix)
    missing = [n for n in ("wiki.valid.raw", "wiki.test.raw") if not (d / n).is_file()]
    if missing:
        return Check("wikitext", "FAIL", f"{d}: missing {', '.join(missing)}", fix)
    return Check("wikitext", "OK", str(d))


def check_versions(settings: Settings) -> Check:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for pkg in ("torch", "triton", "transformers"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "missing"
    missing = [p for p in ("torch", "transformers") if found[p] == "missing"]
    detail = ", ".join(f"{k} {v}" for k, v in found.items())
    try:
        import torch

        detail += f"; device {'cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu'}"
    except Exception as exc:
        missing = missing or ["torch"]
        detail += f"; torch import failed ({type(exc).__name__})"
    if missing:
        return Check("versions", "FAIL", detail, f"install {', '.join(missing)} (make setup)")
    return Check("versions", "OK", detail)


def run_checks(settings: Settings, *, min_free_gb: float = 1.0) -> list[Check]:
    checks: list[Callable[[], Check]] = [
        lambda: check_store(settings),
        lambda: check_mlflow(settings),
        lambda: check_prefect(settings),
        lambda: check_disk(settings, min_free_gb),
        lambda: check_wikitext(settings),
        lambda: check_versions(settings),
    ]
    out = []
    for fn in checks:
        try:
            out.append(fn())
        except Exception as exc:  # a check must never crash the report
            out.append(Check(getattr(fn, "__name__", "check"), "FAIL", _one_line(exc), "see the detail"))
    return out


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    min_free_gb: float = typer.Option(1.0, "--min-free-gb", help="Free space required under the home (GiB)."),
) -> None:
    """Check the environment (store, MLflow, Prefect, disk, data, versions) and say what to fix (exit 1 on FAIL)."""
    from infra.errors import QuantpipeError
    from infra.settings import get_settings

    try:
        settings = get_settings(refresh=True)
    except QuantpipeError as exc:
        results = [Check("settings", "FAIL", _one_line(exc), "fix the QUANTPIPE_* variable or config file")]
    else:
        results = [Check("settings", "OK", f"home {settings.home}"), *run_checks(settings, min_free_gb=min_free_gb)]
    ok = all(c.ok for c in results)
    if as_json:
        payload: dict[str, Any] = {"ok": ok, "checks": [asdict(c) for c in results]}
        typer.echo(json.dumps(payload))
    else:
        table = Table("check", "status", "detail", "fix", title="quantpipe doctor")
        for c in results:
            table.add_row(c.name, "[green]OK[/]" if c.ok else "[bold red]FAIL[/]", c.detail, c.fix)
        console.print(table)
        console.print("all checks passed" if ok else f"{sum(not c.ok for c in results)} check(s) failed")
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
