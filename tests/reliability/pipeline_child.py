"""A fork server for the reliability suite: imports the pipeline once, then forks real ``quantpipe`` processes.

Every kill trial needs a fresh process that runs ``quantpipe quantize`` and can be SIGKILLed at an arbitrary
moment. Starting Python + torch + transformers + Prefect + MLflow costs several seconds per process on CI's two
cores, so this server imports everything once and ``fork()``s a child per run (the children are ordinary
processes running the real CLI entry point; the parent holds no threads when it forks). Protocol, one JSON
object per line on stdin / stdout::

    {"op": "run", "jobs": [{"argv": [...], "env": {...}, "log": "/path", "kill_after": 1.5 | null}]}
      -> {"results": [{"rc": 0, "killed": false, "seconds": 7.1}, ...]}
    {"op": "exit"}

``kill_after`` seconds after the fork — or, with ``kill_anchor`` (a glob), after the first file matching it
appears — the child's process group gets SIGKILL (unless it exited before).
Run: ``python -m tests.reliability.pipeline_child``.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

_PRELOAD = (
    "datasets",
    "mlflow",
    "prefect",
    "safetensors.torch",
    "torch",
    "transformers",
    "flows.cli",
    "flows.quantize",
    "registry.models",
    "registry.tracking",
    "tasks.calibration",
    "tasks.evaluate",
    "tasks.hessians",
    "tasks.pack",
    "tasks.quantize",
    "tasks.register",
)


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    from transformers import LlamaForCausalLM  # noqa: F401  (resolve the lazy import once)


def _child(job: dict[str, Any]) -> None:
    """In the forked child: become a process group leader, redirect output, run the CLI, never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for key, value in job.get("env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        from flows.cli import app
        from infra.settings import get_settings

        get_settings(refresh=True)
        try:
            app(args=list(job["argv"]), prog_name="quantpipe", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    started: list[tuple[int, float, dict[str, Any]]] = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            _child(job)
        try:
            os.setpgid(pid, pid)  # also from the parent: no window in which killpg could miss the child
        except OSError:
            pass
        started.append((pid, time.monotonic(), job))
    results: dict[int, dict[str, Any]] = {}
    anchored: dict[int, float] = {}  # pid -> when its anchor file appeared (the kill clock's zero)
    while len(results) < len(started):
        for pid, t0, job in started:
            if pid in results:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            now = time.monotonic()
            elapsed = now - t0
            anchor = job.get("kill_anchor")
            if anchor and pid not in anchored and glob.glob(anchor):
                anchored[pid] = now
            clock = now - anchored[pid] if pid in anchored else (None if anchor else elapsed)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                results[pid] = {"rc": rc, "killed": rc == -signal.SIGKILL, "seconds": round(elapsed, 3)}
            elif job.get("kill_after") is not None and clock is not None and clock >= float(job["kill_after"]):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return [results[pid] for pid, _, _ in started]


def main() -> None:
    _preload()
    threads = threading.active_count()
    print(json.dumps({"ready": True, "pid": os.getpid(), "threads": threads}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("op") == "exit":
            break
        if msg.get("op") == "run":
            print(json.dumps({"results": _run(msg["jobs"])}), flush=True)
        else:
            print(json.dumps({"error": f"unknown op {msg.get('op')!r}"}), flush=True)


if __name__ == "__main__":
    main()
