"""refresh() from many threads at once (the refresher, maintenance, request handlers, a
migration) while the writer takes rows and flushes: the published view never goes back and
never misses or double-counts an acknowledged row."""

from __future__ import annotations

import sys
import threading
from itertools import pairwise
from pathlib import Path

import numpy as np

from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

D = 8


def test_concurrent_refreshes_publish_monotonic_complete_views(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "idx")
    w = IndexWriter.open(
        store,
        tmp_path / "wal",
        WriterConfig(flush_rows=60, flush_interval_s=10**6),
        create=IndexSpec.single("idx", "m", D, "int"),
    )
    rt = IndexRuntime("idx", store, w, RuntimeOptions(maintenance=False), Roles(shadow=False))
    done = threading.Event()
    acked = 0  # rows acknowledged so far (unique keys, never deleted)
    seen: list[tuple[int, int]] = []  # (rows acknowledged before the refresh, rows it shows)
    errors: list[BaseException] = []

    def refresher() -> None:
        try:
            while not done.is_set():
                before = acked
                seen.append((before, rt.refresh().live_rows))
        except BaseException as exc:
            errors.append(exc)

    published: list[int] = []  # what queries see (rt.view), in the order they see it

    def observer() -> None:
        while not done.is_set():
            n = rt.view.live_rows
            if not published or n != published[-1]:
                published.append(n)

    def writes() -> None:
        nonlocal acked
        rng = np.random.default_rng(0)
        for i in range(150):
            keys = list(range(i * 10, i * 10 + 10))
            w.upsert(keys, {"m": rng.normal(size=(10, D))}, None, None)
            acked += 10
            w.maybe_flush()  # flushes every 60 rows, racing the refreshes

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=refresher) for _ in range(4)]
    threads.append(threading.Thread(target=observer))
    for t in threads:
        t.start()
    try:
        writes()
    finally:
        done.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert rt.refresh().live_rows == acked == 1500
    # every refresh shows at least what was acknowledged before it began, never more than
    # exists (no row missed in a flush's window, none counted twice)
    bad = [(b, n) for b, n in seen if not b <= n <= 1500]
    assert not bad, f"{len(bad)} of {len(seen)} refreshes: {bad[:5]}"
    back = [(a, b) for a, b in pairwise(published) if b < a]
    assert not back, f"the published view went back {len(back)} times: {back[:5]}"
    rt.stop()
