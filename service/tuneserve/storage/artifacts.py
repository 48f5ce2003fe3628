"""The artifact store: immutable directories of files (adapters, checkpoints, dataset
snapshots) under '/'-separated keys, in a local directory (the default; also what a
ReadWriteMany volume gives every replica) or in S3-compatible object storage.

A key is written once and never changed: the caller puts a version in it
("adapters/<id>/<version>"), so whoever holds a key never sees its files change, and a cache
of keys needs no invalidation. A key appears whole or not at all. The local backend copies
into a temporary directory and renames it into place. S3 has no rename, so the files go up
first and the marker object `<key>/.complete` (a manifest: each file and its size) last;
readers treat a key without its marker as absent, so a writer that died mid-upload leaves
only invisible objects, which `delete` removes.

Errors say what the caller can do. A network failure, a 5xx or throttling from S3 is
`Unavailable` (retry later); a missing bucket or refused credentials is `FailedPrecondition`
(fix the configuration); an absent key is FileNotFoundError, a key already written
FileExistsError, a malformed key ValueError (keys come from our code: that is a bug). Local
disk errors (ENOSPC) stay OSError.

Both stores are thread-safe: the local one by its atomic renames, the S3 one because a boto3
client may be shared between threads. boto3 is imported only when an S3 store is made."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from tuneserve.errors import (
    FailedPrecondition,
    InvalidArgument,
    TuneserveError,
    Unavailable,
    shown,
)

log = logging.getLogger(__name__)

MARKER = ".complete"
"""The object S3 writes last under a key: the key exists once it does."""

_TMP_DIR = ".tmp"  # under a local store's root: writes and deletes in progress
_STALE_TMP_S = 24 * 3600  # a temporary directory this old belongs to a writer that died
# S3 answers that mean "busy or broken right now, retry later" whatever their HTTP status.
_RETRY_LATER_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
     "InternalError", "RequestLimitExceeded", "TooManyRequestsException"}
)  # fmt: skip
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ArtifactStore(Protocol):
    """Immutable directories under keys. Every method may be called from any thread."""

    url: str
    """Where the store is, for logs and messages; never credentials."""

    def put_dir(self, key: str, source: Path) -> int:
        """Upload every file under `source` as key/<relative path> and return the bytes
        written. FileExistsError if the key already has objects (keys are never reused)."""
        ...

    def get_dir(self, key: str, dest: Path) -> None:
        """Download the key's files into `dest`, which must not exist (its parent must), whole
        or not at all. FileNotFoundError when the key is absent."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the key is present and complete."""
        ...

    def delete(self, key: str) -> None:
        """Remove every object under the key, complete or not; nothing to remove is fine."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The directory holding the key's files when the backend has one (read it, never
        write it); None when it has none (S3). FileNotFoundError when the key is absent."""
        ...

    def check(self) -> None:
        """At start-up: reachable and writable, else FailedPrecondition saying why."""
        ...


def check_key(key: str) -> str:
    """`key` if it is a relative '/'-separated name that stays under the store's root.

    Components starting with '.' are refused too: they are the stores' own (temporary
    directories, the S3 marker), so no key can collide with them."""
    if not key:
        raise ValueError("artifact key is empty")
    _check_relative(key, what="artifact key")
    if any(part.startswith(".") for part in key.split("/")):
        raise ValueError(f"artifact key {shown(key)} has a component starting with '.'")
    return key


def _check_relative(name: str, *, what: str) -> None:
    if "\\" in name or "\x00" in name:
        raise ValueError(f"{what} {shown(name)} contains a backslash or NUL")
    if name.startswith("/"):
        raise ValueError(f"{what} {shown(name)} is absolute")
    if ".." in name or any(part in ("", ".") for part in name.split("/")):
        raise ValueError(f"{what} {shown(name)} has an empty, '.' or '..' component")


def dir_bytes(path: Path) -> int:
    """The total size of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source_files(source: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file under `source`, in a stable order. Both backends
    store files only, so an empty directory does not survive a round trip on either."""
    if not source.is_dir():
        raise NotADirectoryError(f"{source} is not a directory")
    files = sorted((p.relative_to(source).as_posix(), p) for p in source.rglob("*") if p.is_file())
    if any(rel == MARKER for rel, _ in files):
        raise ValueError(f"{source} has a top-level file named {MARKER}, the store's marker")
    return files


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A temporary sibling of `dest` to fill; renamed to `dest` if the block succeeds,
    removed if it fails, so `dest` appears whole or not at all."""
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"{dest.parent} is not a directory")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LocalArtifactStore:
    """Keys are directories under `root`. Writes and deletes go through `root/.tmp` (the same
    file system, so the renames are atomic), which lets several processes share the root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.absolute().as_uri()
        self._tmp = root / _TMP_DIR

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fresh_tmp(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp / uuid.uuid4().hex

    def put_dir(self, key: str, source: Path) -> int:
        final = self._path(key)
        files = _source_files(source)
        if final.exists():
            raise FileExistsError(f"artifact {key} already exists in {self.url}")
        tmp = self._fresh_tmp()
        written = 0
        try:
            tmp.mkdir()
            for rel, path in files:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                written += target.stat().st_size
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if final.exists():  # another writer won the race (ENOTEMPTY or EEXIST)
                    raise FileExistsError(f"artifact {key} already exists in {self.url}") from exc
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return written

    def get_dir(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_dir():
            raise FileNotFoundError(f"artifact {key} is absent from {self.url}")
        with _staged(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_dir()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not path.exists():
            return
        doomed = self._fresh_tmp()
        try:
            os.rename(path, doomed)  # gone for readers at once; removing the files takes longer
        except FileNotFoundError:
            return  # deleted by someone else meanwhile
        shutil.rmtree(doomed)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_dir():
            raise FileNotFoundError(f"artifact {key} is absent from {self.url}")
        return path

    def check(self) -> None:
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            probe = self._fresh_tmp()
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise FailedPrecondition(
                f"artifact store {self.url} is not a writable directory: {exc}"
            ) from exc
        # Temporary directories of writers that died; a live writer's are far younger.
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(leftover, ignore_errors=True)


def client_config(**overrides: Any) -> Any:
    """The botocore configuration S3 stores use: bounded connect and read timeouts, a few
    retries of throttling and 5xx, and path-style addressing (which AWS still accepts and
    MinIO and other S3-compatible servers need). `overrides` replace single settings."""
    from botocore.config import Config

    settings: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "s3": {"addressing_style": "path"},
    }
    settings.update(overrides)
    return Config(**settings)


def _storage_problem(exc: BaseException) -> tuple[type[TuneserveError], str] | None:
    """What an exception from boto3 means for our callers: (Unavailable, why) for the
    transient, (FailedPrecondition, why) for the misconfigured, None for anything else."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    # upload_file wraps a ClientError into S3UploadFailedError (raised inside its handler, so
    # the original is the context); download_file wraps a stream that keeps breaking (socket
    # errors, timeouts) into RetriesExceededError. Its writes to the local disk are not
    # wrapped: ENOSPC stays an OSError.
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, RetriesExceededError):  # the body's stream broke, attempt after attempt
        return Unavailable, f"the download broke off: {exc.last_exception}"
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if status >= 500 or code in _RETRY_LATER_CODES:
            return Unavailable, str(exc)
        if code == "NoSuchBucket":
            return FailedPrecondition, "the bucket does not exist"
        if status == 403:
            return FailedPrecondition, f"access denied or credentials refused: {exc}"
        return None
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return FailedPrecondition, f"no usable credentials: {exc}"
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return Unavailable, str(exc)
    return None


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket")


class S3ArtifactStore:
    """Keys are object prefixes under `prefix` in `bucket`; each complete key has its marker.

    `client` None makes a boto3 client configured as every AWS SDK is, from the environment
    (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for MinIO and other S3-compatible servers,
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, profiles, IRSA), with
    `client_config()`."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._made_client = client
        self._lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The client, made on first use: making one reads the environment and the AWS
        configuration files, which `check` reports on, and costs a third of a second."""
        with self._lock:
            if self._made_client is None:
                import boto3

                # A session of its own: boto3's global one is not safe to make clients from
                # in several threads.
                session = boto3.session.Session()
                self._made_client = session.client("s3", config=client_config())
            return self._made_client

    def _name(self, key: str, rel: str = "") -> str:
        return "/".join(part for part in (self.prefix, check_key(key), rel) if part)

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            problem = _storage_problem(exc)
            if problem is None:
                raise
            kind, why = problem
            raise kind(f"object storage {self.url}: {what}: {why}") from exc

    def put_dir(self, key: str, source: Path) -> int:
        base = self._name(key)
        files = _source_files(source)
        with self._translated(f"writing {key}"):
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=base + "/", MaxKeys=1)
            if listed.get("KeyCount", 0) or listed.get("Contents"):
                raise FileExistsError(f"artifact {key} already has objects in {self.url}")
            manifest: dict[str, int] = {}
            try:
                for rel, path in files:
                    manifest[rel] = path.stat().st_size
                    self._client.upload_file(str(path), self.bucket, f"{base}/{rel}")
                body = json.dumps({"files": manifest}, sort_keys=True).encode()
                self._client.put_object(Bucket=self.bucket, Key=f"{base}/{MARKER}", Body=body)
            except BaseException:
                self._remove_quietly(key)
                raise
        return sum(manifest.values())

    def _remove_quietly(self, key: str) -> None:
        """Best effort after a failed upload: objects without a marker are invisible anyway."""
        try:
            self.delete(key)
        except Exception as exc:  # the endpoint that failed the upload may fail this too
            log.warning("could not remove the partial upload of %s from %s: %s", key, self.url, exc)

    def _manifest(self, key: str) -> dict[str, int]:
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._name(key, MARKER))
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"artifact {key} is absent from {self.url}") from exc
            raise
        try:
            files = json.loads(obj["Body"].read())["files"]
            for rel, size in files.items():
                _check_relative(rel, what="file name")
                if not isinstance(size, int):
                    raise ValueError(f"size {size!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FailedPrecondition(
                f"object storage {self.url}: the marker of {key} is damaged: {exc}"
            ) from exc
        return dict(files)

    def get_dir(self, key: str, dest: Path) -> None:
        base = self._name(key)
        with self._translated(f"reading {key}"):
            manifest = self._manifest(key)
            with _staged(dest) as tmp:
                for rel, size in manifest.items():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        self._client.download_file(self.bucket, f"{base}/{rel}", str(target))
                    except Exception as exc:
                        if _is_not_found(exc):
                            raise FileNotFoundError(
                                f"artifact {key} was deleted from {self.url} while it was read"
                            ) from exc
                        raise
                    if target.stat().st_size != size:
                        raise FailedPrecondition(
                            f"object storage {self.url}: {key}/{rel} is "
                            f"{target.stat().st_size} bytes, its marker says {size}"
                        )

    def exists(self, key: str) -> bool:
        with self._translated(f"looking up {key}"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._name(key, MARKER))
            except Exception as exc:
                if _is_not_found(exc):
                    return False
                raise
        return True

    def delete(self, key: str) -> None:
        base = self._name(key)
        with self._translated(f"deleting {key}"):
            # The marker first: the key is absent for every reader from this request on.
            self._client.delete_object(Bucket=self.bucket, Key=f"{base}/{MARKER}")
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + "/"
            )
            for page in pages:
                objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if not objects:
                    continue
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise Unavailable(
                        f"object storage {self.url}: deleting {key}: {len(answer['Errors'])} "
                        f"objects remain, the first {first.get('Key')}: {first.get('Message')}"
                    )

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    def check(self) -> None:
        try:
            client = self._client
        except Exception as exc:  # a profile that does not exist, an endpoint that is no URL
            raise FailedPrecondition(
                f"artifact store {self.url}: no S3 client can be made from the environment "
                f"and AWS configuration: {exc}"
            ) from exc
        endpoint = client.meta.endpoint_url
        probe = "/".join(p for p in (self.prefix, f".check-{uuid.uuid4().hex}") if p)
        try:
            client.head_bucket(Bucket=self.bucket)
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:
            why = self._check_failure(exc)
            if why is None:
                raise
            raise FailedPrecondition(
                f"artifact store {self.url} at {endpoint} cannot be used: {why}"
            ) from exc

    @staticmethod
    def _check_failure(exc: BaseException) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404:  # head_bucket's answer has no body, so no code but the status
                return "the bucket does not exist"
            if status == 403:
                return f"credentials refused or access denied: {exc}"
        problem = _storage_problem(exc)
        if problem is not None:
            kind, why = problem
            return f"the endpoint is unreachable or failing: {why}" if kind is Unavailable else why
        if isinstance(exc, (ClientError, BotoCoreError)):
            return str(exc)
        return None


def open_artifact_store(url: str, *, default_root: Path) -> ArtifactStore:
    """The store a setting names: "" the local directory `default_root`; an absolute path or
    file:///absolute/path a local directory; s3://bucket or s3://bucket/prefix S3, with the
    endpoint and credentials from the environment as the AWS SDKs read them."""
    if url == "":
        return LocalArtifactStore(default_root)
    if url.startswith("/"):
        return LocalArtifactStore(Path(url))
    parts = urlsplit(url)
    plain = not parts.query and not parts.fragment and "@" not in parts.netloc
    if parts.scheme == "file" and plain and parts.netloc in ("", "localhost"):
        path = unquote(parts.path)
        if path.startswith("/"):
            return LocalArtifactStore(Path(path))
    problem = "is not accepted"
    if parts.scheme == "s3" and plain and _BUCKET_RE.match(parts.netloc):
        prefix = parts.path.strip("/")
        try:
            if prefix:
                check_key(prefix)
        except ValueError as exc:
            problem = f"has an unusable prefix ({exc})"
        else:
            return S3ArtifactStore(parts.netloc, prefix)
    # Credentials never belong in this URL; if someone put them there, do not echo them.
    quoted = "the value" if "@" in url else shown(url)
    raise InvalidArgument(
        f"artifact_store: {quoted} {problem}: use '' (the data directory), an absolute path "
        "or file:///absolute/path (a local or shared directory), or s3://bucket or "
        "s3://bucket/prefix (S3-compatible storage, endpoint and credentials from the "
        "environment)",
        field="artifact_store",
    )
