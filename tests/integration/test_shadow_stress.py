"""The HNSW shadow under concurrent writes, syncs, regenerations and searches, checked against
the exact answer: every live row is in the graph exactly once, none is missing, and deleted
rows never come back from a search."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np

from index_runtime.index.loader import ViewBuilder
from index_runtime.index.settings import ShadowSettings
from index_runtime.index.shadow import ShadowGraph
from index_runtime.index.view import View
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

D, KEYS = 16, 1200


def test_shadow_graph_never_duplicates_or_drops_rows_under_concurrency(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "idx")
    w = IndexWriter.open(
        store,
        tmp_path / "wal",
        WriterConfig(flush_rows=100_000, flush_interval_s=10**6),
        create=IndexSpec.single("idx", "m", D, "int"),
    )
    builder = ViewBuilder(store)
    state = threading.Lock()  # the test's writes vs snapshots: each view is one consistent state

    def snapshot() -> View:
        with state:
            m, pending = w.manifest, w.pending_batches()
        return builder.build(m, pending)

    rng = np.random.default_rng(0)
    w.upsert(list(range(KEYS)), {"m": rng.normal(size=(KEYS, D))}, None, None)
    graph = ShadowGraph(D, "cosine", ShadowSettings(kind="hnsw", hnsw_m=8, ef_search=64))
    done = threading.Event()
    regen_done = threading.Event()  # regenerations stop first: a later one cannot hide a loss
    errors: list[BaseException] = []

    def writes() -> None:
        r = np.random.default_rng(1)
        for i in range(120):
            with state:
                keys = sorted({int(k) for k in r.integers(0, KEYS, 12)})
                if i % 3 == 2:
                    w.delete(keys[:4])
                else:
                    w.upsert(keys, {"m": r.normal(size=(len(keys), D))}, None, None)
                if i % 40 == 39:
                    w.flush()
            if i == 80:
                regen_done.set()

    def loop(step: object, until: threading.Event = done) -> None:
        try:
            while not until.is_set():
                step()  # type: ignore[operator]
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
            done.set()

    def search() -> None:
        view = snapshot()
        hits = graph.search(view, view.vectors_at(view.live_pos[:1])[0], 10)
        assert view.alive[hits.pos].all(), "a deleted row was returned"

    workers = [
        threading.Thread(target=loop, args=(lambda: graph.sync(snapshot()),)),
        threading.Thread(target=loop, args=(lambda: graph.sync(snapshot()),)),
        threading.Thread(target=loop, args=(lambda: graph.regenerate(snapshot()), regen_done)),
        threading.Thread(target=loop, args=(search,)),
    ]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely: races show up within the run
    for t in workers:
        t.start()
    try:
        writes()
    finally:
        regen_done.set()
        done.set()
        sys.setswitchinterval(switch)
        for t in workers:
            t.join()
    assert not errors, errors
    assert graph.regenerations > 0

    final = snapshot()
    graph.sync(final)
    ids = graph.seqs()
    assert len(ids) == len(np.unique(ids)), "a row is in the graph twice"
    live = final.seqs[final.live_pos]
    missing = np.setdiff1d(live, ids)
    assert not len(missing), f"{len(missing)} live rows are missing from the graph"
    # against exact: each live row's own vector finds it first (the graph holds it)
    for pos in final.live_pos[::4].tolist():
        q = final.vectors_at(np.array([pos]))[0]
        q = q / np.linalg.norm(q)
        hits = graph.search(final, q, 1)
        assert hits.pos.tolist() == final.exact(q, 1).pos.tolist() == [pos]
    w.close()
