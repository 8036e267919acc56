"""A short Prefect flow in its own process, for the Prefect-backend tests (``tests/flows/test_prefect_backend.py``).

Run: ``python -m tests.flows.ephemeral_child --mode raw|backend [--force-port P] [--trust-port] [--no-restart]
STEP...``; every STEP is one task of the flow, run in order:

* ``sleep:S`` sleeps S seconds; ``touch:PATH`` creates PATH; ``wait:PATH`` waits until PATH exists;
* ``kill-server`` SIGKILLs this process's API server (a lost API mid-run; ``backend`` mode only).

Modes: ``raw`` is plain Prefect ephemeral mode, what the CLI did before :mod:`flows.prefect_backend`;
``backend`` is the CLI's way (:func:`flows.prefect_backend.with_prefect_backend`).
``--force-port P`` lets Prefect's own ephemeral port picker choose only P, and ``--trust-port`` makes its
"is the port free?" probe answer yes: together they reproduce, on demand, what happens by chance when two processes
draw the same port from 8000-8999 while the first one's server is still migrating its database (the probe passed
before the first server bound it). ``--no-restart``: a killed server stays dead (the API is lost).

Prints one JSON line ``{"api_url", "flow_run_id", "pid"}`` when the flow returned (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def run_step(step: str) -> None:
    kind, _, arg = step.partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
    elif kind == "touch":
        Path(arg).touch()
    elif kind == "wait":
        deadline = time.monotonic() + 300
        while not Path(arg).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{arg} never appeared")
            time.sleep(0.05)
    elif kind == "kill-server":
        from flows.prefect_backend import current_backend

        backend = current_backend()
        assert backend is not None and backend.process is not None, "no quantpipe-managed Prefect server"
        os.kill(backend.process.pid, signal.SIGKILL)
        backend.process.wait()
    else:
        raise ValueError(f"unknown step {step!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["raw", "backend"], required=True)
    parser.add_argument("--force-port", type=int, default=None)
    parser.add_argument("--trust-port", action="store_true")
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("steps", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect import flow, task
    from prefect.server.api.server import SubprocessASGIServer

    if args.force_port is not None:
        SubprocessASGIServer._port_range = range(args.force_port, args.force_port + 1)
    if args.trust_port:
        SubprocessASGIServer.is_port_available = staticmethod(lambda port: True)  # type: ignore[method-assign]

    @task
    def step(spec: str) -> None:
        run_step(spec)

    @flow(name="ephemeral-child")
    def child_flow(steps: list[str]) -> dict[str, object]:
        from prefect.context import FlowRunContext
        from prefect.runtime import flow_run

        from flows.prefect_backend import record_flow_result

        for spec in steps:
            step(spec)
        ctx = FlowRunContext.get()
        api_url = str(ctx.client.api_url) if ctx is not None else None
        out: dict[str, object] = {"flow_run_id": flow_run.get_id(), "api_url": api_url, "pid": os.getpid()}
        record_flow_result(out)
        return out

    if args.mode == "raw":
        out = child_flow(args.steps)
    else:
        import flows.prefect_backend as backend

        if args.no_restart:
            backend.MAX_RESTARTS = 0
        out = backend.with_prefect_backend(child_flow)(args.steps)
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
