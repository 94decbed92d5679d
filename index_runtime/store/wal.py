"""Write-ahead log on local disk (the writer's volume), fsynced before acknowledgement.

Files ``wal-<first seq:020d>[-<gen>].log`` hold records ``<u32 length><u32 crc32><payload>``;
the payload is one write batch as Arrow IPC bytes, or a *fence* (below). Replay reads every
file in (first seq, gen) order; within a file it stops at the first torn or corrupt record.

Invariant: no acknowledged record ever sits behind bytes that were not acknowledged, so
stopping at the first bad record never hides an acknowledged one. A failed append (write or
fsync raising ``OSError``) is cut off again (``ftruncate`` to the last good offset, then
``fsync``) before the error is reported. If even that fails the WAL is *broken*: the next
append first retries the cut, else starts a new file whose first record is a fence naming the
old file and its last good offset; replay ignores everything of that file beyond the fence.
Until one of the two succeeds, every append is refused.

After a failed fsync the page cache state is unknown (the kernel may write the failed pages
later, or drop them): we never trust it. The record is not acknowledged; once the cut or the
fence is durable it can never be replayed. Between the failure and that repair (a crash in
that window) it may be replayed: the client was told the outcome is *unknown* in that case
(:meth:`Wal.append` says so), never that it failed. Upserts and deletes are idempotent, so a
retry is always safe.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from index_runtime.crash import crash_point
from index_runtime.errors import DriftlessError
from index_runtime.faults import fault_point, storage_error
from index_runtime.store.objects import fsync_dir
from index_runtime.store.rows import KeyType, RowBatch
from index_runtime.store.segment import encode_segment, read_segment

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_FENCE = b"DLWALFENCE1\x00"  # never the start of an Arrow IPC stream (0xFFFFFFFF)
_FENCE_LEN = struct.Struct("<Q")


def file_order(path: Path) -> tuple[int, int]:
    """(first seq, generation) of ``wal-<seq>[-<gen>].log``."""
    seq, _, gen = path.name[4:-4].partition("-")
    return int(seq), int(gen or 0)


def _record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def fence_payload(name: str, good: int) -> bytes:
    """A fence: file ``name`` holds nothing replayable beyond byte ``good``."""
    return _FENCE + _FENCE_LEN.pack(good) + name.encode()


def parse_fence(payload: bytes) -> tuple[str, int] | None:
    if not payload.startswith(_FENCE):
        return None
    (good,) = _FENCE_LEN.unpack_from(payload, len(_FENCE))
    return payload[len(_FENCE) + _FENCE_LEN.size :].decode(), good


def read_records(data: bytes, limit: int | None = None) -> Iterator[bytes]:
    """The payloads of the whole records in ``data[:limit]``, up to the first bad one."""
    end_all = len(data) if limit is None else min(limit, len(data))
    pos = 0
    while pos + _HEADER.size <= end_all:
        length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if end > end_all or zlib.crc32(data[start:end]) != crc:
            return  # torn or corrupt: nothing acknowledged follows it in this file
        yield data[start:end]
        pos = end


class Wal:
    def __init__(
        self, directory: str | os.PathLike[str], key_type: KeyType, dims: Mapping[str, int]
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_type = key_type
        self.dims = dict(dims)
        self._fd: int | None = None
        self._path: Path | None = None
        self._good = 0  # end of the last acknowledged record in the open file
        self.broken: OSError | None = None  # a failed append could not be cut off yet
        self.bytes = self._disk_bytes()  # bytes in WAL files (a bound for backpressure)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("wal-*.log"), key=file_order)

    def _disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _new_file(self, next_seq: int, first_record: bytes = b"") -> tuple[int, Path]:
        """Create the next file (with ``first_record`` fsynced in it) and fsync the directory."""
        taken = {p.name for p in self.files()}
        path = next(
            self.dir / name
            for gen in itertools.count()
            if (name := f"wal-{next_seq:020d}{f'-{gen}' if gen else ''}.log") not in taken
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fault_point("wal.rotate")
            if first_record:
                os.write(fd, first_record)
                os.fsync(fd)
            fsync_dir(self.dir)  # the new file's name must survive a crash too
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd, path

    def rotate(self, next_seq: int) -> None:
        """Start a new file for seqs from ``next_seq`` on (the old file is left for replay).

        If the new file cannot be created while a file is open, appends go on in the open
        file (rotation is only for truncation) and the next rotate tries again.
        """
        if self.broken is not None:
            return  # the next append repairs (cut or fence) before anything else
        try:
            fd, path = self._new_file(next_seq)
        except OSError as exc:
            if self._fd is None:
                raise storage_error(exc, "creating a WAL file") from exc
            log.warning("could not start a new WAL file (appending to the old one): %s", exc)
            return
        self.close()
        self._fd, self._path, self._good = fd, path, 0

    def append(self, batch: RowBatch) -> None:
        """Write ``batch`` and fsync. Only after this returns may the write be acknowledged.

        Raises :class:`InsufficientStorageError` / :class:`StorageFaultError` when the disk
        refuses; the batch is then cut off again (not applied), or, if even that failed, the
        error says the outcome is unknown and the next append repairs first.
        """
        assert self._fd is not None, "rotate() before append()"
        if self.broken is not None:
            self._repair(int(batch.seqs[0]) if len(batch) else 0)
        record = _record(encode_segment(batch, self.key_type, self.dims))
        try:
            half = len(record) // 2  # a fault between the halves leaves a torn record
            for i, part in enumerate((record[:half], record[half:])):
                if i:
                    fault_point("wal.write")
                view = memoryview(part)
                while view:
                    view = view[os.write(self._fd, view) :]
            crash_point("wal.appended")
            fault_point("wal.fsync")
            os.fsync(self._fd)
        except OSError as exc:
            raise self._failed(exc) from exc
        self._good += len(record)
        self.bytes += len(record)
        crash_point("wal.fsynced")

    def _cut(self) -> bool:
        """Cut the open file back to its last good offset, durably. False if that failed."""
        assert self._fd is not None
        try:
            fault_point("wal.truncate")
            os.ftruncate(self._fd, self._good)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("could not cut a failed WAL record off %s: %s", self._path, exc)
            return False
        return True

    def _failed(self, exc: OSError) -> DriftlessError:
        if self._cut():
            self.bytes = self._disk_bytes()
            return storage_error(exc, "appending to the WAL")
        self.broken = exc
        err = storage_error(exc, "appending to the WAL")
        return type(err)(
            f"appending to the WAL failed ({exc}) and the record could not be cut off; its "
            f"outcome is unknown until the WAL is repaired (retry: writes are idempotent)"
        )

    def _repair(self, next_seq: int) -> None:
        """Before an append on a broken WAL: cut the old record off, or fence it in a new file."""
        assert self._fd is not None and self._path is not None and self.broken is not None
        if not self._cut():
            try:
                fd, path = self._new_file(
                    next_seq, _record(fence_payload(self._path.name, self._good))
                )
            except OSError as exc:
                raise storage_error(exc, "repairing the WAL after a failed append") from exc
            self.close()
            self._fd, self._path = fd, path
            self._good = os.fstat(fd).st_size
        log.warning("WAL repaired after a failed append (%s)", self.broken)
        self.broken = None
        self.bytes = self._disk_bytes()

    def truncate_upto(self, flushed_seq: int) -> None:
        """Delete the files all of whose seqs are <= ``flushed_seq`` (never the open one)."""
        files = self.files()
        try:
            for path, following in itertools.pairwise(files):
                if file_order(following)[0] <= flushed_seq + 1 and path != self._path:
                    path.unlink(missing_ok=True)
            self.bytes = self._disk_bytes()
        except OSError as exc:  # the rows are committed: a leftover file only costs replay
            log.warning("could not delete flushed WAL files (will retry): %s", exc)

    def replay(self, after_seq: int) -> Iterator[RowBatch]:
        """Yield logged batches in order, only rows with seq > ``after_seq``. Every file is
        read; a fence in a later file bounds the file it names."""
        files = [(p, p.read_bytes()) for p in self.files()]
        limits: dict[str, int] = {}
        for _, data in files:
            for payload in itertools.islice(read_records(data), 1):
                fence = parse_fence(payload)
                if fence is not None:
                    limits[fence[0]] = min(fence[1], limits.get(fence[0], fence[1]))
        for path, data in files:
            for payload in read_records(data, limits.get(path.name)):
                if parse_fence(payload) is not None:
                    continue
                batch = read_segment(payload, self.key_type)
                if len(batch) and int(batch.seqs[-1]) > after_seq:
                    keep = batch.seqs > after_seq
                    if not keep.all():
                        batch = batch.take(np.flatnonzero(keep))
                    yield batch

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

