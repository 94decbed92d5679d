"""stop() joins every thread the runtime started and closes the writer last: after it
returns, nothing commits, even from a thread that was stuck and outlived the bounded joins."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime.service.migrate import MigrationRequest
from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig
from tests.integration.test_migration_service import D_OLD, W_NEW, W_OLD, corpus, encoder

N = 600


def _runtime(tmp_path: Path) -> IndexRuntime:
    store = LocalDirStore(tmp_path / "docs")
    w = IndexWriter.open(
        store,
        tmp_path / "wal",
        WriterConfig(flush_rows=400, flush_interval_s=0.2),
        create=IndexSpec.single("docs", "old", D_OLD, "str"),
    )
    rt = IndexRuntime(
        "docs", store, w, RuntimeOptions(maintenance=False, refresh_s=0.05, tick_s=0.1), Roles()
    )
    texts = corpus(N)
    rt.upsert([f"k{i}" for i in range(N)], {"old": encoder(W_OLD, 0.0)(texts, "passage")}, texts, None)
    assert rt.refresh().live_rows == N
    rt.start()
    return rt


def _version(tmp_path: Path) -> int:
    m = ManifestLog(LocalDirStore(tmp_path / "docs")).latest()
    assert m is not None
    return m.version


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _request(**extra: Any) -> MigrationRequest:
    body = {"to_model": "new", "kinds": ["procrustes"], "pairs": 300, **extra}
    return MigrationRequest.from_json(body)


def test_stop_joins_a_running_backfill_and_nothing_commits_after(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    _, started = rt.start_migration(
        _request(backfill_batch=20, backfill_rate=100),  # ~6 s of backfill: stopped midway
        encoder(W_OLD, 0.0),
        encoder(W_NEW, 0.0),
    )
    assert started
    _wait(lambda: rt.bridge.get("phase") == "Backfilling")
    rt.stop()
    threads = [rt.migration_thread, *rt._threads]
    assert all(t is not None and not t.is_alive() for t in threads)  # joined, not abandoned
    after = _version(tmp_path)
    assert ManifestLog(LocalDirStore(tmp_path / "docs")).latest().migration["phase"] == "Backfilling"  # type: ignore[union-attr]
    time.sleep(0.5)  # an abandoned thread would checkpoint or cut over in this window
    assert _version(tmp_path) == after


def test_a_stuck_thread_cannot_block_stop_nor_commit_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate's encoder hangs; stop() gives up on the migration thread after its budget
    (with a warning) and closes the writer; when the encoder comes back, the thread's next
    commit (the gate's decision) is refused."""
    rt = _runtime(tmp_path)
    entered, release = threading.Event(), threading.Event()
    calls = 0
    real = encoder(W_NEW, 0.0)

    def stuck(texts: list[str], kind: str) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first is the dimension probe; the second is the gate's pairs
            entered.set()
            release.wait(60)
        return np.asarray(real(texts, kind))

    op, _ = rt.start_migration(_request(backfill=False), encoder(W_OLD, 0.0), stuck)
    assert entered.wait(30)
    rt.stop_timeout_s = 0.5
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        rt.stop()
    assert time.monotonic() - started < 10
    before = _version(tmp_path)
    release.set()
    assert rt.migration_thread is not None
    rt.migration_thread.join(30)
    assert not rt.migration_thread.is_alive()
    assert _version(tmp_path) == before  # the gate's commit after close was refused
    assert rt.operations.describe(op.id)["state"] in ("succeeded", "failed")
    assert "did not finish" in caplog.text
