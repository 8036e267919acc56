"""Store faults: transient ones are absorbed by retries with backoff, permanent ones fail with one clear line,
and no fault ever leaves a manifest for an incomplete artifact.

S3 faults are injected into a moto server on 127.0.0.1 with botocore ``before-send`` hooks (a 503/500 answer,
a dropped connection, a read timeout, a slow answer) or by really stopping the server / revoking credentials
(moto's IAM simulation). Local faults use a real 2 MiB tmpfs (disk full), a read-only tmpfs and a file in place
of the store directory (permission denied; root ignores mode bits).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from infra.errors import StoreError, StoreUnreachableError
from infra.keys import artifact_key
from infra.settings import Settings
from infra.store import LocalStore, S3Store, open_store
from tests.conftest import free_port
from tests.reliability.harness import record

MIB = 1 << 20


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def _error_response(request: Any, status: int, code: str) -> Any:
    from botocore.awsrequest import AWSResponse

    body = f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>injected</Message></Error>'.encode()
    return AWSResponse(request.url, status, {}, _Raw(body))


class Injector:
    """A before-send hook: the first ``times`` matching requests get ``fault`` (``times=None``: all of them)."""

    def __init__(self, fault: str, times: int | None, *, delay: float = 0.0) -> None:
        self.fault, self.times, self.delay = fault, times, delay
        self.calls = 0
        self.injected = 0
        self._lock = threading.Lock()

    def __call__(self, request: Any, **_: Any) -> Any:
        with self._lock:
            self.calls += 1
            hit = self.times is None or self.injected < self.times
            if hit:
                self.injected += 1
        if not hit:
            return None
        if self.fault == "503":
            return _error_response(request, 503, "SlowDown")
        if self.fault == "500":
            return _error_response(request, 500, "InternalError")
        if self.fault == "drop":
            from botocore.exceptions import ConnectionClosedError

            raise ConnectionClosedError(endpoint_url=request.url)
        if self.fault == "read-timeout":
            from botocore.exceptions import ReadTimeoutError

            raise ReadTimeoutError(endpoint_url=request.url)
        if self.fault == "slow":
            time.sleep(self.delay)
            return None
        raise AssertionError(self.fault)


def _s3(endpoint: str, bucket: str, tmp: Path, **kw: Any) -> S3Store:
    kw.setdefault("max_attempts", 5)
    return S3Store(f"s3://{bucket}/faults", cache_dir=tmp / "cache", endpoint_url=endpoint, region="us-east-1", **kw)


def _put(store: Any, n: int, size: int = 1024) -> str:
    key = artifact_key("calibration", 1, {"n": n}, {})
    store.put("calibration", key, {"data.bin": os.urandom(size), "meta.json": b"{}"}, stage_version=1, config={"n": n})
    return f"calibration/{key}"


def _objects(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _no_incomplete_manifest(store: Any) -> None:
    """Every manifest in the store belongs to an artifact whose files all verify."""
    for ref in store.list():
        assert store.verify(ref).ok, ref


def _record(test: str, injected: int, survived: bool, outcome: str) -> None:
    record("fault", test, injected=injected, survived=injected if survived else 0, outcome=outcome)


# --------------------------------------------------------------------------------------------------- S3: transient
@pytest.mark.parametrize(
    ("fault", "op", "times"),
    [
        ("503", "PutObject", 2),
        ("500", "PutObject", 3),
        ("503", "GetObject", 2),
        ("500", "GetObject", 2),
        ("drop", "PutObject", 2),
        ("read-timeout", "GetObject", 2),
        ("503", "ListObjectsV2", 2),
        ("503", "HeadBucket", 2),
    ],
)
def test_transient_s3_faults_are_absorbed(
    moto_server: str, s3_bucket: str, tmp_path: Path, fault: str, op: str, times: int
) -> None:
    store = _s3(moto_server, s3_bucket, tmp_path)
    hook = Injector(fault, times)
    store.client.meta.events.register(f"before-send.s3.{op}", hook)
    store.check()
    ref = _put(store, 1)
    fresh = _s3(moto_server, s3_bucket, tmp_path / "cold")
    fresh.client.meta.events.register(f"before-send.s3.{op}", hook)
    assert fresh.get(ref).read_bytes("meta.json") == b"{}"
    assert fresh.list() == [ref]
    assert hook.injected == times, f"{op}: the fault was never triggered"
    _no_incomplete_manifest(store)
    _record(f"s3-transient-{fault}-{op}", hook.injected, True, "absorbed by retries")


def test_throttled_multipart_upload_is_absorbed(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = _s3(moto_server, s3_bucket, tmp_path, multipart_threshold_mb=5)
    store._transfer.multipart_chunksize = 5 * MIB
    hook = Injector("503", 3)
    store.client.meta.events.register("before-send.s3.UploadPart", hook)
    ref = _put(store, 2, size=12 * MIB)
    assert hook.injected == 3
    assert _s3(moto_server, s3_bucket, tmp_path / "cold").verify(ref).ok
    _record("s3-throttled-multipart", hook.injected, True, "absorbed by retries")


def test_slow_s3_answers_still_complete(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = _s3(moto_server, s3_bucket, tmp_path, read_timeout=5)
    hook = Injector("slow", None, delay=0.2)
    store.client.meta.events.register("before-send.s3", hook)
    ref = _put(store, 3)
    assert store.verify(ref).ok
    _record("s3-slow-answers", hook.injected, True, "completed (slow)")


# --------------------------------------------------------------------------------------------------- S3: permanent
@pytest.mark.parametrize("op", ["PutObject", "UploadPart", "CreateMultipartUpload"])
def test_persistent_503_fails_clearly_without_manifest(moto_server: str, s3_bucket: str, tmp_path: Path, op: str):
    store = _s3(moto_server, s3_bucket, tmp_path, max_attempts=3, multipart_threshold_mb=5)
    store._transfer.multipart_chunksize = 5 * MIB
    hook = Injector("503", None)
    store.client.meta.events.register(f"before-send.s3.{op}", hook)
    with pytest.raises(StoreUnreachableError, match="kept failing with SlowDown.*QUANTPIPE_S3_MAX_ATTEMPTS") as info:
        _put(store, 4, size=12 * MIB if op != "PutObject" else 1024)
    assert "\n" not in str(info.value)
    assert hook.injected >= 3  # retried before giving up
    assert store.list() == []
    assert [k for k in _objects(moto_server, s3_bucket) if k.endswith("manifest.json")] == []
    assert list(store.staging_root().iterdir()) == []  # staged files cleaned up
    _record(f"s3-persistent-503-{op}", hook.injected, True, "clear failure, no manifest")


def test_persistent_read_timeout_fails_clearly(s3_bucket: str, tmp_path: Path) -> None:
    """A real black-hole endpoint: it accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        store = _s3(f"http://127.0.0.1:{port}", s3_bucket, tmp_path, max_attempts=2, read_timeout=0.5)
        started = time.perf_counter()
        with pytest.raises(StoreUnreachableError, match="did not answer in time"):
            _put(store, 5)
        assert time.perf_counter() - started < 30
    _record("s3-black-hole-read-timeout", 2, True, "clear failure, no manifest")


@contextmanager
def _own_moto() -> Iterator[tuple[Any, str]]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_server_stopped_mid_upload(tmp_path: Path) -> None:
    """The S3 server really goes away during a multipart upload; after it is back the retry succeeds."""
    import boto3

    with _own_moto() as (server, endpoint):
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="midupload")
        store = _s3(endpoint, "midupload", tmp_path, max_attempts=2, multipart_threshold_mb=5, connect_timeout=1)
        store._transfer.multipart_chunksize = 5 * MIB
        store._transfer.max_request_concurrency = 1
        stopped = threading.Event()

        def stop_server(request: Any, **_: Any) -> None:
            if not stopped.is_set():
                stopped.set()
                server.stop()

        store.client.meta.events.register("before-send.s3.UploadPart", stop_server)
        with pytest.raises(StoreUnreachableError, match="cannot reach S3 endpoint") as info:
            _put(store, 6, size=16 * MIB)
        assert "\n" not in str(info.value)
        assert stopped.is_set()
        server.start()  # moto keeps its state across a restart on the same port
        fresh = _s3(endpoint, "midupload", tmp_path / "after")
        assert fresh.list() == []
        assert [k for k in _objects(endpoint, "midupload") if k.endswith("manifest.json")] == []
        ref = _put(fresh, 6, size=6 * MIB)
        assert fresh.verify(ref).ok
    _record("s3-server-stopped-mid-upload", 1, True, "clear failure, no manifest; retry after restart succeeded")


def test_revoked_credentials_fail_clearly(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    from moto.core.authorization import enable_iam_authentication

    store = _s3(moto_server, s3_bucket, tmp_path)
    ref = _put(store, 7)
    settings = Settings(
        home=tmp_path / "home",
        s3_endpoint_url=moto_server,
        aws_access_key_id="fake-revoked-key-id",
        aws_secret_access_key="revoked-secret-value-123",
    )
    with enable_iam_authentication():  # moto now checks keys: ours are unknown, as after a revocation
        revoked = open_store(f"s3://{s3_bucket}/faults", settings)
        for action in (revoked.check, lambda: _put(revoked, 8), lambda: revoked.get(ref)):
            with pytest.raises(StoreUnreachableError, match="refused the credentials.*fix the AWS credentials") as e:
                action()
            assert "revoked-secret-value-123" not in str(e.value)
    assert store.list() == [ref]  # nothing half-written by the refused calls
    _no_incomplete_manifest(store)
    _record("s3-credentials-revoked", 3, True, "clear failure")


def test_missing_bucket_and_unreachable_endpoint(moto_server: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        _s3(moto_server, "no-such-bucket", tmp_path).check()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnreachableError, match="cannot reach S3 endpoint"):
        _s3(dead, "whatever", tmp_path, max_attempts=1, connect_timeout=1).check()
    _record("s3-missing-bucket-and-dead-endpoint", 2, True, "clear failure")


# --------------------------------------------------------------------------------------------------- local disk
@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except OSError:
        pytest.skip("mount is not available")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_fails_clearly_and_cleans_up(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "size=2m") as mnt:
        store = LocalStore(mnt / "store")
        store.check()
        small = _put(store, 10, size=64 * 1024)
        with pytest.raises(StoreError, match="no space left on device.*QUANTPIPE_HOME") as info:
            _put(store, 11, size=3 * MIB)
        assert "\n" not in str(info.value)
        assert store.list() == [small]
        assert list(store.staging_root().iterdir()) == []  # the partial staging dir is gone
        assert store.verify(small).ok
        again = _put(store, 12, size=512 * 1024)  # the space came back
        assert store.verify(again).ok
    _record("local-disk-full", 1, True, "clear failure, staging cleaned, no manifest")


def test_disk_full_during_commit_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing the manifest itself (the very last write): still no artifact, staging removed."""
    store = LocalStore(tmp_path / "store")
    real_open = Path.open

    def failing_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.name == "manifest.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(StoreError, match="no space left"):
        _put(store, 13)
    monkeypatch.undo()
    assert store.list() == []
    assert list(store.staging_root().iterdir()) == []
    _record("local-disk-full-at-commit", 1, True, "clear failure, no manifest")


def test_read_only_store_fails_clearly(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        store = LocalStore(mnt / "store")
        with pytest.raises(StoreError, match="not writable"):
            store.check()
        with pytest.raises(StoreError, match="cannot write artifact|not writable"):
            _put(store, 14)
    _record("local-read-only", 2, True, "clear failure")


def test_file_in_place_of_store_dir_fails_clearly(tmp_path: Path) -> None:
    """Permission-style failure that root cannot bypass: the store path is a regular file."""
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    store = LocalStore(blocker)
    with pytest.raises(StoreError, match="not writable"):
        store.check()
    with pytest.raises(StoreError, match="cannot write artifact"):
        _put(store, 15)
    assert blocker.read_text() == "not a directory"
    _record("local-file-instead-of-dir", 2, True, "clear failure")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_permission_denied_for_unprivileged_user(tmp_path: Path) -> None:
    """A real EACCES: a child process running as 'nobody' against a root-owned store."""
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    root = tmp_path / "store"
    LocalStore(root).check()
    os.chmod(tmp_path, 0o755)
    script = (
        "import sys; from infra.store import LocalStore; from infra.errors import StoreError\n"
        f"s = LocalStore({str(root)!r})\n"
        "try:\n    s.check()\nexcept StoreError as e:\n    print('CLEAR', e); sys.exit(3)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run
    try:
        done = run(
            [os.fspath(Path(os.sys.executable)), "-c", script],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            capture_output=True,
            text=True,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            timeout=60,
        )
    except PermissionError:
        pytest.skip("'nobody' cannot execute this virtualenv's python")
    if done.returncode not in (3,) and "Permission denied" not in done.stderr + done.stdout:
        pytest.skip(f"could not run as nobody: {done.stderr[-300:]}")
    assert done.returncode == 3 and "CLEAR" in done.stdout and "not writable" in done.stdout, done
    _record("local-permission-denied-nobody", 1, True, "clear failure")


# --------------------------------------------------------------------------------------------------- pipeline level
def _patch_s3(monkeypatch: pytest.MonkeyPatch, install: Callable[[S3Store], None]) -> None:
    original = S3Store.__init__

    def patched(self: S3Store, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        install(self)

    monkeypatch.setattr(S3Store, "__init__", patched)


@pytest.mark.slow
def test_pipeline_on_flaky_s3_matches_reference(
    prefect_harness: None,
    reference: Any,
    rel_inputs: Any,
    moto_server: str,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole flow against an S3 that answers 503 to every 6th request: retries absorb it all."""
    from flows.quantize import quantize_model
    from infra.settings import get_settings
    from tasks.recipe import load_recipe

    counter = {"n": 0, "injected": 0}
    lock = threading.Lock()

    def flaky(request: Any, **_: Any) -> Any:
        with lock:
            counter["n"] += 1
            if counter["n"] % 6:
                return None
            counter["injected"] += 1
        return _error_response(request, 503, "SlowDown")

    _patch_s3(monkeypatch, lambda s: s.client.meta.events.register("before-send.s3", flaky))
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTPIPE_WIKITEXT_DIR", str(rel_inputs.wikitext_dir))
    monkeypatch.setenv("QUANTPIPE_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("QUANTPIPE_STORE_URL", f"s3://{s3_bucket}/flaky")
    settings = get_settings(refresh=True)
    try:
        out = quantize_model(str(rel_inputs.model_dir), load_recipe(rel_inputs.recipe))
    finally:
        monkeypatch.undo()
        get_settings(refresh=True)
    assert out["metrics"]["ppl"] == reference.outcome["metrics"]["ppl"]
    store = open_store(f"s3://{s3_bucket}/flaky", Settings(home=tmp_path / "check", s3_endpoint_url=moto_server))
    files = {str(r): tuple(sorted((f.name, f.sha256, f.size) for f in store.manifest(r).files)) for r in store.list()}
    assert files == reference.files
    assert counter["injected"] >= 5
    del settings
    _record("pipeline-on-flaky-s3", counter["injected"], True, "absorbed; artifacts identical to reference")


def test_cli_on_dead_s3_fails_with_one_line(
    moto_server: str, s3_bucket: str, rel_inputs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quantpipe quantize` against an S3 that answers 503 forever: exit 2, one line, nothing committed."""
    from typer.testing import CliRunner

    from flows.cli import app

    _patch_s3(monkeypatch, lambda s: s.client.meta.events.register("before-send.s3", Injector("503", None)))
    monkeypatch.setenv("QUANTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTPIPE_S3_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("QUANTPIPE_S3_MAX_ATTEMPTS", "2")
    result = CliRunner().invoke(
        app,
        ["quantize", "-m", str(rel_inputs.model_dir), "-r", str(rel_inputs.recipe), "--store", f"s3://{s3_bucket}/x"],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "kept failing with SlowDown" in result.output
    assert _objects(moto_server, s3_bucket) == []
    _record("cli-on-dead-s3", 1, True, "clear one-line failure")
