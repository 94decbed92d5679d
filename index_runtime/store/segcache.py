"""A bounded local cache of segment files, memory-mapped for readers (I/O edge).

Readers that keep raw vectors on disk (``vectors: mmap``) map segments from local copies:
:meth:`SegmentCache.open` fetches a segment from the object store on first use, writes it
under the cache directory with a sidecar (object key, size, CRC32 of the bytes), maps it
and returns a :class:`MappedSegment` handle. The handle is what keeps a segment *in use*:
views hold it (through their vectors) and the cache only tracks it weakly, so a segment is
in use exactly as long as some view or builder can still read it.

* **Budget.** Past ``budget_bytes`` the least recently used files *not in use* are
  deleted (:func:`plan_eviction`, pure). Files in use are never deleted, so the cache can
  stand over its budget while the serving view needs more than the budget (logged). Even a
  file deleted by someone else stays readable through its mapping on Linux (an unlinked
  file lives on while mapped); the cache does not rely on that.
* **Integrity.** A cached file is used again (by a later view or a restarted process) only
  if its size and CRC32 match its sidecar, its size matches the manifest's, Arrow can open
  it, and the object still exists in the store. Otherwise it is deleted and fetched again
  (or, if the store no longer has the object, refused: a segment removed by GC is never
  served from the cache). Corruption of a file *while* it is mapped is not detected.
* **Unreferenced segments.** :meth:`SegmentCache.retain` drops files of segments the newest
  manifest no longer lists (compacted away), once no view uses them.
* **One process per directory**, held by an ``flock`` on ``.lock`` (two processes would
  delete each other's files and miscount the budget): a second one gets
  :class:`StoreConfigError` naming the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from index_runtime.errors import CorruptObjectError, ObjectNotFoundError, StoreConfigError
from index_runtime.faults import storage_error
from index_runtime.store.objects import ObjectStore
from index_runtime.store.rows import KeyType
from index_runtime.store.segment import open_segment

log = logging.getLogger(__name__)

SUFFIX = ".arrow"
SIDECAR = ".json"
LOCK = ".lock"


@dataclass(frozen=True)
class CacheEntry:
    key: str  # object key
    bytes: int
    last_used: int  # a logical clock: higher is more recent


def plan_eviction(
    entries: Iterable[CacheEntry], budget_bytes: int, in_use: Collection[str]
) -> list[str]:
    """Keys to delete so the cache fits ``budget_bytes``: least recently used first, never
    one in ``in_use``. May leave the cache over budget when what is in use exceeds it."""
    entries = list(entries)
    total = sum(e.bytes for e in entries)
    out: list[str] = []
    for e in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if total <= budget_bytes:
            break
        if e.key in in_use:
            continue
        out.append(e.key)
        total -= e.bytes
    return out


class MappedSegment:
    """One cached segment file, memory-mapped and opened as an Arrow IPC file. Holding it
    keeps the segment in use (never evicted)."""

    def __init__(self, key: str, path: Path, reader: Any, nbytes: int) -> None:
        self.key = key
        self.path = path
        self.reader = reader
        self.nbytes = nbytes

    def batches(self) -> list[pa.RecordBatch]:
        return [self.reader.get_batch(i) for i in range(self.reader.num_record_batches)]


@dataclass
class CacheStats:
    """Counts since the cache was made (the metrics follow their increase)."""

    fetches: int = 0  # segments fetched from the object store
    reused: int = 0  # cached files verified and mapped again (no fetch)
    evictions: int = 0
    rejected: int = 0  # cached files found corrupt or truncated (deleted, fetched again)
    hits: int = 0  # opens answered without the store: a handle in use or a verified file
    misses: int = 0  # opens that went to the store (failed fetches included)


@dataclass(frozen=True)
class CacheState:
    """What the metrics read, taken under the cache's lock."""

    bytes: int  # files on disk
    in_use_bytes: int  # of which views still read
    budget_bytes: int
    stats: CacheStats


WRITE_PIECE = 64 << 10


def _write_in_pieces(path: Path, data: bytes) -> None:
    """Write ``data`` in 64 KiB writes. The page cache keeps a file in folios sized by the
    writes that made them (Linux 6.x, ext4: one 64 MiB write made 2 MiB folios), and a
    fault maps the whole folio around the page read: a mapped reader reading one vector
    then held 2 MiB of the file, now 64 KiB (the kernel's fault-around window)."""
    view = memoryview(data)
    with open(path, "wb") as f:
        for at in range(0, len(view), WRITE_PIECE):
            f.write(view[at : at + WRITE_PIECE])


class SegmentCache:
    """Segment files of one index under ``directory``, at most ``budget_bytes`` of them
    when nothing in use prevents it. Thread-safe."""

    def __init__(
        self,
        store: ObjectStore,
        directory: str | os.PathLike[str],
        budget_bytes: int,
        key_type: KeyType,
        on_fetch: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.on_fetch = on_fetch  # seconds of each fetch that succeeded (get, write, map)
        self.dir = Path(directory)
        self.budget_bytes = budget_bytes
        self.key_type = key_type
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._clock = itertools.count(1)
        self._entries: dict[str, CacheEntry] = {}
        self._open: weakref.WeakValueDictionary[str, MappedSegment] = weakref.WeakValueDictionary()
        self._released: dict[str, int] = {}  # key -> clock when its handle died
        self._over = False  # over budget (what is in use needs more)
        self._lock_fd: int | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreConfigError(f"cannot use {self.dir} as a vector cache: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreConfigError(
                f"the vector cache {self.dir} is in use by another process or cache "
                "(give each process its own --vector-cache-dir)"
            ) from None
        self._scan()

    def close(self) -> None:
        """Let another cache use the directory (the mapped segments stay readable)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __del__(self) -> None:
        self.close()

    # the state on disk --------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:40] + SUFFIX)

    def _scan(self) -> None:
        """Adopt the files a previous process left (checked when used), drop debris."""
        found = []
        for side in self.dir.glob("*" + SIDECAR):
            try:
                meta = json.loads(side.read_text())
                data = side.with_suffix(SUFFIX)
                if data != self._path(meta["key"]) or not data.is_file():
                    raise ValueError("no data file")
                found.append((data.stat().st_mtime, meta["key"], int(meta["bytes"])))
            except (OSError, ValueError, KeyError, TypeError):
                side.unlink(missing_ok=True)
        for mtime_key in sorted(found):
            _, key, size = mtime_key
            self._entries[key] = CacheEntry(key, size, next(self._clock))
        known = {self._path(k).name for k in self._entries}
        for f in self.dir.iterdir():
            if f.suffix != SIDECAR and f.name not in known and f.name != LOCK:
                f.unlink(missing_ok=True)  # temp files and data files without a sidecar

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    def cached(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def in_use(self) -> set[str]:
        return set(self._open.keys())

    def state(self) -> CacheState:
        with self._lock:
            in_use = self.in_use()
            return CacheState(
                self.bytes,
                sum(e.bytes for k, e in self._entries.items() if k in in_use),
                self.budget_bytes,
                CacheStats(**vars(self.stats)),
            )

    # opening ------------------------------------------------------------------------------

    def open(self, key: str, expect_bytes: int | None = None) -> MappedSegment:
        """The mapped segment ``key``: the handle in use, else the verified cached file, else
        a fresh copy from the store. ``expect_bytes`` is the manifest's size of the object."""
        with self._lock:
            h = self._open.get(key)
            if h is None:
                h = self._from_disk(key, expect_bytes) if key in self._entries else None
                if h is None:
                    self.stats.misses += 1
                    h = self._fetch(key, expect_bytes)
                else:
                    self.stats.hits += 1
                self._open[key] = h
            else:
                self.stats.hits += 1
                weakref.finalize(h, self._on_release, key)
            self._touch(key)
            self._evict()
            return h

    def _on_release(self, key: str) -> None:
        # runs when the last holder of a handle lets go, possibly inside ``open`` on this
        # thread: no lock (a dict store and itertools.count are atomic under the GIL)
        self._released[key] = next(self._clock)

    def _touch(self, key: str) -> None:
        e = self._entries[key]
        self._entries[key] = CacheEntry(e.key, e.bytes, next(self._clock))

    def _from_disk(self, key: str, expect_bytes: int | None) -> MappedSegment | None:
        path = self._path(key)
        try:
            meta = json.loads(path.with_suffix(SIDECAR).read_text())
            size = path.stat().st_size
            if meta.get("key") != key or size != meta.get("bytes"):
                raise CorruptObjectError(f"size {size}, sidecar {meta}")
            if expect_bytes is not None and size != expect_bytes:
                raise CorruptObjectError(f"size {size}, the manifest says {expect_bytes}")
            with pa.memory_map(str(path), "r") as mm:  # one read of the file, no copy
                crc = f"{zlib.crc32(memoryview(mm.read_buffer())):08x}"
            if crc != meta.get("crc32"):
                raise CorruptObjectError(f"CRC32 {crc}, sidecar {meta.get('crc32')}")
            h = MappedSegment(key, path, open_segment(str(path), self.key_type), size)
        except (OSError, ValueError, CorruptObjectError) as exc:
            self.stats.rejected += 1
            # the message, not the exception: a kept log record would pin its traceback's
            # frames, and with them the views (and mapped segments) the callers held
            log.warning("cached segment %s rejected (%s); fetching it again", key, str(exc))
            self._drop(key)
            return None
        if not self.store.exists(key):  # removed by GC: never served from the cache
            self._drop(key)
            raise ObjectNotFoundError(f"segment {key!r} is no longer in {self.store.describe()}")
        self.stats.reused += 1
        return h

    def _fetch(self, key: str, expect_bytes: int | None) -> MappedSegment:
        started = time.perf_counter()
        data = self.store.get(key)
        if expect_bytes is not None and len(data) != expect_bytes:
            raise CorruptObjectError(
                f"segment {key!r} has {len(data)} bytes; the manifest says {expect_bytes}"
            )
        path = self._path(key)
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        try:
            _write_in_pieces(tmp, data)
            os.replace(tmp, path)
            side = self.dir / f".tmp-{uuid.uuid4().hex}"
            side.write_text(
                json.dumps({"key": key, "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"})
            )
            os.replace(side, path.with_suffix(SIDECAR))
        except OSError as exc:  # e.g. the cache's volume is full: 507, the old view serves on
            tmp.unlink(missing_ok=True)
            self._drop(key)
            raise storage_error(exc, f"caching segment {key!r} in {self.dir}") from exc
        del data
        try:
            h = MappedSegment(
                key, path, open_segment(str(path), self.key_type), path.stat().st_size
            )
        except CorruptObjectError:
            self._drop(key)  # the store's copy is unreadable: nothing to cache
            raise
        self._entries[key] = CacheEntry(key, h.nbytes, 0)
        self.stats.fetches += 1
        if self.on_fetch is not None:
            self.on_fetch(time.perf_counter() - started)
        return h

    # eviction -----------------------------------------------------------------------------

    def _drop(self, key: str) -> None:
        self._entries.pop(key, None)
        path = self._path(key)
        path.with_suffix(SIDECAR).unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def _evict(self, extra: Collection[str] = ()) -> None:
        for key, at in list(self._released.items()):  # released handles: last used then
            self._released.pop(key, None)
            if key in self._entries and key not in self._open:
                e = self._entries[key]
                self._entries[key] = CacheEntry(key, e.bytes, at)
        in_use = self.in_use()
        drop = [k for k in extra if k in self._entries and k not in in_use]
        drop += plan_eviction(
            (e for k, e in self._entries.items() if k not in drop), self.budget_bytes, in_use
        )
        for key in drop:
            self._drop(key)
            self.stats.evictions += 1
        over = self.bytes > self.budget_bytes
        if over and not self._over:  # logged when it goes over, not at every open
            log.warning(
                "segment cache %s holds %d bytes in use, over its budget of %d",
                self.dir,
                self.bytes,
                self.budget_bytes,
            )
        self._over = over

    def retain(self, keys: Collection[str]) -> None:
        """Delete cached segments not in ``keys`` (the newest manifest's) and not in use."""
        keep = set(keys)
        with self._lock:
            self._evict([k for k in self._entries if k not in keep])
