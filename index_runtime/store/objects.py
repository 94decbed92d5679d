"""Object-store interface and its two implementations: a local directory and S3 (boto3).

Both give the same semantics, which the rest of the store relies on:

* ``put`` replaces an object atomically: a reader sees the old bytes or the new, never a mix.
* ``put_if_absent`` creates an object only if no object has that key, atomically; it returns
  ``False`` when one exists. Manifests are committed with it.
* ``get`` of a missing key raises :class:`ObjectNotFoundError`.
* ``list`` returns every key under a prefix with its size and modification time.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from index_runtime.errors import (
    CredentialsError,
    ObjectNotFoundError,
    StoreConfigError,
    StoreUnavailableError,
)
from index_runtime.faults import fault_point, object_point, storage_error


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class ObjectStore(Protocol):
    """What the segment store needs from object storage."""

    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool: ...

    def put_advisory(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def describe(self) -> str: ...


def _check_key(key: str) -> None:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed or linked names) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirStore:
    """Objects as files under ``root``. Durable: every write is fsynced with its directory.

    A failing local write raises :class:`InsufficientStorageError` (disk full) or
    :class:`StorageFaultError` (other I/O errors), and the object is then as before: the
    bytes go to a temp file first, which is removed on failure.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(f"cannot use {self.root} as a data directory: {exc}") from exc
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def describe(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def _write_temp(self, key: str, data: bytes | memoryview, sync: bool = True) -> Path:
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="obj-")
        try:
            with os.fdopen(fd, "wb") as f:
                fault_point(object_point(key))
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_temp(key, data)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise storage_error(exc, f"writing {key!r} to {self.describe()}") from exc

    def put_advisory(self, key: str, data: bytes) -> None:
        """Replace an advisory object (the manifest hint): one whose loss, staleness or
        emptiness after a crash costs its readers a slower path and nothing else. Atomic like
        :meth:`put` but not fsynced once the object exists (its first version is, so that its
        name is durable)."""
        path = self._path(key)
        if not path.is_file():
            self.put(key, data)
            return
        try:
            os.replace(self._write_temp(key, data, sync=False), path)
        except OSError as exc:
            raise storage_error(exc, f"writing {key!r} to {self.describe()}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # temp file -> fsync -> link (atomic, fails if the name exists) -> fsync the directory
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_temp(key, data)
        except OSError as exc:
            raise storage_error(exc, f"writing {key!r} to {self.describe()}") from exc
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage_error(exc, f"writing {key!r} to {self.describe()}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        try:
            fsync_dir(path.parent)
        except OSError as exc:
            # not durable: take the name back so the caller's "failed" stays true
            path.unlink(missing_ok=True)
            raise storage_error(exc, f"committing {key!r} in {self.describe()}") from exc
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key!r} not found in {self.describe()}") from None

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` (lets readers memory-map segments instead of copying)."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".tmp" or rel_dir.startswith(".tmp" + os.sep):
                dirnames[:] = []
                continue
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    st = os.stat(os.path.join(dirpath, name))
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class S3Config:
    """Where the objects live. Credentials are not part of it: they come from the environment,
    a shared credentials file or workload identity, through botocore's default chain."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_attempts: int = 5  # botocore attempts per call (standard mode: backoff with jitter)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "UnrecognizedClientException",
    "403",
}


CRC_META = "driftless-crc32"  # x-amz-meta-driftless-crc32: the body's CRC32, checked on get


def check_body(data: bytes, content_length: int | None, crc: str | None) -> str | None:
    """Why a GET body is not the object that was put (truncated, corrupted), or None."""
    if content_length is not None and len(data) != content_length:
        return f"got {len(data)} of {content_length} bytes"
    if crc is not None and crc != f"{zlib.crc32(data):08x}":
        return f"CRC32 {zlib.crc32(data):08x} != {crc} recorded at put"
    return None


class S3Store:
    """Objects in an S3 bucket under a prefix, through boto3.

    Conditional creates use ``If-None-Match: *`` (HTTP 412 when the key exists). Every call
    has connect/read timeouts and botocore's standard retries (exponential backoff with
    jitter on 5xx, SlowDown, throttling, connection errors). Every put records the body's
    CRC32 as object metadata; a GET whose body is short of its Content-Length or fails the
    CRC is retried and, if it stays bad, raises :class:`StoreUnavailableError`: a truncated
    body is never parsed as an object.
    """

    def __init__(self, config: S3Config, *, client: Any = None) -> None:
        import boto3
        from botocore.config import Config

        self.config = config
        self._prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        if client is None:
            session = boto3.session.Session(profile_name=config.profile)
            client = session.client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                config=Config(
                    retries={"max_attempts": config.max_attempts, "mode": "standard"},
                    connect_timeout=config.connect_timeout_s,
                    read_timeout=config.read_timeout_s,
                ),
            )
        self.client = client
        self._check_bucket()

    def describe(self) -> str:
        where = f" at {self.config.endpoint_url}" if self.config.endpoint_url else ""
        return f"s3://{self.config.bucket}/{self._prefix}{where}"

    def __repr__(self) -> str:  # never show credentials: there are none in here to show
        return f"S3Store({self.describe()})"

    def _k(self, key: str) -> str:
        _check_key(key)
        return self._prefix + key

    def _translate(self, exc: Exception, action: str, key: str = "") -> Exception:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        what = f"{action} {key!r} on {self.describe()}" if key else f"{action} on {self.describe()}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return CredentialsError(f"{what}: no usable S3 credentials were found")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchBucket",) or (action == "open bucket" and code in ("404",)):
                return StoreConfigError(f"{what}: bucket {self.config.bucket!r} does not exist")
            if code in ("NoSuchKey", "404") or status == 404:
                return ObjectNotFoundError(f"object {key!r} not found in {self.describe()}")
            if code in _CREDENTIAL_CODES or status == 403:
                return CredentialsError(f"{what}: the S3 service refused the credentials ({code})")
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return StoreUnavailableError(f"{what}: S3 answered {code or status}")
            return StoreConfigError(f"{what}: S3 answered {code or status}")
        if isinstance(exc, EndpointConnectionError | BotoCoreError):
            return StoreUnavailableError(f"{what}: {type(exc).__name__}")
        return exc

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.config.bucket)
        except Exception as exc:
            raise self._translate(exc, "open bucket") from None

    def put(self, key: str, data: bytes | memoryview) -> None:
        body = data if isinstance(data, bytes) else bytes(data)  # botocore wants bytes
        try:
            self.client.put_object(
                Bucket=self.config.bucket, Key=self._k(key), Body=body, Metadata=_meta(body)
            )
        except Exception as exc:
            raise self._translate(exc, "put", key) from None

    def put_advisory(self, key: str, data: bytes) -> None:
        self.put(key, data)  # (every S3 put is durable once answered)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.config.bucket,
                Key=self._k(key),
                Body=data,
                IfNoneMatch="*",
                Metadata=_meta(data),
            )
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            # 412: the key exists. 409 ConditionalRequestConflict: a concurrent conditional
            # write to the same key is in flight; either way we did not create it.
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._translate(exc, "conditional put", key) from None
        except Exception as exc:
            raise self._translate(exc, "conditional put", key) from None

    def get(self, key: str) -> bytes:
        problem = ""
        for attempt in range(max(1, self.config.max_attempts)):
            if attempt:
                time.sleep(min(2.0, 0.05 * 2**attempt))
            try:
                resp = self.client.get_object(Bucket=self.config.bucket, Key=self._k(key))
                data: bytes = resp["Body"].read()
            except Exception as exc:
                err = self._translate(exc, "get", key)
                if not isinstance(err, StoreUnavailableError):
                    raise err from None
                problem = str(err)  # e.g. IncompleteReadError: a connection cut mid-body
                continue
            length = resp.get("ContentLength")
            problem = check_body(data, length, resp.get("Metadata", {}).get(CRC_META)) or ""
            if not problem:
                return data
        raise StoreUnavailableError(f"get {key!r} on {self.describe()}: bad body ({problem})")

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.config.bucket, Key=self._k(key))
            return True
        except Exception as exc:
            err = self._translate(exc, "head", key)
            if isinstance(err, ObjectNotFoundError):
                return False
            raise err from None

    def _iter_list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.config.bucket, Prefix=self._prefix + prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self._prefix) :]
                yield ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        try:
            return sorted(self._iter_list(prefix), key=lambda o: o.key)
        except Exception as exc:
            raise self._translate(exc, "list", prefix) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.config.bucket, Key=self._k(key))
        except Exception as exc:
            raise self._translate(exc, "delete", key) from None


def _meta(data: bytes) -> dict[str, str]:
    return {CRC_META: f"{zlib.crc32(data):08x}"}


def new_object_name(kind: str, suffix: str) -> str:
    """A unique, time-ordered object key such as ``segments/1700000000123-<uuid>.arrow``."""
    return f"{kind}/{int(time.time() * 1000):013d}-{uuid.uuid4().hex}{suffix}"


def segment_source(store: ObjectStore, key: str) -> bytes | str:
    """What ``iter_segment`` reads: a local path (memory-mapped, only touched pages load) or
    the object's bytes."""
    if isinstance(store, LocalDirStore):
        return str(store.local_path(key))
    return store.get(key)


def prefetch_segment(store: ObjectStore, key: str) -> None:
    """Ask the kernel to start reading a local segment into the page cache (a hint: returns at
    once, no error if it cannot); compaction asks for its next input while it reads this one."""
    if not isinstance(store, LocalDirStore) or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(store.local_path(key), os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
