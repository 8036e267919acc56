"""What an operator sees: screenshots of the Prefect and MLflow pages of one real run, in headless Chromium.

Starts `quantpipe serve` (Prefect server + MLflow tracking server on free loopback ports, a fresh QUANTPIPE_HOME),
registers the deployments (`quantpipe deploy`), runs one quantization of a tiny random Llama through the CLI against
those servers, then drives Debian's Chromium over the DevTools protocol (no Playwright needed: `websockets` is
already installed) through the deployment's run form, the flow-run page (logs, task runs, artifacts) and the MLflow
model version and parent run, saving one PNG per page under ``benchmarks/results/ui/``. On demand, not in CI (it
needs `apt-get install chromium` and takes a few minutes):

    .venv/bin/python benchmarks/ui_screenshots.py [--recipe rtn-w4g64] [--out benchmarks/results/ui]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUANTPIPE = [sys.executable, "-m", "flows.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status < 500:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout:.0f} s")
        time.sleep(1)


@contextlib.contextmanager
def served(env: dict[str, str], prefect_port: int, mlflow_port: int, log: Path) -> Iterator[None]:
    cmd = [*QUANTPIPE, "serve", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 240)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 240)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Browser:
    """One headless Chromium tab driven over the DevTools protocol."""

    def __init__(self, profile: Path, width: int = 1600, height: int = 1300) -> None:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("no chromium on PATH: apt-get install -y chromium")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in json.loads(resp.read()) if t["type"] == "page"]
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        self.size = (width, height)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    async def _call(self, ws: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._id = getattr(self, "_id", 0) + 1
        await ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def shoot(
        self, url: str, out: Path, *, settle: float = 6.0, script: str | None = None, full_page: bool = False
    ) -> str:
        """Open ``url``, wait for the app to render, optionally run ``script``, save a PNG; returns the page text
        (so the caller can check what the page says, not only look at it)."""
        import websockets

        async with websockets.connect(self.ws_url, max_size=64 << 20) as ws:
            await self._call(ws, "Page.enable")
            await self._call(ws, "Page.navigate", {"url": url})
            await asyncio.sleep(settle)
            if script:
                await self._call(ws, "Runtime.evaluate", {"expression": script, "awaitPromise": True})
                await asyncio.sleep(settle / 2)
            params: dict[str, Any] = {"format": "png"}
            if full_page:  # the whole scrollable page (a model card is longer than the window)
                metrics = await self._call(ws, "Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics["contentSize"]
                height = min(int(size["height"]), 6000)
                params |= {
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": self.size[0], "height": height, "scale": 1},
                }
            shot = await self._call(ws, "Page.captureScreenshot", params)
            out.write_bytes(base64.b64decode(shot["data"]))
            text = await self._call(
                ws, "Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True}
            )
            return str(text.get("result", {}).get("value", ""))


def _click(label: str) -> str:
    """JS clicking the first tab/button/link whose text is exactly ``label``."""
    return (
        "(() => { const el = [...document.querySelectorAll('[role=tab], button, a, li, span')]"
        f".find(e => e.textContent.trim() === {json.dumps(label)}); if (el) el.click(); return !!el; }})()"
    )


def _click_link(fragment: str) -> str:
    """JS opening (after the tab rendered) the first link whose text contains ``fragment``."""
    return (
        "new Promise(r => setTimeout(() => { const el = [...document.querySelectorAll('a')]"
        f".find(e => e.textContent.includes({json.dumps(fragment)})); if (el) el.click(); r(!!el); }}, 3000))"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="rtn-w4g64")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ui")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from tests.helpers.models import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_tiny_llama(tmp / "tiny-llama", num_layers=2, hidden=64, intermediate=128)
        pp, mp = free_port(), free_port()
        env = {
            **os.environ,
            "QUANTPIPE_HOME": str(tmp / "home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{pp}/api",
            "PREFECT_UI_URL": f"http://127.0.0.1:{pp}",
            "QUANTPIPE_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mp}",
            "PYTHONPATH": str(REPO),
        }
        report: dict[str, Any] = {"recipe": args.recipe, "pages": {}}
        with served(env, pp, mp, tmp / "serve.log"):
            subprocess.run([*QUANTPIPE, "deploy"], cwd=REPO, env=env, check=True, capture_output=True)
            sets = ["calibration.n_samples=8", "calibration.seq_len=64", "eval.seq_len=128", "eval.n_windows=4"]
            cmd = [*QUANTPIPE, "quantize", "--model", str(model), "--recipe", args.recipe, "--json"]
            for s in sets:
                cmd += ["--set", s]
            run = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"quantize failed (exit {run.returncode}): {run.stderr[-2000:]}")
            out = json.loads(run.stdout.strip().splitlines()[-1])
            report["run"] = {k: out.get(k) for k in ("flow_run_id", "mlflow_run_id", "model_name", "model_version")}
            deployments = json.loads(
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"http://127.0.0.1:{pp}/api/deployments/filter",
                        data=b"{}",
                        headers={"Content-Type": "application/json"},
                    )
                ).read()
            )
            quantize_dep = next(d for d in deployments if d["name"] == "default")
            ui, ml = f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{mp}"
            with urllib.request.urlopen(f"{ml}/api/2.0/mlflow/runs/get?run_id={out['mlflow_run_id']}") as resp:
                experiment = json.loads(resp.read())["run"]["info"]["experiment_id"]
            run_page = f"{ui}/runs/flow-run/{out['flow_run_id']}"
            # (url, script run after load: the Prefect UI's tabs are clicked, not addressed by URL; full page)
            pages: dict[str, tuple[str, str | None, bool]] = {
                "prefect-run-form": (f"{ui}/deployments/deployment/{quantize_dep['id']}/run", None, True),
                "prefect-flow-run-logs": (run_page, None, True),
                "prefect-flow-run-task-runs": (run_page, _click("Task Runs"), True),
                "prefect-flow-run-artifacts": (run_page, _click("Artifacts"), True),
                "prefect-summary-artifact": (
                    run_page,
                    _click("Artifacts") + ";" + _click_link("quantpipe-summary"),
                    True,
                ),
                "mlflow-model-version": (
                    f"{ml}/#/models/{out['model_name']}/versions/{out['model_version']}",
                    None,
                    True,
                ),
                "mlflow-registered-model": (f"{ml}/#/models/{out['model_name']}", None, False),
                "mlflow-parent-run": (f"{ml}/#/experiments/{experiment}/runs/{out['mlflow_run_id']}", None, True),
            }
            browser = Browser(tmp / "chromium-profile")
            try:
                for name, (url, script, full) in pages.items():
                    text = asyncio.run(browser.shoot(url, args.out / f"{name}.png", script=script, full_page=full))
                    report["pages"][name] = {
                        "url": url.replace(str(pp), "PREFECT").replace(str(mp), "MLFLOW"),
                        "text_head": text[:600],
                    }
                    print(f"{name}: {len(text)} chars of text -> {args.out / (name + '.png')}", flush=True)
            finally:
                browser.close()
        (args.out / "pages.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}/*.png and pages.json")


if __name__ == "__main__":
    main()
