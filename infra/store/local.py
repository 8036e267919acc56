"""Local-filesystem backend: ``<root>/artifacts/<stage>/<key>/`` committed by one directory rename.

The staging directory (under ``<root>/.staging``, same filesystem) receives the payload and, last, the manifest;
``rename(staging, final)`` then publishes both at once. ``rename`` onto an existing non-empty directory fails, so
of two racing writers exactly one wins and the other finds a complete artifact. A final directory without a
valid manifest (only possible after manual tampering) is moved to ``<root>/.trash`` before a new commit.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from infra.errors import ArtifactNotFoundError, CorruptArtifactError, StoreError
from infra.keys import ArtifactRef, validate_key, validate_stage
from infra.manifest import MANIFEST_NAME, Manifest, sha256_file
from infra.store.base import ArtifactStore, LocalArtifact

__all__ = ["LocalStore"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore(ArtifactStore):
    def __init__(self, root: Path, *, setting_name: str = "QUANTPIPE_STORE_URL") -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()
        self._setting = setting_name
        # (path, size, mtime_ns) of files already hashed in this process: verification happens once per change.
        self._verified: set[tuple[str, int, int]] = set()

    # ---- layout ---------------------------------------------------------------------------------
    def _dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / validate_stage(stage) / validate_key(key)

    def staging_root(self) -> Path:
        return self.root / ".staging"

    def check(self) -> None:
        try:
            (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
            self.staging_root().mkdir(parents=True, exist_ok=True)
            probe = self.staging_root() / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"local store {self.root} is not writable ({exc.strerror or exc}); "
                f"fix permissions or set {self._setting} / QUANTPIPE_HOME"
            ) from None

    # ---- primitives -----------------------------------------------------------------------------
    def _commit(self, manifest: Manifest, staging_dir: Path) -> Manifest:
        final = self._dir(manifest.stage, manifest.key)
        for entry in manifest.files:
            with (staging_dir / entry.path).open("rb") as fh:
                os.fsync(fh.fileno())
        tmp_manifest = staging_dir / (MANIFEST_NAME + ".tmp")
        with tmp_manifest.open("wb") as fh:
            fh.write(self.manifest_bytes(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_manifest, staging_dir / MANIFEST_NAME)
        _fsync_dir(staging_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            try:
                os.rename(staging_dir, final)
                _fsync_dir(final.parent)
                return manifest
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise StoreError(
                        f"cannot commit artifact {manifest.ref} under {self.root}: {exc.strerror or exc}"
                    ) from None
            # Someone else holds the final name: keep theirs if it is a complete artifact.
            existing = self._read_manifest_bytes(manifest.stage, manifest.key)
            if existing is not None:
                try:
                    winner = Manifest.model_validate_json(existing)
                except ValueError:
                    winner = None
                if winner is not None and winner.digest_ok() and not self._verify_files(winner):
                    shutil.rmtree(staging_dir, ignore_errors=True)
                    return winner
            self._quarantine(final)
        raise StoreError(f"cannot commit artifact {manifest.ref}: the final directory keeps reappearing")

    def _quarantine(self, path: Path) -> None:
        """Move ``path`` out of the artifact tree. Another thread may empty ``.trash`` (rmtree) between our mkdir and
        rename; the rename then fails with FileNotFoundError although ``path`` still exists, and swallowing that
        left a corrupt artifact in place (seen with parallel layer tasks repairing corrupt artifacts), so retry."""
        trash = self.root / ".trash"
        for _attempt in range(20):
            trash.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, trash / f"{path.name}-{uuid.uuid4().hex[:8]}")
                return
            except FileNotFoundError:
                if not path.exists():
                    return  # already gone (another deleter won)
        raise StoreError(f"cannot move {path} aside: {trash} keeps disappearing")

    def _read_manifest_bytes(self, stage: str, key: str) -> bytes | None:
        try:
            return (self._dir(stage, key) / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def _check_file(self, ref: ArtifactRef, root: Path, entry_path: str, size: int, sha256: str) -> str | None:
        path = root / entry_path
        try:
            if not path.resolve().is_relative_to(root.resolve()) or path.is_symlink():
                return f"artifact {ref}: file {entry_path!r} is a link or lies outside the artifact directory"
            st = path.stat()
        except FileNotFoundError:
            return f"artifact {ref}: file {entry_path!r} is missing"
        if st.st_size != size:
            return f"artifact {ref}: file {entry_path!r} has {st.st_size} bytes, manifest says {size}"
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo in self._verified:
            return None
        digest, _ = sha256_file(path)
        if digest != sha256:
            return f"artifact {ref}: file {entry_path!r} is corrupt (sha256 {digest[:12]}… != {sha256[:12]}…)"
        self._verified.add(memo)
        return None

    def _verify_files(self, manifest: Manifest) -> list[str]:
        root = self._dir(manifest.stage, manifest.key)
        problems = []
        for entry in manifest.files:
            problem = self._check_file(manifest.ref, root, entry.path, entry.size, entry.sha256)
            if problem:
                problems.append(problem)
        return problems

    def _materialise(self, manifest: Manifest) -> LocalArtifact:
        problems = self._verify_files(manifest)
        if problems:
            raise CorruptArtifactError(problems[0] + "; run `quantpipe verify` and recompute it")
        return LocalArtifact(manifest, self._dir(manifest.stage, manifest.key))

    def _list_keys(self, stage: str | None) -> Iterator[tuple[str, str]]:
        base = self.root / "artifacts"
        if not base.is_dir():
            return
        stages = [stage] if stage else sorted(p.name for p in base.iterdir() if p.is_dir())
        for s in stages:
            sdir = base / s
            if not sdir.is_dir():
                continue
            for kdir in sorted(sdir.iterdir()):
                if (kdir / MANIFEST_NAME).is_file():
                    yield s, kdir.name

    def _delete(self, stage: str, key: str) -> None:
        path = self._dir(stage, key)
        if not path.exists():
            raise ArtifactNotFoundError(f"no artifact {stage}/{key} in store {self.url}")
        # Rename first so readers never see a half-deleted artifact with its manifest still present.
        self._quarantine(path)
        shutil.rmtree(self.root / ".trash", ignore_errors=True)
