"""Write-ahead log on local disk (the writer's volume), fsynced before acknowledgement.

Files ``wal-<first seq:020d>.log`` hold records ``<u32 length><u32 crc32><payload>``; the
payload is one write batch as Arrow IPC bytes. A torn or corrupt record ends its file: it was
never acknowledged, because acknowledgement waits for the fsync that would have made it whole.
Files are rotated at each flush and deleted once every seq in them is in a committed segment.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from index_runtime.crash import crash_point
from index_runtime.store.objects import fsync_dir
from index_runtime.store.rows import KeyType, RowBatch
from index_runtime.store.segment import encode_segment, read_segment

_HEADER = struct.Struct("<II")


def _first_seq(path: Path) -> int:
    return int(path.name[4:-4])


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
        self.bytes = self._disk_bytes()  # bytes in WAL files (a bound for backpressure)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("wal-*.log"), key=_first_seq)

    def _disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def rotate(self, next_seq: int) -> None:
        """Start a new file for seqs from ``next_seq`` on (the old file is left for replay)."""
        self.close()
        path = self.dir / f"wal-{next_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._path = path
        fsync_dir(self.dir)  # the new file's name must survive a crash too

    def append(self, batch: RowBatch) -> None:
        """Write ``batch`` and fsync. Only after this returns may the write be acknowledged."""
        assert self._fd is not None, "rotate() before append()"
        payload = encode_segment(batch, self.key_type, self.dims)
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        view = memoryview(record)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes += len(record)
        crash_point("wal.appended")
        os.fsync(self._fd)
        crash_point("wal.fsynced")

    def truncate_upto(self, flushed_seq: int) -> None:
        """Delete the files all of whose seqs are <= ``flushed_seq`` (never the open one)."""
        files = self.files()
        for path, following in itertools.pairwise(files):
            if _first_seq(following) <= flushed_seq + 1 and path != self._path:
                path.unlink(missing_ok=True)
        self.bytes = self._disk_bytes()

    def replay(self, after_seq: int) -> Iterator[RowBatch]:
        """Yield logged batches in order, only rows with seq > ``after_seq``."""
        for path in self.files():
            for batch in self._read_file(path):
                if len(batch) and int(batch.seqs[-1]) > after_seq:
                    keep = batch.seqs > after_seq
                    if not keep.all():
                        batch = batch.take(np.flatnonzero(keep))
                    yield batch

    def _read_file(self, path: Path) -> Iterator[RowBatch]:
        data = path.read_bytes()
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            start, end = pos + _HEADER.size, pos + _HEADER.size + length
            if end > len(data) or zlib.crc32(data[start:end]) != crc:
                return  # torn tail: never acknowledged
            yield read_segment(data[start:end], self.key_type)
            pos = end

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
