"""The store contract, run identically against the local and the moto-S3 backend."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest

from infra.errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError
from infra.keys import ArtifactRef, artifact_key
from infra.settings import Settings
from infra.store import ArtifactStore, LocalStore, S3Store, open_store


def _key(n: int = 0, stage: str = "calibration", inputs: dict | None = None) -> str:
    return artifact_key(stage, 1, {"n": n}, inputs or {})


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store((tmp_path / "store").as_uri(), Settings(home=tmp_path / "home"))
    endpoint = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("s3_bucket")
    settings = Settings(home=tmp_path / "home", s3_endpoint_url=endpoint, s3_max_attempts=2)
    return open_store(f"s3://{bucket}/team/prefix", settings, check=True)


def _put(store: ArtifactStore, n: int = 0, stage: str = "calibration", inputs=None, payload=b"hello") -> str:
    key = _key(n, stage, inputs)
    store.put(
        stage,
        key,
        {"data.bin": payload, "meta.json": b"{}"},
        stage_version=1,
        config={"n": n},
        inputs=inputs or {},
        metadata={"rows": n},
    )
    return f"{stage}/{key}"


def test_put_get_roundtrip(store: ArtifactStore) -> None:
    ref = _put(store)
    assert store.exists(ref)
    art = store.get(ref)
    assert art.read_bytes("data.bin") == b"hello"
    assert art.manifest.metadata == {"rows": 0}
    assert art.manifest.config == {"n": 0}
    assert sorted(art.manifest.file_names()) == ["data.bin", "meta.json"]
    assert store.read_bytes(ref, "meta.json") == b"{}"
    assert store.verify(ref).ok


def test_missing_artifact(store: ArtifactStore) -> None:
    ref = f"calibration/{_key(99)}"
    assert not store.exists(ref)
    with pytest.raises(ArtifactNotFoundError, match="no artifact calibration/"):
        store.get(ref)
    assert not store.verify(ref).ok


def test_list_and_delete(store: ArtifactStore) -> None:
    a = _put(store, 1)
    b = _put(store, 2, stage="hessians")
    assert store.list() == sorted([ArtifactRef(a), ArtifactRef(b)])
    assert store.list("hessians") == [ArtifactRef(b)]
    store.delete(a)
    assert not store.exists(a)
    assert store.list() == [ArtifactRef(b)]
    with pytest.raises(ArtifactNotFoundError):
        store.delete(a)


def test_lineage_walks_all_ancestors(store: ArtifactStore) -> None:
    cal = _put(store, 1, "calibration")
    model = _put(store, 2, "model")
    hes = _put(store, 3, "hessians", inputs={"calibration": cal, "model": model})
    q = _put(store, 4, "quantize", inputs={"hessians": hes, "model": model})
    refs = [m.ref for m in store.lineage(q)]
    assert refs[0] == q
    assert set(refs) == {q, hes, model, cal}
    assert len(refs) == 4  # the shared ancestor is listed once


def test_second_put_same_key_keeps_first(store: ArtifactStore) -> None:
    ref = _put(store, 5, payload=b"first")
    _put(store, 5, payload=b"second")
    assert store.read_bytes(ref, "data.bin") == b"first"


def test_failed_producer_leaves_nothing(store: ArtifactStore) -> None:
    key = _key(7)
    with pytest.raises(RuntimeError), store.writer("calibration", key, stage_version=1, config={"n": 7}) as w:
        w.add_bytes("partial.bin", b"x" * 100)
        raise RuntimeError("producer crashed")
    assert not store.exists(f"calibration/{key}")
    assert store.list() == []


def test_large_file_multipart(store: ArtifactStore, tmp_path: Path) -> None:
    if isinstance(store, S3Store):
        from boto3.s3.transfer import TransferConfig

        store._transfer = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    key = _key(11)
    store.put("calibration", key, {"big.bin": big}, stage_version=1, config={"n": 11})
    assert store.get(f"calibration/{key}").file("big.bin").read_bytes() == big.read_bytes()


def _corrupt(store: ArtifactStore, ref: str, name: str, how: str) -> None:
    manifest = store.manifest(ref)
    entry = manifest.file(name)
    if isinstance(store, LocalStore):
        path = store._dir(manifest.stage, manifest.key) / entry.path
        data = path.read_bytes()
        if how == "flip":
            path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
        elif how == "truncate":
            path.write_bytes(data[:-1])
        elif how == "delete":
            path.unlink()
    else:
        obj = store._obj(manifest.stage, manifest.key, entry.path)
        data = store.client.get_object(Bucket=store.bucket, Key=obj)["Body"].read()
        if how == "flip":
            store.client.put_object(Bucket=store.bucket, Key=obj, Body=bytes([data[0] ^ 0xFF]) + data[1:])
        elif how == "truncate":
            store.client.put_object(Bucket=store.bucket, Key=obj, Body=data[:-1])
        elif how == "delete":
            store.client.delete_object(Bucket=store.bucket, Key=obj)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_corruption_detected_on_read_and_verify(store: ArtifactStore, how: str) -> None:
    ref = _put(store, 20, payload=b"payload-bytes")
    _corrupt(store, ref, "data.bin", how)
    report = store.verify(ref)
    assert not report.ok and "data.bin" in report.problems[0]
    with pytest.raises(CorruptArtifactError, match=r"calibration/[0-9a-f]{64}.*data\.bin"):
        store.get(ref)


def test_edited_manifest_detected(store: ArtifactStore) -> None:
    ref = _put(store, 21)
    manifest = store.manifest(ref)
    raw = json.loads(manifest.to_bytes())
    raw["files"][0]["sha256"] = "0" * 64
    body = json.dumps(raw).encode()
    if isinstance(store, LocalStore):
        (store._dir(manifest.stage, manifest.key) / "manifest.json").write_bytes(body)
    else:
        store.client.put_object(
            Bucket=store.bucket, Key=store._obj(manifest.stage, manifest.key, "manifest.json"), Body=body
        )
    assert not store.verify(ref).ok
    with pytest.raises(CorruptArtifactError):
        store.get(ref)


def test_unreadable_manifest(store: ArtifactStore) -> None:
    ref = ArtifactRef(_put(store, 22))
    if isinstance(store, LocalStore):
        (store._dir(ref.stage, ref.key) / "manifest.json").write_bytes(b"{not json")
    else:
        store.client.put_object(
            Bucket=store.bucket, Key=store._obj(ref.stage, ref.key, "manifest.json"), Body=b"{not json"
        )
    with pytest.raises(CorruptArtifactError, match="manifest.json is unreadable"):
        store.get(ref)


def test_concurrent_writers_threads(store: ArtifactStore) -> None:
    key = _key(30)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            payload = {"data.bin": f"writer-{i}".encode() * 1000}
            m = store.put("calibration", key, payload, stage_version=1, config={"n": 30})
            results.append(m.files[0].sha256.encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1, "every writer must see the same committed artifact"
    art = store.get(f"calibration/{key}")
    data = art.read_bytes("data.bin")
    assert data.startswith(b"writer-") and data == data[:8] * 1000


def _proc_writer(root: str, key: str, i: int, barrier) -> None:
    store = LocalStore(Path(root))
    barrier.wait()
    store.put("calibration", key, {"data.bin": f"proc-{i}".encode() * 50_000}, stage_version=1, config={"n": 31})


def test_concurrent_writers_processes(tmp_path: Path) -> None:
    key = _key(31)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_proc_writer, args=(str(tmp_path / "s"), key, i, barrier)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = LocalStore(tmp_path / "s")
    data = store.read_bytes(f"calibration/{key}", "data.bin")
    assert data == data[:6] * 50_000
    assert store.verify(f"calibration/{key}").ok
    assert not list((tmp_path / "s" / ".staging").iterdir())


def test_bad_file_names_rejected(store: ArtifactStore) -> None:
    for bad in ("../escape", "/abs", "manifest.json", ""):
        with (
            pytest.raises(ConfigError),
            store.writer("calibration", _key(40), stage_version=1, config={"n": 40}) as w,
        ):
            w.add_bytes(bad, b"x")
    assert store.list() == []


@pytest.mark.parametrize("ref", ["calibration/../../etc", "../x/" + "a" * 64, "calibration/ABC", "noslash"])
def test_path_traversal_refs_rejected(store: ArtifactStore, ref: str) -> None:
    with pytest.raises(ConfigError):
        store.get(ref)


def test_delete_survives_trash_emptied_by_another_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parallel deleter's rmtree of ``.trash`` can land between our mkdir and rename; the artifact must still
    leave the tree (it used to stay, and a corrupt one was then trusted as a racing writer's winner)."""
    store = LocalStore(tmp_path / "store")
    ref = _put(store)
    real_rename = os.rename
    calls = {"n": 0}

    def flaky_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the trash directory vanished under us once
            raise FileNotFoundError(dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    store.delete(ref)
    assert calls["n"] == 2
    assert not store.exists(ref)


def test_racing_writer_never_adopts_an_edited_manifest(tmp_path: Path) -> None:
    """Commit finding the final name taken keeps the existing artifact only if it is intact, manifest included."""
    store = LocalStore(tmp_path / "store")
    ref = _put(store, payload=b"first")
    path = tmp_path / "store" / "artifacts" / ArtifactRef(ref).stage / ArtifactRef(ref).key / "manifest.json"
    data = json.loads(path.read_text())
    data["metadata"] = {"rows": 99}
    path.write_text(json.dumps(data))
    assert not store.verify(ref).ok
    store.put(
        "calibration",
        ArtifactRef(ref).key,
        {"data.bin": b"first", "meta.json": b"{}"},
        stage_version=1,
        config={"n": 0},
        inputs={},
        metadata={"rows": 0},
    )
    assert store.verify(ref).ok
    assert store.manifest(ref).metadata == {"rows": 0}
