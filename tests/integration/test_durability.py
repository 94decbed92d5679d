"""Acknowledgement waits for fsync: a simulated power loss (unsynced bytes vanish) loses no
acknowledged write. The same check, run against a WAL that skips the fsync, does lose writes:
that is what makes this test able to fail, unlike 'survives SIGKILL'."""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from index_runtime.store.objects import LocalDirStore
from index_runtime.store.reader import Snapshot
from index_runtime.store.wal import _HEADER, Wal
from index_runtime.store.writer import IndexWriter
from tests.integration.test_writer import SPEC, cfg, vecs


def lost_after_power_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[int]:
    synced: dict[str, int] = {}
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        with contextlib.suppress(OSError):
            synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = LocalDirStore(tmp_path / "data")
    wal_dir = tmp_path / "wal"
    w = IndexWriter.open(store, wal_dir, cfg(), create=SPEC)
    acked = []
    for i in range(30):
        w.upsert([i], vecs([i], 1))
        acked.append(i)
    # power loss: every WAL file keeps only what was fsynced
    for f in sorted(wal_dir.glob("wal-*.log")):
        os.truncate(f, synced.get(str(f.resolve()), 0))
    w2 = IndexWriter.open(store, wal_dir, cfg())
    present = set(Snapshot.open(store, extra_rows=w2.pending_batches()).live.rows.keys.tolist())
    return set(acked) - present


def test_no_acknowledged_write_is_lost_on_power_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lost_after_power_loss(tmp_path, monkeypatch) == set()


def test_the_power_loss_check_catches_ack_before_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from index_runtime.store.segment import encode_segment

    def append_without_fsync(self: Wal, batch: object) -> None:
        payload = encode_segment(batch, self.key_type, self.dims)  # type: ignore[arg-type]
        assert self._fd is not None
        os.write(self._fd, _HEADER.pack(len(payload), zlib.crc32(payload)) + payload)

    monkeypatch.setattr(Wal, "append", append_without_fsync)
    assert len(lost_after_power_loss(tmp_path, monkeypatch)) == 30


def test_torn_wal_tail_is_ignored(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "data")
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert([1], vecs([1], 1))
    w.upsert([2], vecs([2], 1))
    f = sorted((tmp_path / "wal").glob("wal-*.log"))[-1]
    os.truncate(f, f.stat().st_size - 7)  # the last record is torn
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg())
    assert [int(k) for b in w2.pending_batches() for k in b.keys] == [1]
    w2.upsert([3], vecs([3], 1))
    w2.close()
    keys = Snapshot.open(store).live.rows.keys.tolist()
    assert sorted(keys) == [1, 3]
    assert np.all(np.diff(sorted(Snapshot.open(store).live.rows.seqs.tolist())) > 0)
