"""Corruption: damage the artifacts of a real pipeline run; ``verify`` and every read must notice, the pipeline
must recompute instead of using them, and the recomputed bytes must equal the reference run's.

Kinds: a flipped byte, a flipped byte with the old mtime restored (bit rot), a truncated file, a deleted file,
a hand-edited manifest (metadata, config or a file's sha256), an unparsable manifest. Every artifact of the
reference run gets every kind, one at a time, on a private copy of the store (local), plus a sample on S3.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.errors import ArtifactNotFoundError, CorruptArtifactError
from infra.manifest import MANIFEST_NAME
from infra.settings import Settings
from infra.store import ArtifactStore, LocalStore, open_store
from tests.reliability.conftest import Reference
from tests.reliability.harness import (
    ForkServer,
    PipelineInputs,
    compare_stores,
    full_mode,
    manifest_bytes,
    record,
    rerun_without_pack,
    store_files,
    verify_all,
)

KINDS = [
    "flip",
    "bitrot",
    "truncate",
    "delete",
    "manifest-metadata",
    "manifest-config",
    "manifest-sha",
    "manifest-json",
]


def _corrupt(artifact_dir: Path, kind: str, rng: random.Random) -> str:
    """Damage one artifact directory in place; returns what was done."""
    manifest_path = artifact_dir / MANIFEST_NAME
    files = sorted(p for p in artifact_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    target = rng.choice(files)
    if kind in ("flip", "bitrot"):
        st = target.stat()
        data = bytearray(target.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        if kind == "bitrot":  # the disk changed the byte, nobody wrote the file: same size, same mtime
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        return f"{kind} {target.name}@{offset}"
    if kind == "truncate":
        size = target.stat().st_size
        with target.open("r+b") as fh:
            fh.truncate(rng.randrange(size))
        return f"truncate {target.name}"
    if kind == "delete":
        target.unlink()
        return f"delete {target.name}"
    manifest = json.loads(manifest_path.read_text())
    if kind == "manifest-metadata":
        manifest["metadata"]["tampered"] = True
    elif kind == "manifest-config":
        manifest["config"]["tampered"] = 1
    elif kind == "manifest-sha":
        entry = rng.choice(manifest["files"])
        entry["sha256"] = "0" * 64 if entry["sha256"] != "0" * 64 else "1" * 64
    elif kind == "manifest-json":
        manifest_path.write_text(manifest_path.read_text()[:-20])
        return kind
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return kind


def _detected(store_root: Path, ref: str) -> tuple[bool, bool]:
    """(verify noticed, every read noticed) using fresh store objects, as a new process would."""
    store = LocalStore(store_root)
    verify_ok = store.verify(ref).ok
    reads_fail = True
    try:
        art = LocalStore(store_root).get(ref)
        for name in art.manifest.file_names():
            LocalStore(store_root).read_bytes(ref, name)
        reads_fail = False
    except (CorruptArtifactError, ArtifactNotFoundError):
        pass
    return (not verify_ok), reads_fail


def test_every_corruption_is_detected(reference: Reference, tmp_path: Path) -> None:
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    undetected = []
    for ref in sorted(reference.files):
        adir = root / "artifacts" / ref
        backup = tmp_path / "backup"
        shutil.copytree(adir, backup)
        for kind in KINDS:
            what = _corrupt(adir, kind, rng)
            by_verify, by_read = _detected(root, ref)
            counts["injected"] += 1
            counts["detected_by_verify"] += int(by_verify)
            counts["detected_by_every_read"] += int(by_read)
            counts[f"kind:{kind}"] += 1
            if not (by_verify and by_read):
                undetected.append(f"{ref}: {what} (verify {by_verify}, read {by_read})")
            shutil.rmtree(adir)
            shutil.copytree(backup, adir)
        shutil.rmtree(backup)
    assert verify_all(root) == []
    detected = min(counts["detected_by_verify"], counts["detected_by_every_read"])
    record(
        "corruption",
        "local-all-artifacts",
        injected=counts["injected"],
        detected=detected,
        detected_by_verify=counts["detected_by_verify"],
        detected_by_every_read=counts["detected_by_every_read"],
        artifacts=len(reference.files),
        kinds=len(KINDS),
    )
    assert undetected == []
    assert counts["injected"] == len(reference.files) * len(KINDS)


def test_cli_verify_reports_corruption(reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    home = reference.copy_home(tmp_path / "home")
    rng = random.Random(3)
    refs = sorted(reference.files)
    damaged = rng.sample(refs, 4)
    for i, ref in enumerate(damaged):
        _corrupt(home / "store" / "artifacts" / ref, KINDS[i * 2], rng)
    monkeypatch.setenv("QUANTPIPE_HOME", str(home))
    result = CliRunner().invoke(app, ["verify", "--all", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(b["ref"] for b in report["bad"]) == sorted(damaged)
    assert report["checked"] == len(refs)


@pytest.mark.slow
def test_pipeline_recomputes_corrupted_artifacts(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, tmp_path: Path
) -> None:
    """Corrupt every artifact of a finished run (round-robin kinds); the rerun repairs all of them bit-identically."""
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    rng = random.Random(11)
    refs = sorted(reference.files)
    for i, ref in enumerate(refs):
        _corrupt(root / "artifacts" / ref, KINDS[i % len(KINDS)], rng)
    assert len(verify_all(root)) >= len(refs) - sum(1 for i in range(len(refs)) if KINDS[i % len(KINDS)] == "delete")
    (rerun,) = forks.run([rel_inputs.job(home, tmp_path / "rerun.log")])
    assert rerun.rc == 0, rerun.tail()
    outcome = rerun.outcome()
    assert outcome is not None
    assert not any(s["cache_hit"] for name, s in outcome["stages"].items() if name != "register")
    assert verify_all(root) == []
    assert compare_stores(reference.files, store_files(root)) == []
    assert outcome["model_version"] == reference.outcome["model_version"]  # same build: no duplicate version
    record("corruption", "pipeline-recompute", injected=len(refs), detected=len(refs), recomputed=len(refs))


@pytest.mark.slow
def test_pipeline_recomputes_when_only_parts_are_corrupt(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, tmp_path: Path
) -> None:
    """Per-layer / per-block parts corrupt while their index artifacts are fine, plus pack gone: the rerun must
    not build on the damaged parts (recompute them or fail clearly), and must end with a clean store."""
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    rng = random.Random(5)
    parts = [r for r in reference.files if r.split("/")[0] in ("qlayer", "hessian-block")]
    for ref in rng.sample(parts, 3):
        _corrupt(root / "artifacts" / ref, "flip", rng)
    rerun_without_pack(forks, rel_inputs, reference.files, home)
    record("corruption", "pipeline-parts", injected=3, detected=3, recomputed=3)


def _s3_store(endpoint: str, bucket: str, cache: Path) -> ArtifactStore:
    settings = Settings(home=cache, s3_endpoint_url=endpoint, s3_max_attempts=2)
    return open_store(f"s3://{bucket}/corrupt", settings)


def test_s3_corruption_is_detected(moto_server: str, s3_bucket: str, reference: Reference, tmp_path: Path) -> None:
    """The reference artifacts copied to S3, then damaged object by object: verify and a cold read notice."""
    import boto3

    local = LocalStore(reference.store)
    writer = _s3_store(moto_server, s3_bucket, tmp_path / "w")
    refs = sorted(reference.files)[: 12 if not full_mode() else None]
    # All of them, inputs before their consumers (a manifest commits to its inputs' content, so they must exist).
    for ref in sorted(reference.files, key=lambda r: local.manifest(r).created_at):
        art = local.get(ref)
        m = art.manifest
        writer.put(
            m.stage,
            m.key,
            {f.name: art.file(f.name) for f in m.files},
            stage_version=m.stage_version,
            config=m.config,
            inputs=m.inputs,
            metadata=m.metadata,
        )
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    rng = random.Random(9)
    counts: Counter[str] = Counter()
    misses = []
    for i, ref in enumerate(refs):
        stage, key = ref.split("/")
        prefix = f"corrupt/artifacts/{stage}/{key}/"
        mkey = prefix + MANIFEST_NAME
        manifest = json.loads(client.get_object(Bucket=s3_bucket, Key=mkey)["Body"].read())
        entry = rng.choice(manifest["files"])
        okey = prefix + entry["path"]
        original = client.get_object(Bucket=s3_bucket, Key=okey)["Body"].read()
        original_manifest = json.dumps(manifest, indent=2, sort_keys=True).encode()
        kind = ["flip", "truncate", "delete", "manifest-sha", "manifest-metadata"][i % 5]
        if kind == "flip":
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 0x10
            client.put_object(Bucket=s3_bucket, Key=okey, Body=bytes(data))
        elif kind == "truncate":
            client.put_object(Bucket=s3_bucket, Key=okey, Body=original[: len(original) // 2])
        elif kind == "delete":
            client.delete_object(Bucket=s3_bucket, Key=okey)
        else:
            edited: dict[str, Any] = json.loads(original_manifest)
            if kind == "manifest-sha":
                next(f for f in edited["files"] if f["path"] == entry["path"])["sha256"] = "0" * 64
            else:
                edited["metadata"]["tampered"] = True
            client.put_object(Bucket=s3_bucket, Key=mkey, Body=json.dumps(edited).encode())
        fresh = _s3_store(moto_server, s3_bucket, tmp_path / f"cold-{i}")
        by_verify = not fresh.verify(ref).ok
        try:
            fresh.get(ref)
            by_read = False
        except (CorruptArtifactError, ArtifactNotFoundError):
            by_read = True
        counts["injected"] += 1
        counts["detected"] += int(by_verify and by_read)
        if not (by_verify and by_read):
            misses.append(f"{ref} {kind}: verify {by_verify} read {by_read}")
        client.put_object(Bucket=s3_bucket, Key=okey, Body=original)
        client.put_object(Bucket=s3_bucket, Key=mkey, Body=original_manifest)
        assert _s3_store(moto_server, s3_bucket, tmp_path / f"check-{i}").verify(ref).ok
    record("corruption", "s3", injected=counts["injected"], detected=counts["detected"])
    assert misses == []


def test_memo_does_not_hide_rewrites(reference: Reference, tmp_path: Path) -> None:
    """A store object that already verified a file notices when the file is rewritten afterwards."""
    home = reference.copy_home(tmp_path / "home")
    store = LocalStore(home / "store")
    ref = next(r for r in sorted(reference.files) if r.startswith("calibration/"))
    path = store.get(ref).file("tokens.safetensors")
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    assert not store.verify(ref).ok
    with pytest.raises(CorruptArtifactError, match="tokens.safetensors"):
        store.get(ref)
    assert manifest_bytes(home / "store")  # the manifests themselves were untouched
