"""``manifest.json``: the commit marker and the audit record of one artifact.

An artifact exists iff its manifest exists and every file it lists has the recorded size and sha256. Three things
make a manifest hard to forge (an outside test rewrote payloads together with their manifests):

* ``digest`` (required) covers every field, so an edit without recomputing it is caught;
* the key is recomputed from ``stage``/``stage_version``/``config``/``inputs`` (:meth:`Manifest.key_ok`), so a
  manifest cannot claim another config or other inputs than its key commits to;
* ``links`` records the :meth:`Manifest.content_digest` of every artifact this one was built from or lists as a
  part (per-layer weights under an index). Content digests include the links, so they chain like a Merkle tree:
  a payload changed after something consumed it no longer matches what the consumer recorded.

With a store signing key (``QUANTPIPE_STORE_SIGNING_KEY``) every manifest also carries an HMAC of its digest, and a
manifest written without the key is rejected outright.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.keys import ArtifactRef, artifact_key

__all__ = ["MANIFEST_NAME", "FileEntry", "Manifest", "check_relative_path", "sha256_file", "sha256_stream", "sign"]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
_CHUNK = 4 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH = 1024


def check_relative_path(value: str) -> str:
    """``value`` as a safe path below an artifact's root, else ValueError.

    Manifests come from the store, which is untrusted input: a planted ``../../x`` or ``/etc/x`` would make a
    reader write (S3 download) or read (local verify) outside the artifact directory."""
    if not isinstance(value, str) or not value or len(value) > _MAX_PATH:
        raise ValueError("file path must be a non-empty relative path")
    if "\\" in value or "\x00" in value or value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"file path {value!r} is not a relative POSIX path")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"file path {value!r} has an empty, '.' or '..' component")
    if value.split("/")[-1] == MANIFEST_NAME:
        raise ValueError(f"file path {value!r} shadows the manifest")
    return value


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Logical file name used by readers, e.g. 'hessian.safetensors'.")
    path: str = Field(description="Location relative to the artifact's root (differs from name on S3).")
    sha256: str
    size: int = Field(ge=0)

    @field_validator("name", "path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA
    stage: str
    key: str
    stage_version: int
    config: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict, description="role -> '<stage>/<key>' of each input.")
    files: list[FileEntry]
    metadata: dict[str, Any] = Field(default_factory=dict, description="Small results (metrics, provenance).")
    code_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    producer_run_id: str | None = None
    links: dict[str, str] = Field(
        default_factory=dict,
        description="'<stage>/<key>' -> content digest of each input and each part artifact, as consumed.",
    )
    digest: str | None = Field(
        default=None,
        description="sha256 of this manifest's canonical JSON without digest and signature; written by to_bytes(). "
        "A manifest without one is corrupt.",
    )
    signature: str | None = Field(
        default=None, description="HMAC-SHA256 of the digest under the store signing key, when one is configured."
    )

    @field_validator("links")
    @classmethod
    def _links(cls, value: dict[str, str]) -> dict[str, str]:
        for ref, digest in value.items():
            ArtifactRef(ref)
            if not _SHA256_RE.match(digest):
                raise ValueError(f"link {ref}: digest must be 64 lowercase hex characters")
        return value

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef.of(self.stage, self.key)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        from infra.errors import ArtifactNotFoundError

        raise ArtifactNotFoundError(f"artifact {self.ref} has no file {name!r} (has: {self.file_names()})")

    def file_names(self) -> list[str]:
        return [f.name for f in self.files]

    def compute_digest(self) -> str:
        data = self.model_dump(mode="json")
        data["digest"] = None
        data.pop("signature", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def digest_ok(self) -> bool:
        """True iff the manifest carries a digest and it matches its content (a missing digest is corruption)."""
        return self.digest is not None and hmac.compare_digest(self.digest, self.compute_digest())

    def key_ok(self) -> bool:
        """True iff the key is the one ``stage``, ``stage_version``, ``config`` and ``inputs`` hash to."""
        try:
            return self.key == artifact_key(self.stage, self.stage_version, self.config, self.inputs)
        except ValueError:
            return False

    def signature_ok(self, signing_key: bytes) -> bool:
        expected = sign(signing_key, self.compute_digest())
        return self.signature is not None and hmac.compare_digest(self.signature, expected)

    def content_digest(self) -> str:
        """What a consumer commits to: the payload (names, sizes, sha256), the metadata and the links.

        Locations (``path``), timestamps and run ids are left out, so two racing writers of the same bytes, or an
        S3 artifact and its local cache copy, have the same content digest."""
        content = {
            "ref": str(self.ref),
            "files": sorted([f.name, f.sha256, f.size] for f in self.files),
            "metadata": self.metadata,
            "links": self.links,
        }
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_bytes(self, signing_key: bytes | None = None) -> bytes:
        data = self.model_dump(mode="json")
        data["digest"] = self.compute_digest()
        data["signature"] = sign(signing_key, data["digest"]) if signing_key else None
        return json.dumps(data, indent=2, sort_keys=True).encode()


def sign(signing_key: bytes, digest: str) -> str:
    return hmac.new(signing_key, digest.encode(), hashlib.sha256).hexdigest()


def sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    with path.open("rb") as fh:
        return sha256_stream(fh)
