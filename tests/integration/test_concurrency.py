"""Writer fencing and compaction racing writes, on both backends."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from index_runtime.errors import FencedError
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.log import ManifestLog
from index_runtime.store.writer import IndexWriter
from tests.integration.test_writer import SPEC, assert_state, cfg, state, vecs


def test_stale_writer_is_fenced(store: Any, tmp_path: Path) -> None:
    a = IndexWriter.open(store, tmp_path / "wal-a", cfg(), create=SPEC)
    a.upsert([1], vecs([1], 1))
    a.flush()
    b = IndexWriter.open(store, tmp_path / "wal-b", cfg())
    taken_at = b.manifest.version
    a.upsert([2], vecs([2], 1))  # a does not know yet: acknowledged into its own WAL
    with pytest.raises(FencedError, match="superseded"):
        a.flush()
    with pytest.raises(FencedError):
        a.upsert([3], vecs([3], 1))
    with pytest.raises(FencedError):
        a.compact()
    b.upsert([4], vecs([4], 1))
    b.flush()
    b.close()
    a.close()  # a fenced writer closes without committing anything
    mlog = ManifestLog(store)
    for v in mlog.versions():
        m = mlog.load(v)
        assert m.writer_epoch == (b.epoch if v >= taken_at else a.epoch if v > 2 else m.writer_epoch)
    assert_state(state(store), {1: 1, 4: 1})


def test_successor_on_the_same_volume_replays_the_fenced_writers_wal(store: Any, tmp_path: Path) -> None:
    a = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    a.upsert([1, 2], vecs([1, 2], 1))  # acknowledged, not flushed
    b = IndexWriter.open(store, tmp_path / "wal", cfg())  # e.g. the StatefulSet's new pod
    with pytest.raises(FencedError):
        a.flush()
    b.close()
    assert_state(state(store), {1: 1, 2: 1})


def test_writers_opening_at_once_get_distinct_epochs(store: Any, tmp_path: Path) -> None:
    IndexWriter.open(store, tmp_path / "wal0", cfg(), create=SPEC).close()
    barrier = threading.Barrier(4)
    epochs: list[int] = []
    errors: list[BaseException] = []

    def opener(i: int) -> None:
        barrier.wait()
        try:
            epochs.append(IndexWriter.open(store, tmp_path / f"wal{i + 1}", cfg()).epoch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(epochs)) == 4
    mlog = ManifestLog(store)
    assert [mlog.load(v).writer_epoch for v in mlog.versions()] == sorted(
        mlog.load(v).writer_epoch for v in mlog.versions()
    )


def test_two_writers_racing_never_interleave(store: Any, tmp_path: Path) -> None:
    """Two writers write and flush concurrently while a third takes over: after each epoch
    bump only the newest epoch's commits appear."""
    IndexWriter.open(store, tmp_path / "wal0", cfg(), create=SPEC).close()
    stop = threading.Event()

    def run(name: str, base: int) -> None:
        w = IndexWriter.open(store, tmp_path / name, cfg(flush_rows=3))
        i = 0
        while not stop.is_set():
            try:
                w.upsert([base + i], vecs([base + i], 1))
            except FencedError:
                return
            i += 1

    threads = [threading.Thread(target=run, args=(f"w{i}", i * 10_000)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2)
    stop.set()
    for t in threads:
        t.join()
    mlog = ManifestLog(store)
    epochs = [mlog.load(v).writer_epoch for v in mlog.versions()]
    assert epochs == sorted(epochs), "an older epoch committed after a newer one"


def test_compaction_racing_writes_loses_nothing(store: Any, tmp_path: Path) -> None:
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=1 << 13, target_bytes=1 << 14)
    w = IndexWriter.open(store, tmp_path / "wal", cfg(flush_rows=25, compaction=policy), create=SPEC)
    rng = random.Random(7)
    applied: list[tuple[int, str, list[int], int]] = []  # (first seq, op, keys, version)
    done = threading.Event()
    errors: list[BaseException] = []
    compacted: list[int] = []

    def writer() -> None:
        try:
            for i in range(300):
                keys = rng.sample(range(150), rng.randint(1, 12))
                if rng.random() < 0.3:
                    ack = w.delete(keys)
                    applied.append((ack.first_seq, "delete", keys, i))
                else:
                    ack = w.upsert(keys, vecs(keys, i))
                    applied.append((ack.first_seq, "upsert", keys, i))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def compactor() -> None:
        try:
            while not done.is_set():
                compacted.append(w.compact(gc=True).input_segments)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(compacted) > 0, "no compaction ran during the writes"
    w.flush()
    w.compact(gc=True)
    model: dict[int, int] = {}
    for _seq, op, keys, version in sorted(applied):  # committed operations in seq order
        for k in keys:
            if op == "upsert":
                model[k] = version
            else:
                model.pop(k, None)
    assert_state(state(store), model)
    assert w.manifest.live_rows == len(model)
    w.close()
