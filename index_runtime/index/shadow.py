"""The HNSW shadow: a graph over the live rows, grown incrementally as views change.

HNSW cannot remove nodes. Deleted and superseded rows stay in the graph, filtered at query time
by the view's alive bitmap, and are counted as *deleted overhead*; compaction regenerates the
graph once the overhead passes a threshold (a new graph is built off to the side and swapped
in; if building it fails, the old graph keeps serving and the failure is counted).

FAISS indexes are not safe to modify during a search: additions and searches take one lock.
Additions are small (the rows that arrived since the last view), so queries wait briefly.

Invariants (tests/integration/test_shadow_stress.py): every seq is in the graph at most once
(``sync`` decides what is new and adds it under the lock, so two syncs cannot both add a row),
and a regeneration never loses a row synced while it was building (rows newer than its
snapshot are copied from the old graph into the new one under the lock, before the swap).
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from index_runtime.index.rows import F32, I64, Mask
from index_runtime.index.settings import ShadowSettings
from index_runtime.index.training import faiss_metric
from index_runtime.index.view import Hits, View


def _new_graph(dim: int, metric: str, s: ShadowSettings) -> faiss.IndexIDMap:
    hnsw = faiss.IndexHNSWFlat(dim, s.hnsw_m, faiss_metric(metric))
    hnsw.hnsw.efConstruction = max(40, 2 * s.hnsw_m)
    graph = faiss.IndexIDMap(hnsw)
    graph.own_fields = True
    hnsw.this.disown()  # type: ignore[attr-defined]
    return graph


class ShadowGraph:
    def __init__(self, dim: int, metric: str, settings: ShadowSettings) -> None:
        self.dim = dim
        self.metric = metric
        self.settings = settings
        self._lock = threading.Lock()  # the graph, _ids and max_seq
        self._regen_lock = threading.Lock()  # one regeneration at a time (taken before _lock)
        self._graph = _new_graph(dim, metric, settings)
        self._ids: I64 = np.zeros(0, np.int64)  # seqs in the graph
        self.max_seq = 0
        self.regenerations = 0

    @property
    def nodes(self) -> int:
        return int(self._ids.shape[0])

    def seqs(self) -> I64:
        """A copy of the seqs in the graph, in insertion order (one per node)."""
        with self._lock:
            return self._ids.copy()

    def overhead(self, view: View) -> float:
        """Share of graph nodes that are no longer alive in ``view``."""
        if not self.nodes:
            return 0.0
        live = int(np.count_nonzero(view.seqs_alive(self._ids)))
        return 1.0 - live / self.nodes

    def sync(self, view: View) -> int:
        """Add the view's live rows newer than any row in the graph. Returns rows added.

        Deciding what is new and adding it happen under one lock: concurrent syncs (several
        views) add each seq once. A view older than the graph adds nothing."""
        with self._lock:
            live = view.live_pos
            new = live[view.seqs[live] > self.max_seq]
            if not len(new):
                return 0
            seqs = np.ascontiguousarray(view.seqs[new])
            self._graph.add_with_ids(np.ascontiguousarray(view.vectors_at(new)), seqs)
            self._ids = np.concatenate([self._ids, seqs])
            self.max_seq = max(self.max_seq, int(seqs.max()))
        return len(new)

    def regenerate(self, view: View) -> None:
        """Build a graph of ``view``'s live rows and swap it in (the old one serves meanwhile).

        Rows the old graph holds that are newer than the snapshot (synced from a newer view,
        before or during the build) are copied into the new graph under the lock before the
        swap, so none is dropped. One regeneration at a time."""
        with self._regen_lock:
            top = int(view.seqs.max()) if len(view.seqs) else 0  # the snapshot's newest seq
            graph = _new_graph(self.dim, self.metric, self.settings)
            live = view.live_pos
            seqs = np.ascontiguousarray(view.seqs[live])
            if len(live):
                graph.add_with_ids(np.ascontiguousarray(view.vectors_at(live)), seqs)
            with self._lock:
                later = np.flatnonzero(self._ids > top)  # internal ids: graph order = _ids order
                if len(later):
                    inner = faiss.downcast_index(self._graph.index)
                    vecs = np.ascontiguousarray(inner.reconstruct_batch(later), np.float32)
                    graph.add_with_ids(vecs, np.ascontiguousarray(self._ids[later]))
                    seqs = np.concatenate([seqs, self._ids[later]])
                self._graph = graph
                self._ids = seqs
                self.max_seq = max(self.max_seq, int(seqs.max()) if len(seqs) else 0)
            self.regenerations += 1

    def search(self, view: View, q: F32, k: int, match: Mask | None = None) -> Hits:
        packed = view.allowed_bitmap(match)  # must outlive the search: FAISS keeps a pointer
        sel = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from stubs
        params.efSearch = max(self.settings.ef_search, k)
        params.sel = sel
        with self._lock:
            _, ids = self._graph.search(q[None, :], k, params=params)
        found = ids[0][ids[0] >= 0]
        pos = view.positions_of_seqs(found)
        pos = pos[pos >= 0]
        if not len(pos):
            return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32))
        scores = view._exact_scores(pos, q)
        order = np.argsort(-scores, kind="stable")[:k]
        return Hits(pos[order], scores[order])
