"""The exact oracle: sampled queries are answered by brute force over the same view and
compared with every primary the view holds (the serving one and a candidate being validated).
Like with like: a filtered sample is compared with the filtered exact answer, and only when
the primary answers it through the index (a selective filter is answered exactly, see
``View.filter_plan``; such samples say nothing about the index and are not measured).

Runs in its own thread, in batches, under a CPU budget (a share of one core): after a batch
that took ``t`` seconds it sleeps ``t · (1/budget − 1)``. A full queue drops samples (counted);
the query path only ever does a non-blocking put.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from index_runtime.index.rows import F32, Mask
from index_runtime.index.view import View
from index_runtime.quality.metrics import distortion, overlap_at_k, rank_correlation
from index_runtime.quality.window import Window, WindowStats
from index_runtime.queues import take_batch

log = logging.getLogger(__name__)


MAX_TAIL_SHARE = 0.1  # a primary is measured only once index files cover 90% of live rows


@dataclass(frozen=True)
class Sample:
    view: View
    query: F32
    match: Mask | None  # the query's filter, as evaluated on this view


@dataclass(frozen=True)
class Measurement:
    codebook: int
    overlap: float
    rank: float | None
    distortion: float | None


def measure(view: View, samples: list[Sample], k: int) -> list[Measurement]:
    """Exact top-k of each sample vs every primary of its view (pure given the view)."""
    out: list[Measurement] = []
    by_mask: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_mask.setdefault(id(s.match) if s.match is not None else 0, []).append(i)
    for idxs in by_mask.values():
        match = samples[idxs[0]].match
        qs = np.stack([samples[i].query for i in idxs])
        exact = view.exact_batch(qs, k, match)
        for j, i in enumerate(idxs):
            ex = exact[j]
            for version in view.primaries:
                if len(view.tails[version]) > MAX_TAIL_SHARE * view.live_rows:
                    continue  # mostly answered exactly: measuring it would flatter the index
                if match is not None and view.filter_plan(version, match, k).exact:
                    # served by a brute force over the matching rows, not by the index: the
                    # served answer is the exact one, and says nothing about the index
                    continue
                hits = view.search_primary(version, samples[i].query, k, match, approx=True)
                out.append(
                    Measurement(
                        version,
                        overlap_at_k(hits.scores, ex.scores, k),
                        rank_correlation(hits.pos.tolist(), ex.pos.tolist()),
                        distortion(
                            hits.approx if hits.approx is not None else [], hits.scores, ex.scores
                        ),
                    )
                )
    return out


class Oracle:
    """Owns the overlap windows of one index."""

    def __init__(
        self,
        k: int,
        window: int,
        cpu_budget: float,
        queue_size: int,
        on_measure: Callable[[Measurement], None] | None = None,
        batch: int = 16,
    ) -> None:
        self.k = k
        self.window_size = window
        self.cpu_budget = cpu_budget
        self.batch = batch
        self._q: queue.Queue[Sample] = queue.Queue(maxsize=queue_size)
        self._windows: dict[int, Window] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_measure = on_measure
        self.dropped = 0
        self.measured = 0
        self.busy_s = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oracle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def offer(self, sample: Sample) -> bool:
        """Non-blocking: False (and counted) if the queue is full."""
        try:
            self._q.put_nowait(sample)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def window(self, codebook: int) -> WindowStats:
        with self._lock:
            w = self._windows.get(codebook)
            return w.stats() if w is not None else WindowStats.empty()

    def details(self, codebook: int) -> tuple[WindowStats, float | None, float | None, int]:
        """Stats, mean rank correlation, mean distortion, samples ever added."""
        with self._lock:
            w = self._windows.get(codebook)
            if w is None:
                return WindowStats.empty(), None, None, 0
            return w.stats(), w.mean_rank(), w.mean_distortion(), w.total

    def retain(self, codebooks: set[int]) -> None:
        """Drop windows of codebooks that no longer exist (a new version starts empty)."""
        with self._lock:
            self._windows = {v: w for v, w in self._windows.items() if v in codebooks}

    def process(self, samples: list[Sample]) -> list[Measurement]:
        """Measure a batch now (the worker calls this; tests may too)."""
        results: list[Measurement] = []
        by_view: dict[int, list[Sample]] = {}
        for s in samples:
            by_view.setdefault(id(s.view), []).append(s)
        for group in by_view.values():
            results.extend(measure(group[0].view, group, self.k))
        with self._lock:
            for r in results:
                w = self._windows.get(r.codebook)
                if w is None:
                    w = self._windows[r.codebook] = Window(r.codebook, self.window_size)
                w.add(r.overlap, r.rank, r.distortion)
        self.measured += len(samples)
        if self._on_measure is not None:
            for r in results:
                self._on_measure(r)
        return results

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = take_batch(self._q, self.batch, 0.2)
            if not batch:
                continue
            started = time.thread_time()  # this thread's CPU: FAISS runs here with 1 thread
            try:
                self.process(batch)
            except Exception:
                log.exception("oracle batch failed")
            spent = time.thread_time() - started
            self.busy_s += spent
            self._stop.wait(spent * (1 / self.cpu_budget - 1))
