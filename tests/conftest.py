"""Shared fixtures: tiny random Llama checkpoints, a moto S3 server, sqlite MLflow, Prefect's harness.

Everything binds to 127.0.0.1 and every server a fixture starts is stopped by it.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test-process environment: offline, no telemetry, isolated homes. Set before anything imports prefect/mlflow.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="quantpipe-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # loaded CI machines
os.environ["QUANTPIPE_HOME"] = str(_SESSION_TMP / "quantpipe-home")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("QUANTPIPE_STORE_URL", None)
os.environ.pop("QUANTPIPE_CONFIG", None)

# Prefect sets up its console log handler when first imported, binding the sys.stderr of that moment. Imported here
# it binds pytest's session-long capture stream; first imported inside a CliRunner.invoke it would bind that
# invocation's stream, closed right after, and every later Prefect log line in the session would fail
# ("I/O operation on closed file", then RecursionError in threaded flow runs).
import prefect  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams() -> Iterator[None]:
    """Prefect re-runs its logging set-up from scratch when an incremental update fails (ephemeral-server start,
    ``prefect`` CLI), re-binding its console handler to whatever sys.stderr is then — a CliRunner's or a capture
    fixture's stream, closed when that test ends. Re-point such handlers at the session's stderr after each test."""
    yield
    import logging

    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for handler in {h for lg in loggers for h in lg.handlers}:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
            handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
            console = getattr(handler, "console", None)
            if console is not None:
                console.file = sys.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port>; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the moto server (state reset around each test)."""
    import boto3
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    client.create_bucket(Bucket="quantpipe-test")
    yield "quantpipe-test"
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)


@pytest.fixture
def settings(tmp_path: Path):
    """Settings rooted in a per-test home: local store, sqlite MLflow under tmp_path."""
    from infra.settings import Settings

    return Settings(home=tmp_path / "home")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A real HF checkpoint dir of a tiny random Llama (2 layers, hidden 64) with a tiny tokenizer."""
    from tests.helpers.models import build_tiny_llama

    return build_tiny_llama(_SESSION_TMP / "tiny-llama")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect backend for the whole session (starting one costs ~10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
