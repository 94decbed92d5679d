"""Storage faults at every named point: acknowledged means durable, and errors tell the truth.

Each test injects ``OSError(ENOSPC/EIO)`` at one point (index_runtime.faults), then reopens
the writer *without* closing it (a SIGKILL as far as the WAL and store are concerned) and
compares what survives with what was acknowledged.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from index_runtime import faults
from index_runtime.errors import InsufficientStorageError, StorageFaultError
from index_runtime.store.objects import LocalDirStore, check_body
from index_runtime.store.reader import Snapshot
from index_runtime.store.wal import _record, fence_payload, read_records
from index_runtime.store.writer import IndexWriter
from tests.integration.test_writer import SPEC, cfg, vecs


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.clear()
    yield
    faults.clear()


def reopen_keys(store: LocalDirStore, wal: Path) -> list[int]:
    """Keys visible after a restart (segments plus WAL replay), without closing anything."""
    w = IndexWriter.open(store, wal, cfg())
    rows = Snapshot.open(store, extra_rows=w.pending_batches()).live.rows
    return sorted(int(k) for k in rows.keys.tolist())


def open_writer(tmp_path: Path, **kw: Any) -> tuple[LocalDirStore, IndexWriter]:
    store = LocalDirStore(tmp_path / "data")
    return store, IndexWriter.open(store, tmp_path / "wal", cfg(**kw), create=SPEC)


# --- the parser ------------------------------------------------------------------------------


def test_fault_spec_parsing_and_counting() -> None:
    spec = faults.parse_spec("wal.fsync:EIO:2:3,segment.put:28:1")
    f = spec["wal.fsync"]
    assert (f.errno, f.n, f.count) == (errno.EIO, 2, 3)
    assert [faults.should_fail(f) for _ in range(6)] == [False, True, True, True, False, False]
    assert spec["segment.put"].errno == errno.ENOSPC
    with pytest.raises(ValueError, match="point one of"):
        faults.parse_spec("wal.nowhere:EIO:1")
    forever = faults.parse_spec("wal.write:ENOSPC:1:0")["wal.write"]
    assert all(faults.should_fail(forever) for _ in range(5))


def test_fault_armed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "index.put:ENOSPC:2")
    faults.fault_point("index.put")
    with pytest.raises(OSError) as info:
        faults.fault_point("index.put")
    assert info.value.errno == errno.ENOSPC


# --- WAL -------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["wal.write", "wal.fsync"])
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_failed_append_never_hides_later_acknowledged_writes(
    tmp_path: Path, point: str, err: str
) -> None:
    """The reviewers' bug: a failed append left a torn record; later acks sat behind it."""
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))
    faults.arm(point, err)
    expected = InsufficientStorageError if err == "ENOSPC" else StorageFaultError
    with pytest.raises(expected, match="not applied"):
        w.upsert([2], vecs([2], 1))
    assert [int(k) for b in w.pending_batches() for k in b.keys] == [1]  # memtable unchanged
    ack = w.upsert([3], vecs([3], 1))
    assert ack.first_seq == 2  # the failed write consumed no seq
    assert w.storage.condition()["writable"]
    assert reopen_keys(store, tmp_path / "wal") == [1, 3]


def test_uncuttable_failed_record_is_fenced_off(tmp_path: Path) -> None:
    """fsync fails and so does the cut (twice): the WAL rolls to a new file whose fence makes
    the failed record, whole and valid on disk, unreplayable."""
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))
    faults.arm("wal.fsync", "EIO")
    faults.arm("wal.truncate", "EIO", count=2)
    with pytest.raises(StorageFaultError, match="outcome is unknown"):
        w.upsert([2], vecs([2], 1))
    assert not w.storage.condition()["writable"]
    w.upsert([3], vecs([3], 1))
    assert len(list((tmp_path / "wal").glob("wal-*.log"))) == 2
    assert reopen_keys(store, tmp_path / "wal") == [1, 3]


def test_broken_wal_refuses_writes_until_it_can_repair(tmp_path: Path) -> None:
    store, w = open_writer(tmp_path)
    faults.arm("wal.write", "ENOSPC")
    faults.arm("wal.truncate", "ENOSPC", count=2)
    faults.arm("wal.rotate", "ENOSPC")
    with pytest.raises(InsufficientStorageError):
        w.upsert([1], vecs([1], 1))
    with pytest.raises(InsufficientStorageError, match="repairing the WAL"):
        w.upsert([2], vecs([2], 1))  # cut fails again, the fence file cannot be created
    w.upsert([3], vecs([3], 1))  # space is back: the cut works
    assert reopen_keys(store, tmp_path / "wal") == [3]


def test_replay_reads_every_file_past_a_torn_middle(tmp_path: Path) -> None:
    """Garbage in the middle of file 1 ends file 1 only; file 2's records still replay."""
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))
    w.wal.rotate(2)
    w.upsert([2], vecs([2], 1))
    first, _second = sorted((tmp_path / "wal").glob("wal-*.log"))
    with open(first, "ab") as f:
        f.write(b"\x10\x00\x00\x00garbage-garbage-garbage")
    assert reopen_keys(store, tmp_path / "wal") == [1, 2]


def test_fence_bounds_the_file_it_names(tmp_path: Path) -> None:
    """Two whole, valid records in file 1; a later file's fence ends file 1 after the first."""
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))
    w.upsert([2], vecs([2], 1))
    (path,) = (tmp_path / "wal").glob("wal-*.log")
    first_len = len(next(read_records(path.read_bytes()))) + 8
    (tmp_path / "wal" / "wal-00000000000000000003.log").write_bytes(
        _record(fence_payload(path.name, first_len))
    )
    assert reopen_keys(store, tmp_path / "wal") == [1]
    other = fence_payload("wal-00000000000000000099.log", 0)  # names another file: no effect
    (tmp_path / "wal" / "wal-00000000000000000003.log").write_bytes(_record(other))
    assert reopen_keys(store, tmp_path / "wal") == [1, 2]


# --- flush and bulk --------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["segment.put", "manifest.put"])
def test_flush_failure_after_the_wal_never_fails_the_write(tmp_path: Path, point: str) -> None:
    store, w = open_writer(tmp_path, flush_rows=2)
    faults.arm(point, "ENOSPC")
    ack = w.upsert([1, 2], vecs([1, 2], 1))  # durable in the WAL; its flush fails
    assert ack.rows == 2
    cond = w.storage.condition()
    assert cond["writable"] and cond["reason"] == "InsufficientStorage"
    assert {"op": "flush", "kind": "no_space", "count": 1} in cond["errors"]
    assert w.flush() is not None  # retried later, succeeds
    assert w.storage.condition()["reason"] is None
    assert reopen_keys(store, tmp_path / "wal") == [1, 2]


@pytest.mark.parametrize("point", ["segment.put", "manifest.put"])
def test_bulk_write_on_a_full_disk_is_507_and_invisible(tmp_path: Path, point: str) -> None:
    store, w = open_writer(tmp_path, bulk_rows=4)
    w.upsert([1], vecs([1], 1))
    faults.arm(point, "ENOSPC")
    with pytest.raises(InsufficientStorageError):
        w.upsert([10, 11, 12, 13], vecs([10, 11, 12, 13], 1))
    assert sorted(Snapshot.open(store).live.rows.keys.tolist()) == []
    assert reopen_keys(store, tmp_path / "wal") == [1]


def test_local_object_put_fault_leaves_nothing(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    faults.arm("index.put", "EIO")
    with pytest.raises(StorageFaultError):
        store.put("indexfiles/x.bin", b"abc")
    assert not store.exists("indexfiles/x.bin")
    assert not list((tmp_path / ".tmp").iterdir())


# --- full disk at open -----------------------------------------------------------------------


def test_open_on_a_full_disk_serves_reads_refuses_writes_and_recovers(tmp_path: Path) -> None:
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))  # acknowledged, only in the WAL
    epoch = w.epoch
    faults.arm("manifest.put", "ENOSPC", count=0)  # every manifest write fails from now on
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg())  # no exception: reads go on
    assert [int(k) for b in w2.pending_batches() for k in b.keys] == [1]
    assert w2.storage.condition()["reason"] == "InsufficientStorage"
    assert not w2.storage.condition()["writable"]
    with pytest.raises(InsufficientStorageError, match="epoch"):
        w2.upsert([2], vecs([2], 1))
    faults.clear()
    assert w2.retry_epoch()  # space is back: the background retry takes the epoch
    assert w2.epoch == epoch + 1 and w2.storage.condition()["writable"]
    w2.upsert([2], vecs([2], 1))
    w2.close()
    assert sorted(Snapshot.open(store).live.rows.keys.tolist()) == [1, 2]


def test_open_with_a_full_wal_disk_serves_reads_and_recovers(tmp_path: Path) -> None:
    store, w = open_writer(tmp_path)
    w.upsert([1], vecs([1], 1))
    faults.arm("wal.rotate", "ENOSPC", count=0)  # no new WAL file can be created
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg())
    assert [int(k) for b in w2.pending_batches() for k in b.keys] == [1]
    with pytest.raises(InsufficientStorageError):
        w2.upsert([2], vecs([2], 1))
    assert not w2.storage.condition()["writable"]
    faults.clear()
    w2.upsert([2], vecs([2], 1))  # the next write retries by itself
    assert w2.storage.condition()["writable"]
    assert reopen_keys(store, tmp_path / "wal") == [1, 2]


# --- S3 bodies -------------------------------------------------------------------------------


def test_truncated_or_corrupt_s3_body_is_detected() -> None:
    data = os.urandom(100)
    crc = f"{zlib.crc32(data):08x}"
    assert check_body(data, 100, crc) is None
    assert "90 of 100" in str(check_body(data[:90], 100, crc))
    assert "CRC32" in str(check_body(data[:90], None, crc))
    assert check_body(data, None, None) is None
