"""Integrity against a hostile store: forged manifests, path traversal, stale staging.

An outside test rewrote a payload together with its manifest (sha256, size, digest) and the store accepted it; a
manifest planted in a bucket with ``../`` paths made a reader write outside its cache. Each case here failed
before the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.errors import ConfigError, CorruptArtifactError
from infra.keys import ArtifactRef, artifact_key
from infra.manifest import MANIFEST_NAME, Manifest, check_relative_path
from infra.settings import Settings
from infra.store import ArtifactStore, LocalStore, open_store
from infra.store.base import OWNER_FILE, STALE_AFTER_S, make_staging_dir, sweep_stale_staging


def _put(store: ArtifactStore, stage: str, n: int, payload: bytes, inputs: dict[str, str] | None = None) -> str:
    key = artifact_key(stage, 1, {"n": n}, inputs or {})
    store.put(stage, key, {"data.bin": payload}, stage_version=1, config={"n": n}, inputs=inputs or {})
    return f"{stage}/{key}"


def _forge(root: Path, ref: str, payload: bytes, *, edit: Any = None, digest: bool = True) -> None:
    """What the outside tester did: new payload, manifest rewritten to match it (sha256, size, digest)."""
    import hashlib

    adir = root / "artifacts" / ref
    raw = json.loads((adir / MANIFEST_NAME).read_text())
    entry = raw["files"][0]
    (adir / entry["path"]).write_bytes(payload)
    entry["sha256"], entry["size"] = hashlib.sha256(payload).hexdigest(), len(payload)
    if edit is not None:
        edit(raw)
    manifest = Manifest.model_validate({**raw, "digest": None, "signature": None})
    out = json.loads(manifest.to_bytes())
    if not digest:
        out.pop("digest")
    (adir / MANIFEST_NAME).write_text(json.dumps(out))


def _local(tmp_path: Path, key: str | None = None) -> LocalStore:
    store = open_store((tmp_path / "store").as_uri(), Settings(home=tmp_path / "home", store_signing_key=key))
    assert isinstance(store, LocalStore)
    return store


def test_manifest_without_digest_is_corrupt(tmp_path: Path) -> None:
    store = _local(tmp_path)
    ref = _put(store, "calibration", 1, b"honest")
    _forge(store.root, ref, b"forged", digest=False)
    report = store.verify(ref)
    assert not report.ok and "no digest" in report.problems[0]
    with pytest.raises(CorruptArtifactError, match="no digest"):
        store.get(ref)


def test_forged_config_does_not_match_key(tmp_path: Path) -> None:
    store = _local(tmp_path)
    ref = _put(store, "calibration", 1, b"honest")
    _forge(store.root, ref, b"honest", edit=lambda m: m["config"].update(n=2))
    with pytest.raises(CorruptArtifactError, match="do not hash to its key"):
        store.get(ref)
    assert not store.verify(ref).ok


def test_forged_input_is_caught_through_its_consumer(tmp_path: Path) -> None:
    """Payload + manifest rewritten consistently: the artifact alone looks fine, its consumer's link does not."""
    store = _local(tmp_path)
    qlayer = _put(store, "qlayer", 1, b"weights")
    pack = _put(store, "pack", 2, b"packed", {"quantize": qlayer})
    assert store.manifest(pack).links == {qlayer: store.manifest(qlayer).content_digest()}
    _forge(store.root, qlayer, b"forged weights")
    assert store.verify(qlayer).ok  # nothing but a key or a consumer can tell
    report = store.verify(pack)
    assert not report.ok and report.changed_links == [qlayer]
    assert "changed after it was consumed" in report.problems[0]


def test_signing_key_rejects_any_forged_manifest(tmp_path: Path) -> None:
    key = "k" * 32
    store = _local(tmp_path, key)
    ref = _put(store, "qlayer", 1, b"weights")
    assert store.verify(ref).ok
    assert json.loads((store.root / "artifacts" / ref / MANIFEST_NAME).read_text())["signature"]
    _forge(store.root, ref, b"forged")
    fresh = _local(tmp_path, key)
    with pytest.raises(CorruptArtifactError, match="QUANTPIPE_STORE_SIGNING_KEY"):
        fresh.get(ref)
    other_key = _local(tmp_path, "x" * 32)
    honest = _put(store, "qlayer", 2, b"weights")
    assert not other_key.verify(honest).ok
    assert _local(tmp_path).verify(honest).ok  # without a key, signatures are not required


def test_signing_key_too_short_is_a_setting_error(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(home=tmp_path, store_signing_key="short")


@pytest.mark.parametrize(
    "path",
    ["../escape.txt", "../../../../tmp/x", "/etc/passwd", "a/../../b", "a//b", "./a", "C:/x", "a\\..\\b", "a/\x00"],
)
def test_manifest_paths_are_validated(path: str) -> None:
    with pytest.raises(ValueError):
        check_relative_path(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b.bin", "..", ".", "", "/", "x/y"]), min_size=1, max_size=5))
def test_accepted_paths_stay_inside_the_root(parts: list[str]) -> None:
    candidate = "/".join(parts)
    root = Path("/srv/artifact")
    try:
        check_relative_path(candidate)
    except ValueError:
        return
    assert (root / candidate).resolve().is_relative_to(root)


def test_local_manifest_with_traversal_is_corrupt(tmp_path: Path) -> None:
    store = _local(tmp_path)
    ref = _put(store, "calibration", 1, b"x")
    (tmp_path / "secret.txt").write_text("outside")
    mpath = store.root / "artifacts" / ref / MANIFEST_NAME
    raw = json.loads(mpath.read_text())
    raw["files"][0]["path"] = "../../../../secret.txt"
    mpath.write_text(json.dumps(raw))
    with pytest.raises(CorruptArtifactError, match="unreadable"):
        store.get(ref)
    assert not store.verify(ref).ok


def test_s3_planted_manifest_never_writes_outside_the_cache(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    settings_ = Settings(home=tmp_path / "home", s3_endpoint_url=moto_server, s3_max_attempts=1)
    store = open_store(f"s3://{s3_bucket}/planted", settings_)
    ref = ArtifactRef(_put(store, "calibration", 1, b"honest"))
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    mkey = f"planted/artifacts/{ref.stage}/{ref.key}/{MANIFEST_NAME}"
    raw = json.loads(client.get_object(Bucket=s3_bucket, Key=mkey)["Body"].read())
    target = tmp_path / "pwned.txt"
    depth = len((tmp_path / "home" / "cache").parts) + 8
    planted = "/".join([".."] * depth) + str(target)
    client.put_object(Bucket=s3_bucket, Key=planted.lstrip("/"), Body=b"pwned")
    raw["files"][0]["path"] = planted
    client.put_object(Bucket=s3_bucket, Key=mkey, Body=json.dumps(raw).encode())
    cold = open_store(f"s3://{s3_bucket}/planted", Settings(home=tmp_path / "cold", s3_endpoint_url=moto_server))
    with pytest.raises(CorruptArtifactError):
        cold.get(ref)
    assert not cold.verify(ref).ok
    assert not target.exists()


def _dead_owner() -> dict[str, Any]:
    """The owner record of a process that has exited."""
    out = subprocess.run(
        [sys.executable, "-c", "import json; from infra.store.base import _owner_record as o; print(json.dumps(o()))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    owner: dict[str, Any] = json.loads(out.stdout)
    return owner


def test_stale_staging_of_dead_writers_is_swept(tmp_path: Path) -> None:
    root = tmp_path / ".staging"
    live = make_staging_dir(root, "live-")
    dead = make_staging_dir(root, "dead-")
    (dead / OWNER_FILE).write_text(json.dumps(_dead_owner()))
    (dead / "half-written.bin").write_bytes(b"x" * 10)
    legacy_old = root / "legacy-old"
    legacy_old.mkdir()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(legacy_old, (old, old))
    legacy_new = root / "legacy-new"
    legacy_new.mkdir()
    foreign = make_staging_dir(root, "foreign-")
    (foreign / OWNER_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "0"}))
    removed = sweep_stale_staging(root)
    assert sorted(p.name for p in removed) == sorted([dead.name, legacy_old.name])
    assert live.is_dir() and legacy_new.is_dir() and foreign.is_dir()


def test_first_write_sweeps_a_killed_runs_staging(tmp_path: Path) -> None:
    store = _local(tmp_path)
    leftover = make_staging_dir(store.staging_root(), "qlayer-abc-")
    (leftover / OWNER_FILE).write_text(json.dumps(_dead_owner()))
    _put(store, "calibration", 1, b"x")
    assert not leftover.exists()
    assert list(store.staging_root().iterdir()) == []  # the writer's own staging is gone too
    committed = store.root / "artifacts" / "calibration"
    assert not list(committed.rglob(OWNER_FILE))  # the owner marker never enters an artifact


def test_writer_refuses_a_key_its_config_does_not_hash_to(tmp_path: Path) -> None:
    store = _local(tmp_path)
    with (
        pytest.raises(ConfigError, match="key does not match"),
        store.writer("calibration", "0" * 64, stage_version=1, config={}),
    ):
        pass


def test_writer_refuses_symlinked_files(tmp_path: Path) -> None:
    store = _local(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("credentials")
    key = artifact_key("calibration", 1, {}, {})
    with pytest.raises(ConfigError, match="symlink"), store.writer("calibration", key, stage_version=1, config={}) as w:
        w.path("tok/tokenizer.json").symlink_to(secret)


def _stage_ctx(tmp_path: Path) -> Any:
    from tasks.stage import StageContext

    settings_ = Settings(home=tmp_path / "home")
    return StageContext(settings=settings_, store_url=(tmp_path / "store").as_uri(), progress=False)


def test_index_with_a_forged_part_is_rebuilt_without_it(tmp_path: Path) -> None:
    """The outside test's case: a per-layer artifact rewritten with its manifest must not be reused by the index
    stage, nor adopted when the stage recomputes."""
    from tasks.stage import ensure_artifact

    ctx = _stage_ctx(tmp_path)
    produced: list[str] = []

    def part(n: int) -> str:
        def produce(w: Any, _run: Any) -> None:
            produced.append(f"part{n}")
            w.add_bytes("data.bin", f"honest {n}".encode())

        ref, _ = ensure_artifact(ctx, "qlayer", 1, {"n": n}, {}, produce)
        return str(ref)

    def index() -> tuple[str, bool]:
        def produce(w: Any, _run: Any) -> None:  # as the quantize stage does: parts inside the index's producer
            parts = [part(0), part(1)]
            produced.append("index")
            w.add_bytes("index.json", json.dumps({"layers": parts}).encode())

        ref, hit = ensure_artifact(ctx, "quantize", 1, {}, {}, produce)
        return str(ref), hit

    ref, hit = index()
    assert not hit and produced == ["part0", "part1", "index"]
    parts = json.loads(ctx.store.read_bytes(ref, "index.json"))["layers"]
    assert set(ctx.store.manifest(ref).links) == set(parts)
    _forge(ctx.store.root, parts[1], b"forged 1")
    produced.clear()
    ref2, hit = index()
    assert ref2 == ref and not hit
    assert produced == ["part1", "index"]  # the forged part was discarded and recomputed, never adopted
    assert ctx.store.read_bytes(parts[1], "data.bin") == b"honest 1"
    assert ctx.store.verify(ref).ok


def test_consumer_of_a_changed_input_is_recomputed(tmp_path: Path) -> None:
    """An evaluation cached for other weights must not be reported for the weights there are now."""
    from tasks.stage import ensure_artifact

    ctx = _stage_ctx(tmp_path)
    pack = _put(ctx.store, "pack", 1, b"weights")
    calls: list[bytes] = []

    def evaluate() -> bool:
        def produce(w: Any, _run: Any) -> None:
            weights = ctx.store.read_bytes(pack, "data.bin")
            calls.append(weights)
            w.metadata["ppl"] = float(len(weights))

        _ref, hit = ensure_artifact(ctx, "evaluate", 1, {}, {"pack": pack}, produce)
        return hit

    assert not evaluate() and evaluate()
    _forge(ctx.store.root, pack, b"altered weights")
    assert not evaluate()
    assert calls == [b"weights", b"altered weights"]


def test_a_full_disk_reported_by_a_non_python_writer_is_a_store_error(tmp_path: Path) -> None:
    """safetensors' serializer raises SafetensorError('... No space left on device (os error 28)'), not OSError:
    it must still become the one-line disk-full error (a CI run hit it mid-flow and printed 'unexpected')."""
    from infra.errors import StoreError

    class SafetensorError(Exception):
        pass

    store = _local(tmp_path)
    key = artifact_key("calibration", 1, {}, {})
    with (
        pytest.raises(StoreError, match="no space left on device"),
        store.writer("calibration", key, stage_version=1, config={}),
    ):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError, match="unrelated"), store.writer("calibration", key, stage_version=1, config={}):
        raise ValueError("unrelated")
