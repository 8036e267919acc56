"""``manifest.json``: the commit marker and the audit record of one artifact.

An artifact exists iff its manifest exists and every file it lists has the recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field

from infra.keys import ArtifactRef

__all__ = ["MANIFEST_NAME", "FileEntry", "Manifest", "sha256_file", "sha256_stream"]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
_CHUNK = 4 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Logical file name used by readers, e.g. 'hessian.safetensors'.")
    path: str = Field(description="Location relative to the artifact's root (differs from name on S3).")
    sha256: str
    size: int


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
    digest: str | None = Field(
        default=None,
        description="sha256 of this manifest's canonical JSON without the digest; written by to_bytes() so a "
        "hand-edited manifest is detected on read (manifests written before it have none).",
    )

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
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def digest_ok(self) -> bool:
        """False iff the manifest carries a digest that does not match its content (it was edited)."""
        return self.digest is None or self.digest == self.compute_digest()

    def to_bytes(self) -> bytes:
        data = self.model_dump(mode="json")
        data["digest"] = self.compute_digest()
        return json.dumps(data, indent=2, sort_keys=True).encode()


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
