"""The artifact-store interface shared by the local and S3 backends.

Protocol of a write: the producer fills a private staging directory through an :class:`ArtifactWriter`; on
``commit`` the backend hashes every file, publishes the payload under a location no other writer uses, and then
publishes ``manifest.json`` in one atomic step (a directory rename locally, a conditional PUT on S3). Readers only
ever look at artifacts that have a manifest, and verify each file's sha256 before handing it out. Two writers of
the same key therefore never tear an artifact: one commit wins, the other discards its staging and reads the
winner's complete artifact.
"""

from __future__ import annotations

import builtins
import errno
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError, StoreError
from infra.keys import ArtifactRef, validate_key, validate_stage
from infra.manifest import MANIFEST_NAME, FileEntry, Manifest, sha256_file

__all__ = ["ArtifactStore", "ArtifactWriter", "LocalArtifact", "VerifyReport"]


@dataclass(frozen=True)
class LocalArtifact:
    """A committed artifact whose files lie verified on the local disk."""

    manifest: Manifest
    root: Path

    @property
    def ref(self) -> ArtifactRef:
        return self.manifest.ref

    def file(self, name: str) -> Path:
        return self.root / self.manifest.file(name).path

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()


@dataclass
class VerifyReport:
    ref: ArtifactRef
    ok: bool
    problems: list[str] = field(default_factory=list)


def _safe_name(name: str) -> str:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or any(p in ("..", "") for p in parts) or name == MANIFEST_NAME:
        raise ConfigError(f"invalid artifact file name {name!r}: must be a relative path without '..'")
    return name


class ArtifactWriter:
    """Staging area for one artifact; nothing is visible in the store until :meth:`commit`."""

    def __init__(
        self,
        store: ArtifactStore,
        stage: str,
        key: str,
        *,
        stage_version: int,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        code_version: str,
        producer_run_id: str | None,
        staging_root: Path,
    ) -> None:
        self.store = store
        self.stage = validate_stage(stage)
        self.key = validate_key(key)
        self._manifest_fields: dict[str, Any] = {
            "stage": stage,
            "key": key,
            "stage_version": stage_version,
            "config": dict(config),
            "inputs": {role: str(ArtifactRef(ref)) for role, ref in inputs.items()},
            "code_version": code_version,
            "producer_run_id": producer_run_id,
        }
        staging_root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{stage}-{key[:12]}-", dir=staging_root))
        self.metadata: dict[str, Any] = {}
        self._names: list[str] = []
        self.committed: Manifest | None = None

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef.of(self.stage, self.key)

    def path(self, name: str) -> Path:
        """A path inside the staging dir to write ``name`` to directly (registers the file)."""
        target = self.dir / _safe_name(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if name not in self._names:
            self._names.append(name)
        return target

    def add_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

    def add_file(self, name: str, src: Path) -> None:
        shutil.copyfile(src, self.path(name))

    def add_tree(self, prefix: str, src_dir: Path) -> None:
        """Register every file below ``src_dir`` as ``prefix/<relative path>``."""
        for item in sorted(src_dir.rglob("*")):
            if item.is_file():
                self.add_file(f"{prefix}/{item.relative_to(src_dir).as_posix()}", item)

    def register_tree(self, prefix: str) -> None:
        """Register files already written below ``self.dir / prefix`` (e.g. by ``save_pretrained``)."""
        for item in sorted((self.dir / prefix).rglob("*")):
            if item.is_file():
                name = item.relative_to(self.dir).as_posix()
                if name not in self._names:
                    self._names.append(_safe_name(name))

    def _entries(self) -> list[FileEntry]:
        entries = []
        for name in sorted(self._names):
            src = self.dir / name
            if not src.is_file():
                raise ConfigError(f"artifact {self.ref}: registered file {name!r} was never written")
            digest, size = sha256_file(src)
            entries.append(FileEntry(name=name, path=name, sha256=digest, size=size))
        return entries

    def commit(self) -> Manifest:
        manifest = Manifest(files=self._entries(), metadata=self.metadata, **self._manifest_fields)
        self.committed = self.store._commit(manifest, self.dir)
        return self.committed

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ArtifactStore(ABC):
    """exists / get / put / list / verify / delete / lineage over committed artifacts."""

    url: str

    # ---- backend primitives -------------------------------------------------------------------
    @abstractmethod
    def _commit(self, manifest: Manifest, staging_dir: Path) -> Manifest:
        """Publish staged files and then the manifest; return the manifest that is now committed."""

    @abstractmethod
    def _read_manifest_bytes(self, stage: str, key: str) -> bytes | None:
        """Raw manifest bytes, or None when there is no committed artifact."""

    @abstractmethod
    def _materialise(self, manifest: Manifest) -> LocalArtifact:
        """Make the artifact's files available locally, verified against the manifest."""

    @abstractmethod
    def _list_keys(self, stage: str | None) -> Iterator[tuple[str, str]]:
        """(stage, key) of every committed manifest."""

    @abstractmethod
    def _delete(self, stage: str, key: str) -> None: ...

    @abstractmethod
    def _verify_files(self, manifest: Manifest) -> list[str]:
        """Problems (missing / wrong size / wrong sha256) with the stored files, without caching them."""

    @abstractmethod
    def staging_root(self) -> Path: ...

    def check(self) -> None:
        """Raise a clear error when the store cannot be used (unreachable, unwritable, missing bucket)."""

    # ---- public API -----------------------------------------------------------------------------
    @contextmanager
    def writer(
        self,
        stage: str,
        key: str,
        *,
        stage_version: int,
        config: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
        code_version: str = "",
        producer_run_id: str | None = None,
    ) -> Iterator[ArtifactWriter]:
        """Stage files in the body; the artifact is committed when the body finishes without error."""
        from infra.version import code_version as current_code_version

        try:
            w = ArtifactWriter(
                self,
                stage,
                key,
                stage_version=stage_version,
                config=config,
                inputs=inputs or {},
                code_version=code_version or current_code_version(),
                producer_run_id=producer_run_id,
                staging_root=self.staging_root(),
            )
        except OSError as exc:
            raise self._disk_error(exc, f"{stage}/{key}") or exc from None
        try:
            yield w
            if w.committed is None:
                w.commit()
        except OSError as exc:
            translated = self._disk_error(exc, str(w.ref), staging=w.dir)
            if translated is None:
                raise
            raise translated from None
        finally:
            w.abort()

    def _disk_error(self, exc: OSError, ref: str, staging: Path | None = None) -> StoreError | None:
        """A one-line StoreError for a full / read-only / forbidden local disk under the store, else None."""
        root = self.staging_root()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(
                f"no space left on device while writing artifact {ref} (staging under {root}); free disk space "
                "or point QUANTPIPE_HOME / QUANTPIPE_STORE_URL at a larger disk"
            )
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
            where = Path(exc.filename) if isinstance(exc.filename, str) else None
            bases = [p for p in (root, staging, getattr(self, "root", None)) if isinstance(p, Path)]
            inside = where is None or any(where.is_relative_to(p) for p in bases)
            if inside:
                return StoreError(
                    f"cannot write artifact {ref} under {root} ({exc.strerror or exc}); fix the permissions "
                    "or point QUANTPIPE_HOME / QUANTPIPE_STORE_URL at a writable directory"
                )
        return None

    def put(
        self,
        stage: str,
        key: str,
        files: Mapping[str, bytes | Path],
        *,
        stage_version: int,
        config: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        producer_run_id: str | None = None,
    ) -> Manifest:
        with self.writer(
            stage,
            key,
            stage_version=stage_version,
            config=config,
            inputs=inputs,
            producer_run_id=producer_run_id,
        ) as w:
            for name, payload in files.items():
                if isinstance(payload, bytes):
                    w.add_bytes(name, payload)
                else:
                    w.add_file(name, payload)
            w.metadata.update(metadata or {})
        assert w.committed is not None
        return w.committed

    def manifest(self, ref: str) -> Manifest:
        r = ArtifactRef(ref)
        raw = self._read_manifest_bytes(r.stage, r.key)
        if raw is None:
            raise ArtifactNotFoundError(f"no artifact {r} in store {self.url}")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise CorruptArtifactError(f"artifact {r}: manifest.json is unreadable ({type(exc).__name__})") from None
        if manifest.stage != r.stage or manifest.key != r.key:
            raise CorruptArtifactError(f"artifact {r}: manifest.json belongs to {manifest.stage}/{manifest.key}")
        if not manifest.digest_ok():
            raise CorruptArtifactError(f"artifact {r}: manifest.json was modified (its digest does not match)")
        return manifest.model_copy(update={"digest": None})

    def exists(self, ref: str, *, verify: bool = False) -> bool:
        """True iff a committed manifest exists (and, with ``verify``, all its files check out)."""
        r = ArtifactRef(ref)
        if self._read_manifest_bytes(r.stage, r.key) is None:
            return False
        return self.verify(r).ok if verify else True

    def get(self, ref: str) -> LocalArtifact:
        """The artifact's files on local disk, each verified; raises CorruptArtifactError naming the file."""
        return self._materialise(self.manifest(ref))

    def read_bytes(self, ref: str, name: str) -> bytes:
        return self.get(ref).read_bytes(name)

    def list(self, stage: str | None = None) -> list[ArtifactRef]:
        if stage is not None:
            validate_stage(stage)
        return sorted(ArtifactRef.of(s, k) for s, k in self._list_keys(stage))

    def verify(self, ref: str) -> VerifyReport:
        r = ArtifactRef(ref)
        try:
            manifest = self.manifest(r)
        except (ArtifactNotFoundError, CorruptArtifactError) as exc:
            return VerifyReport(r, False, [str(exc)])
        problems = self._verify_files(manifest)
        return VerifyReport(r, not problems, problems)

    def delete(self, ref: str) -> None:
        r = ArtifactRef(ref)
        self._delete(r.stage, r.key)

    def lineage(self, ref: str) -> builtins.list[Manifest]:
        """The artifact and all its ancestors, breadth first, each listed once."""
        seen: set[str] = set()
        out: list[Manifest] = []
        queue: deque[str] = deque([str(ArtifactRef(ref))])
        while queue:
            current = queue.popleft()
            if current in seen:
                continue
            seen.add(current)
            manifest = self.manifest(current)
            out.append(manifest)
            queue.extend(v for v in manifest.inputs.values() if v not in seen)
        return out


def new_writer_id() -> str:
    return uuid.uuid4().hex[:16]
