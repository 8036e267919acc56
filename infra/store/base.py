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
import json
import os
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError, StoreError
from infra.keys import ArtifactRef, artifact_key, canonical_json, validate_key, validate_stage
from infra.manifest import FileEntry, Manifest, check_relative_path, sha256_file

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
    # Linked artifacts (inputs or parts) whose content no longer matches what this artifact recorded.
    changed_links: list[str] = field(default_factory=list)


OWNER_FILE = ".qp-owner"
_ENOSPC_TEXT = "No space left on device"
# A staging directory without a readable owner (or owned on another host) is only swept after this long.
STALE_AFTER_S = 24 * 3600


def _safe_name(name: str) -> str:
    try:
        check_relative_path(name)
    except ValueError:
        raise ConfigError(f"invalid artifact file name {name!r}: must be a relative path without '..'") from None
    if name.split("/")[0] == OWNER_FILE:
        raise ConfigError(f"invalid artifact file name {name!r}: reserved")
    return name


def _start_token(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a recycled pid is not mistaken for the writer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_token(os.getpid())}


def make_staging_dir(root: Path, prefix: str) -> Path:
    """A fresh private directory under ``root`` that records its writer, so killed writers' leftovers can be
    told apart from live ones and swept (:func:`sweep_stale_staging`)."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    (path / OWNER_FILE).write_text(json.dumps(_owner_record()))
    return path


def _owner_alive(owner: dict[str, Any]) -> bool | None:
    """True/False when this host can tell whether the staging owner still runs; None when it cannot."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    pid: int = owner["pid"]
    if Path("/proc/self/stat").exists():
        token = _start_token(pid)
        return token is not None and token == owner.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_stale_staging(root: Path, *, now: float | None = None) -> list[Path]:
    """Remove staging directories of writers that died (SIGKILL, power loss) and return them.

    Safe under concurrency: a directory is removed only when its recorded owner process is gone (same host, pid
    and start time), or, with no readable owner, when it has not changed for ``STALE_AFTER_S``. Two sweepers may
    race on one directory; ``rmtree`` of an already removed path is harmless."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir():
                if entry.name.startswith(".probe-") and now - entry.lstat().st_mtime > 3600:
                    entry.unlink(missing_ok=True)
                continue
            try:
                owner = json.loads((entry / OWNER_FILE).read_text())
                alive = _owner_alive(owner) if isinstance(owner, dict) else None
            except (OSError, ValueError):
                alive = None
            if alive is None:
                alive = now - entry.stat().st_mtime < STALE_AFTER_S
        except OSError:
            continue
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


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
        input_refs = {role: str(ArtifactRef(ref)) for role, ref in inputs.items()}
        if artifact_key(stage, stage_version, config, input_refs) != key:
            # The key is what readers check a manifest against: an artifact under a key its own config and inputs
            # do not hash to could never be read back.
            raise ConfigError(f"artifact {stage}/{key[:12]}…: key does not match its stage, config and inputs")
        self._manifest_fields: dict[str, Any] = {
            "stage": stage,
            "key": key,
            "stage_version": stage_version,
            "config": json.loads(canonical_json(config)),
            "inputs": input_refs,
            "code_version": code_version,
            "producer_run_id": producer_run_id,
        }
        self.dir = make_staging_dir(staging_root, f"{stage}-{key[:12]}-")
        self.metadata: dict[str, Any] = {}
        self._names: list[str] = []
        self._links: set[str] = set(input_refs.values())
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

    def link(self, ref: str) -> None:
        """Commit to ``ref``'s current content (a part this artifact lists, e.g. per-layer weights of an index)."""
        self._links.add(str(ArtifactRef(ref)))

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
            if src.is_symlink() or any(parent.is_symlink() for parent in src.relative_to(self.dir).parents[:-1]):
                raise ConfigError(f"artifact {self.ref}: file {name!r} is a symlink; artifacts hold regular files only")
            if not src.is_file():
                raise ConfigError(f"artifact {self.ref}: registered file {name!r} was never written")
            digest, size = sha256_file(src)
            entries.append(FileEntry(name=name, path=name, sha256=digest, size=size))
        return entries

    def commit(self) -> Manifest:
        # Links are read last, from the committed manifests: the digests this artifact vouches for are those of
        # the inputs and parts as they are now, verified like any read.
        links = {ref: self.store.manifest(ref).content_digest() for ref in sorted(self._links)}
        manifest = Manifest(files=self._entries(), metadata=self.metadata, links=links, **self._manifest_fields)
        (self.dir / OWNER_FILE).unlink(missing_ok=True)
        self.committed = self.store._commit(manifest, self.dir)
        return self.committed

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ArtifactStore(ABC):
    """exists / get / put / list / verify / delete / lineage over committed artifacts."""

    url: str
    # HMAC key for manifests (QUANTPIPE_STORE_SIGNING_KEY): with one, unsigned or mis-signed manifests are corrupt.
    signing_key: bytes | None = None
    _swept: bool = False

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

        if not self._swept:
            self._swept = True
            sweep_stale_staging(self.staging_root())
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
        except Exception as exc:
            # Writers that are not Python file objects (safetensors' Rust serializer, tokenizers) report a full
            # disk as their own exception type with the OS error in the text: the same one-line store error.
            if _ENOSPC_TEXT not in str(exc):
                raise
            raise self._disk_error(OSError(errno.ENOSPC, "No space left on device"), str(w.ref)) or exc from None
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
        if manifest.digest is None:
            raise CorruptArtifactError(f"artifact {r}: manifest.json has no digest")
        if not manifest.digest_ok():
            raise CorruptArtifactError(f"artifact {r}: manifest.json was modified (its digest does not match)")
        if not manifest.key_ok():
            raise CorruptArtifactError(f"artifact {r}: manifest.json's config or inputs do not hash to its key")
        if self.signing_key is not None and not manifest.signature_ok(self.signing_key):
            raise CorruptArtifactError(
                f"artifact {r}: manifest.json is not signed with this store's key (QUANTPIPE_STORE_SIGNING_KEY)"
            )
        return manifest.model_copy(update={"digest": None, "signature": None})

    def manifest_bytes(self, manifest: Manifest) -> bytes:
        """The bytes a backend publishes for ``manifest`` (digest, and signature when the store has a key)."""
        return manifest.to_bytes(self.signing_key)

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
        """Manifest (digest, key, signature), every file's size and sha256, and every link's content digest."""
        r = ArtifactRef(ref)
        try:
            manifest = self.manifest(r)
        except (ArtifactNotFoundError, CorruptArtifactError) as exc:
            return VerifyReport(r, False, [str(exc)])
        problems = self._verify_files(manifest)
        changed: list[str] = []
        for link, recorded in sorted(manifest.links.items()):
            try:
                actual = self.manifest(link).content_digest()
            except (ArtifactNotFoundError, CorruptArtifactError):
                # Gone or damaged: reported when that artifact is verified itself, and recomputed by the stage
                # that needs it (whose result is then checked against this record again).
                continue
            if actual != recorded:
                problems.append(
                    f"artifact {r}: {link} changed after it was consumed (content {actual[:12]}… != recorded "
                    f"{recorded[:12]}…): one of them was modified outside quantpipe"
                )
                changed.append(link)
        return VerifyReport(r, not problems, problems, changed)

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
