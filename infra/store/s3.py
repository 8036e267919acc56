"""S3 backend (AWS, MinIO, Ceph, moto): payload under a per-writer prefix, manifest PUT as the commit.

Layout: ``s3://bucket/prefix/artifacts/<stage>/<key>/manifest.json`` and ``.../<key>/w-<writer id>/<file>``.
Each writer uploads into its own ``w-<id>/`` prefix, so a losing writer can never overwrite a winner's bytes;
the manifest is then written with ``If-None-Match: *`` so exactly one commit succeeds. Endpoints without
conditional writes fall back to check-then-put (documented race window of one request). Reads download into
a verified local cache (a :class:`LocalStore`), so each object is fetched and hashed once per machine.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infra.errors import (
    ArtifactNotFoundError,
    ConfigError,
    CorruptArtifactError,
    StoreError,
    StoreUnreachableError,
)
from infra.manifest import MANIFEST_NAME, FileEntry, Manifest
from infra.redact import install_log_redaction, redact_url, register_url
from infra.store.base import OWNER_FILE, ArtifactStore, LocalArtifact, make_staging_dir
from infra.store.local import LocalStore

__all__ = ["S3Store", "parse_s3_url"]

_CHUNK = 4 << 20
# Error codes S3 (and S3-compatible stores) use for throttling and transient server faults.
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "503", "500")


def _install_redaction(secrets: list[str]) -> None:
    """Botocore's DEBUG logs print request headers (``Authorization: ... Credential=<access key id>/...``,
    session tokens): mask those and the resolved credential values in every record (:mod:`infra.redact`)."""
    install_log_redaction(*secrets)


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise ConfigError(f"store URL {url!r} is not an s3:// URL")
    bucket = parsed.netloc
    if not bucket:
        raise ConfigError(f"store URL {url!r} has no bucket: use s3://<bucket>/<prefix> in QUANTPIPE_STORE_URL")
    if len(bucket) < 3 or len(bucket) > 63:
        raise ConfigError(f"store URL {url!r}: bucket name must have 3 to 63 characters")
    prefix = parsed.path.strip("/")
    if ".." in prefix.split("/"):
        raise ConfigError(f"store URL {url!r}: prefix must not contain '..'")
    return bucket, prefix


class S3Store(ArtifactStore):
    def __init__(
        self,
        url: str,
        *,
        cache_dir: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: dict[str, str] | None = None,
        max_attempts: int = 5,
        multipart_threshold_mb: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self.read_timeout = read_timeout
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            region_name=region,
        )
        session = boto3.session.Session(**(credentials or {}))  # type: ignore[arg-type]
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        frozen = session.get_credentials()
        known = frozen.get_frozen_credentials() if frozen is not None else None
        _install_redaction([*(credentials or {}).values(), *(known or ())])
        register_url(endpoint_url)  # a MinIO/Ceph endpoint may carry user:password@
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_mb << 20,
            multipart_chunksize=16 << 20,
            max_concurrency=4,
        )
        cache_key = hashlib.sha256(f"{endpoint_url}|{self.url}".encode()).hexdigest()[:16]
        self._cache = LocalStore(Path(cache_dir) / "s3" / f"{self.bucket}-{cache_key}")
        self._conditional_put = True

    # ---- layout and error mapping -------------------------------------------------------------
    def _obj(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, "artifacts", *parts) if p)

    def staging_root(self) -> Path:
        return self._cache.staging_root()

    def _translate(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = redact_url(self.endpoint_url) if self.endpoint_url else "the default AWS endpoint"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreUnreachableError(
                f"{what}: no AWS credentials for {self.url}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(or QUANTPIPE_AWS_ACCESS_KEY_ID/QUANTPIPE_AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreUnreachableError(
                f"{what}: cannot reach S3 endpoint {where}; check QUANTPIPE_S3_ENDPOINT_URL and that it is running"
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StoreError(
                    f"{what}: bucket {self.bucket!r} does not exist at {where}; create it or fix QUANTPIPE_STORE_URL"
                )
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "403"):
                return StoreUnreachableError(
                    f"{what}: S3 refused the credentials for {self.url} ({code}); fix the AWS credentials"
                )
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return StoreUnreachableError(
                    f"{what}: S3 at {where} kept failing with {code or status} (HTTP {status}) after "
                    f"{self.max_attempts} attempts; the endpoint is overloaded or down: retry later or raise "
                    "QUANTPIPE_S3_MAX_ATTEMPTS"
                )
            return StoreError(f"{what}: S3 error {code or exc} on {self.url}")
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ConnectTimeoutError, ReadTimeoutError

        if isinstance(exc, S3UploadFailedError | S3TransferFailedError):
            # boto3's transfer manager wraps the real ClientError/BotoCoreError: translate that one.
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, ClientError | BotoCoreError):
                return self._translate(inner, what)
            return StoreError(f"{what}: S3 transfer to {self.url} failed ({type(exc).__name__})")
        if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
            return StoreUnreachableError(
                f"{what}: S3 endpoint {where} did not answer in time ({type(exc).__name__}, "
                f"{self.max_attempts} attempts, read timeout {self.read_timeout:g} s); check that it is healthy"
            )
        if isinstance(exc, BotoCoreError):
            return StoreUnreachableError(f"{what}: S3 request to {where} failed ({type(exc).__name__})")
        return StoreError(f"{what}: {exc}")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._translate(exc, what) from None

    def check(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(f"store {self.url}", self.client.head_bucket, Bucket=self.bucket)
        except StoreError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                "404",
                "NoSuchBucket",
            ):
                raise self._translate(
                    ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"), f"store {self.url}"
                ) from None
            raise

    # ---- primitives -----------------------------------------------------------------------------
    def _commit(self, manifest: Manifest, staging_dir: Path) -> Manifest:
        from botocore.exceptions import BotoCoreError, ClientError

        writer = f"w-{uuid.uuid4().hex[:16]}"
        entries = [e.model_copy(update={"path": f"{writer}/{e.path}"}) for e in manifest.files]
        committed = manifest.model_copy(update={"files": entries})
        uploaded: list[str] = []
        try:
            for staged, entry in zip(manifest.files, entries, strict=True):
                obj = self._obj(manifest.stage, manifest.key, entry.path)
                self._call(
                    f"upload {manifest.ref}:{entry.name}",
                    self.client.upload_file,
                    str(staging_dir / staged.path),
                    self.bucket,
                    obj,
                    Config=self._transfer,
                )
                uploaded.append(obj)
            manifest_obj = self._obj(manifest.stage, manifest.key, MANIFEST_NAME)
            body = self.manifest_bytes(committed)
            if self._conditional_put:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=manifest_obj, Body=body, IfNoneMatch="*")
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                        self._delete_objects(uploaded)
                        return self.manifest(manifest.ref)
                    if code in ("NotImplemented",) or status == 501:
                        self._conditional_put = False
                    else:
                        raise self._translate(exc, f"commit {manifest.ref}") from None
                except BotoCoreError as exc:
                    raise self._translate(exc, f"commit {manifest.ref}") from None
            if not self._conditional_put:
                if self._read_manifest_bytes(manifest.stage, manifest.key) is not None:
                    self._delete_objects(uploaded)
                    return self.manifest(manifest.ref)
                self._call(
                    f"commit {manifest.ref}",
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=manifest_obj,
                    Body=body,
                )
            return committed
        except BaseException:
            # No manifest was written: best-effort clean-up of our private prefix; never touch other writers.
            try:
                self._delete_objects(uploaded)
            except Exception:
                pass
            raise

    def _delete_objects(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            if chunk:
                self._call(
                    f"delete from {self.url}",
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )

    def _read_manifest_bytes(self, stage: str, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        obj = self._obj(stage, key, MANIFEST_NAME)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=obj)
            data: bytes = resp["Body"].read()
            return data
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._translate(exc, f"read {stage}/{key}") from None
        except BotoCoreError as exc:
            raise self._translate(exc, f"read {stage}/{key}") from None

    def _stream_check(self, manifest: Manifest, entry: FileEntry, dest: Path | None) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        obj = self._obj(manifest.stage, manifest.key, entry.path)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=obj)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return f"artifact {manifest.ref}: file {entry.name!r} is missing"
            raise self._translate(exc, f"read {manifest.ref}:{entry.name}") from None
        except BotoCoreError as exc:
            raise self._translate(exc, f"read {manifest.ref}:{entry.name}") from None
        digest = hashlib.sha256()
        size = 0
        body = resp["Body"]
        out = dest.open("wb") if dest is not None else None
        try:
            while chunk := body.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
        except BotoCoreError as exc:  # the connection dropped or stalled mid-body
            raise self._translate(exc, f"read {manifest.ref}:{entry.name}") from None
        finally:
            if out is not None:
                out.close()
        if size != entry.size:
            return f"artifact {manifest.ref}: file {entry.name!r} has {size} bytes, manifest says {entry.size}"
        if digest.hexdigest() != entry.sha256:
            return f"artifact {manifest.ref}: file {entry.name!r} is corrupt (sha256 mismatch)"
        return None

    def _verify_files(self, manifest: Manifest) -> list[str]:
        problems = []
        for entry in manifest.files:
            problem = self._stream_check(manifest, entry, None)
            if problem:
                problems.append(problem)
        return problems

    def _materialise(self, manifest: Manifest) -> LocalArtifact:
        ref = manifest.ref
        if self._cache.exists(ref):
            try:
                cached = self._cache.get(ref)
                if cached.manifest.content_digest() == manifest.content_digest():
                    return cached
            except CorruptArtifactError:
                pass
            self._cache.delete(ref)
        staging = make_staging_dir(self._cache.staging_root(), "dl-")
        try:
            for entry in manifest.files:
                dest = staging / entry.path
                # Manifest paths are validated on parse; this is the last line of defence before a write.
                if not dest.resolve().is_relative_to(staging.resolve()):
                    raise CorruptArtifactError(f"artifact {ref}: file {entry.path!r} lies outside the artifact")
                dest.parent.mkdir(parents=True, exist_ok=True)
                problem = self._stream_check(manifest, entry, dest)
                if problem:
                    raise CorruptArtifactError(problem + "; run `quantpipe verify` and recompute it")
            (staging / OWNER_FILE).unlink(missing_ok=True)
            self._cache._commit(manifest, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._cache.get(ref)

    def _list_keys(self, stage: str | None) -> Iterator[tuple[str, str]]:
        base = self._obj(stage) + "/" if stage else self._obj() + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    parts = item["Key"][len(self._obj()) + 1 :].split("/")
                    if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                        yield parts[0], parts[1]
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, BotoCoreError | ClientError):
                raise self._translate(exc, f"list {self.url}") from None
            raise

    def _delete(self, stage: str, key: str) -> None:
        if self._read_manifest_bytes(stage, key) is None:
            raise ArtifactNotFoundError(f"no artifact {stage}/{key} in store {self.url}")
        # Manifest first: the artifact stops existing before any payload disappears.
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._obj(stage, key, MANIFEST_NAME))
        prefix = self._obj(stage, key) + "/"
        paginator = self.client.get_paginator("list_objects_v2")

        def payload_keys() -> list[str]:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        self._delete_objects(self._call(f"delete {stage}/{key}", payload_keys))
        if self._cache.exists(f"{stage}/{key}"):
            self._cache.delete(f"{stage}/{key}")
