"""Forgery: an attacker with write access to the store rewrites artifacts *and* their manifests consistently.

Unlike corruption (``test_corruption.py``), a forged manifest is internally consistent: the payload's sha256 and
size are updated and the digest recomputed. Kinds:

* ``payload``: a payload file changed, the manifest rewritten to match it (the outside tester's case);
* ``no-digest``: the same with the digest removed;
* ``config``: the manifest claims another config (digest recomputed);
* ``links``: the manifest's recorded input digests rewritten to match a forged input (digest recomputed);
* ``traversal``: a file path pointing outside the artifact (``../``, absolute).

What must hold: ``no-digest``, ``config`` and ``traversal`` are refused by every read; ``payload`` and ``links`` are
caught by ``verify`` through the artifact's consumers, the pipeline never reuses a result computed from different
content, and with a store signing key every forged manifest is refused by every read.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.errors import ArtifactNotFoundError, CorruptArtifactError
from infra.manifest import MANIFEST_NAME, sign
from infra.store import LocalStore
from tests.reliability.conftest import Reference
from tests.reliability.harness import (
    ForkServer,
    PipelineInputs,
    record,
    rerun_without_pack,
    verify_all,
)

KINDS = ["payload", "no-digest", "config", "links", "traversal"]
SIGNING_KEY = b"reliability-signing-key-0123456789"


def _rewrite(adir: Path, raw: dict[str, Any], *, keep_digest: bool = True, key: bytes | None = None) -> None:
    """Recompute the digest (and signature) the way the store does, without validating: a forger's tool needs
    no permission from our parser."""
    out = {**raw, "digest": None}
    out.pop("signature", None)
    out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    out["signature"] = sign(key, out["digest"]) if key else None
    if not keep_digest:
        out.pop("digest")
    (adir / MANIFEST_NAME).write_text(json.dumps(out, indent=2, sort_keys=True))


def _forge(adir: Path, kind: str, rng: random.Random, *, old_signature: bool = False) -> str:
    """Forge one artifact directory as an attacker without the signing key would (``old_signature`` keeps the
    original signature, the best such an attacker can do)."""
    raw = json.loads((adir / MANIFEST_NAME).read_text())
    signature = raw.get("signature")
    entry = rng.choice(raw["files"])
    if kind in ("payload", "no-digest"):
        target = adir / entry["path"]
        data = bytearray(target.read_bytes() or b"\0")
        data[rng.randrange(len(data))] ^= 0x20
        target.write_bytes(bytes(data))
        entry["sha256"], entry["size"] = hashlib.sha256(bytes(data)).hexdigest(), len(data)
    elif kind == "config":
        raw["config"]["forged"] = True
    elif kind == "links":
        if not raw.get("links"):
            raw["config"]["forged"] = True  # nothing to rewrite: fall back to another forgery of the manifest
        else:
            link = rng.choice(sorted(raw["links"]))
            raw["links"][link] = hashlib.sha256(b"forged input").hexdigest()
    elif kind == "traversal":
        entry["path"] = rng.choice(["../" * 6 + "etc/passwd", "/etc/passwd", "a/../../../x", "..\\..\\x"])
    _rewrite(adir, raw, keep_digest=kind != "no-digest")
    if old_signature and signature:
        forged = json.loads((adir / MANIFEST_NAME).read_text())
        forged["signature"] = signature
        (adir / MANIFEST_NAME).write_text(json.dumps(forged, indent=2, sort_keys=True))
    return f"{kind} {entry['name']}"


def _read_refuses(store_root: Path, ref: str, key: bytes | None = None) -> bool:
    store = LocalStore(store_root)
    store.signing_key = key
    try:
        art = store.get(ref)
        for name in art.manifest.file_names():
            art.read_bytes(name)
    except (CorruptArtifactError, ArtifactNotFoundError):
        return True
    return False


def _consumers(store: LocalStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ref in store.list():
        for link in store.manifest(ref).links:
            out.setdefault(link, []).append(str(ref))
    return out


def test_every_forgery_is_caught(reference: Reference, tmp_path: Path) -> None:
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    consumers = _consumers(LocalStore(root))
    rng = random.Random(19)
    counts: Counter[str] = Counter()
    missed: list[str] = []
    leaves = 0
    for ref in sorted(reference.files):
        adir = root / "artifacts" / ref
        backup = tmp_path / "backup"
        shutil.copytree(adir, backup)
        for kind in KINDS:
            what = _forge(adir, kind, rng)
            problems = verify_all(root)
            caught_by_verify = bool(problems)
            refused = _read_refuses(root, ref)
            counts["injected"] += 1
            if kind in ("no-digest", "config", "traversal"):
                ok = caught_by_verify and refused
            elif kind == "links" and not json.loads(backup.joinpath(MANIFEST_NAME).read_text()).get("links"):
                ok = caught_by_verify and refused  # fell back to a config forgery
            elif ref in consumers:
                ok = caught_by_verify and any(c in p for p in problems for c in consumers[ref] + [ref])
            else:
                leaves += 1
                ok = True  # nothing in the store commits to a leaf's content: the signing key covers it below
            counts["detected"] += int(ok)
            counts[f"{kind}:injected"] += 1
            counts[f"{kind}:detected"] += int(ok)
            if not ok:
                missed.append(f"{ref}: {what}")
            shutil.rmtree(adir)
            shutil.copytree(backup, adir)
        shutil.rmtree(backup)
    assert verify_all(root) == []
    record("forgery", "unsigned-store", injected=counts["injected"] - leaves, detected=counts["detected"] - leaves)
    record("traversal", "local-manifests", tried=counts["traversal:injected"], refused=counts["traversal:detected"])
    assert missed == []


def test_signed_store_refuses_every_forgery(reference: Reference, tmp_path: Path) -> None:
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    for ref in sorted(reference.files):  # re-sign the reference store as a store with a key would have written it
        adir = root / "artifacts" / ref
        _rewrite(adir, json.loads((adir / MANIFEST_NAME).read_text()), key=SIGNING_KEY)
    signed = LocalStore(root)
    signed.signing_key = SIGNING_KEY
    assert all(signed.verify(r).ok for r in signed.list())
    rng = random.Random(23)
    counts: Counter[str] = Counter()
    missed = []
    for i, ref in enumerate(sorted(reference.files)):
        adir = root / "artifacts" / ref
        backup = tmp_path / "backup"
        shutil.copytree(adir, backup)
        kind = KINDS[i % len(KINDS)]
        what = _forge(adir, kind, rng, old_signature=i % 2 == 0)
        counts["injected"] += 1
        if _read_refuses(root, ref, SIGNING_KEY):
            counts["detected"] += 1
        else:
            missed.append(f"{ref}: {what}")
        shutil.rmtree(adir)
        shutil.copytree(backup, adir)
        shutil.rmtree(backup)
    record("forgery", "signed-store", injected=counts["injected"], detected=counts["detected"])
    assert missed == []


@pytest.mark.slow
def test_pipeline_never_builds_on_a_forged_part(
    forks: ForkServer, rel_inputs: PipelineInputs, reference: Reference, tmp_path: Path
) -> None:
    """The outside tester's run: a per-layer artifact forged, its index still in place, pack removed. The rerun
    must recompute the layer (not adopt it) and end with the reference's bytes; a forged pack must not get the
    cached evaluation of the honest one."""
    home = reference.copy_home(tmp_path / "home")
    root = home / "store"
    rng = random.Random(29)
    qlayer = rng.choice(sorted(r for r in reference.files if r.startswith("qlayer/")))
    _forge(root / "artifacts" / qlayer, "payload", rng)
    rerun_without_pack(forks, rel_inputs, reference.files, home)
    pack = next(r for r in reference.files if r.startswith("pack/"))

    adir = root / "artifacts" / pack
    raw = json.loads((adir / MANIFEST_NAME).read_text())
    weights = next(f for f in raw["files"] if f["name"].endswith(".safetensors") and f["size"] > 4096)
    _forge_file(adir, raw, weights)
    assert any("changed after it was consumed" in p for p in verify_all(root))
    (again,) = forks.run([rel_inputs.job(home, tmp_path / "again.log")])
    assert again.rc == 0, again.tail()
    outcome = again.outcome()
    assert outcome is not None
    assert outcome["stages"]["evaluate"]["cache_hit"] is False  # evaluated on the weights that are there now
    record("forgery", "pipeline", injected=2, detected=2)


def _forge_file(adir: Path, raw: dict[str, Any], entry: dict[str, Any]) -> None:
    """Scale one weight tensor's bytes (a plausible, loadable forgery) and rewrite the manifest to match."""
    from safetensors.torch import load_file, save_file

    path = adir / entry["path"]
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 16)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, path)
    data = path.read_bytes()
    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    _rewrite(adir, raw)


TRAVERSALS = [
    "../../../../../../../tmp/{name}",
    "/tmp/{name}",
    "a/../../../../../../tmp/{name}",
    "..\\{name}",
    "./{name}",
]


def test_s3_planted_manifests_never_write_outside(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    """Manifests planted in the bucket with hostile paths: a cold reader refuses them and writes nothing."""
    import boto3

    from infra.keys import ArtifactRef, artifact_key
    from infra.settings import Settings
    from infra.store import open_store

    settings = Settings(home=tmp_path / "writer", s3_endpoint_url=moto_server, s3_max_attempts=1)
    store = open_store(f"s3://{s3_bucket}/planted", settings)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    refused = 0
    for i, template in enumerate(TRAVERSALS):
        key = artifact_key("calibration", 1, {"i": i}, {})
        store.put("calibration", key, {"data.bin": b"honest"}, stage_version=1, config={"i": i})
        ref = ArtifactRef.of("calibration", key)
        target = Path("/tmp") / f"qp-planted-{tmp_path.name}-{i}"
        mkey = f"planted/artifacts/calibration/{key}/{MANIFEST_NAME}"
        raw = json.loads(client.get_object(Bucket=s3_bucket, Key=mkey)["Body"].read())
        raw["files"][0]["path"] = template.format(name=target.name)
        out = {**raw, "digest": None, "signature": None}
        out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        client.put_object(Bucket=s3_bucket, Key=mkey, Body=json.dumps(out).encode())
        cold = open_store(
            f"s3://{s3_bucket}/planted", Settings(home=tmp_path / f"cold{i}", s3_endpoint_url=moto_server)
        )
        try:
            cold.get(ref)
        except CorruptArtifactError:
            refused += int(not target.exists() and not cold.verify(ref).ok)
        target.unlink(missing_ok=True)
    record("traversal", "s3-planted-manifests", tried=len(TRAVERSALS), refused=refused)
    assert refused == len(TRAVERSALS)
