"""One index at run time: writer, views, search, the exact oracle and the maintenance loop.

Roles (``Roles``): ``writer`` owns the WAL and commits; ``reader`` serves queries from the
newest manifest it has loaded (polling); ``shadow`` holds the exact oracle and the overlap
windows. Standalone, one process has all three.

Threads: the *refresher* builds a new :class:`View` when the manifest or the pending rows
change and swaps it in by reference; the *maintenance* loop flushes, encodes new segments with
every codebook, asks :func:`index_runtime.lifecycle.decide` what to do and does it (only with
maintenance on); training, compaction requested through the API and a model migration run in
threads of their own, each tracked as an operation (:mod:`index_runtime.service.operations`).
Queries never wait for any of them.

Concurrency: everything queries read (view, model, settings, oracle, shadow graph, migration
record and adapter, native view pair) is one immutable :class:`Published` snapshot, replaced by
a single reference assignment; only :meth:`IndexRuntime.refresh` replaces it, under
``_refresh_lock`` (one builder at a time). Readers take ``rt.view`` (or ``rt.published``)
without locking. Lock order, outermost first: engine lock -> ``_maint_lock`` ->
``_encode_lock`` -> ``_migration_lock`` -> ``_refresh_lock`` -> writer ``_maint`` -> ``_flush``
-> ``_commit`` -> ``_lock`` -> shadow graph ``_regen_lock`` -> ``_lock`` -> operations lock.
:meth:`IndexRuntime.stop` joins every thread it started (bounded) and closes the writer last;
after that nothing commits.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from index_runtime import lifecycle
from index_runtime.adapters import Adapter, artifact
from index_runtime.contract import MigrationRecord
from index_runtime.errors import ClosedError, ConflictError, InvalidInputError, NotFoundError
from index_runtime.index.filters import Filter
from index_runtime.index.loader import ViewBuilder, serving_model
from index_runtime.index.rows import F32, normalize
from index_runtime.index.settings import IndexSettings
from index_runtime.index.shadow import ShadowGraph
from index_runtime.index.training import (
    encode_segment_index,
    plan_training,
    required_rows,
    sample_rows,
    train_codebook,
)
from index_runtime.index.vectors import VectorStorage, take
from index_runtime.index.view import Hits, View
from index_runtime.migration import (
    STATUS_QUO,
    BackfillProgress,
    backfill_progress,
    serves_both,
)
from index_runtime.quality.oracle import Measurement, Oracle, Sample
from index_runtime.quality.window import WindowStats
from index_runtime.querylog import Forwarder, QueryLog, QueryLogSettings
from index_runtime.service.migrate import (
    DEPTH,
    Encode,
    MigrationRequest,
    merged_positions,
    native_mask,
)
from index_runtime.service.migrator import Migrator
from index_runtime.service.mirror import Mirror
from index_runtime.service.operations import Operation, Operations
from index_runtime.service.status import build_status
from index_runtime.store.compaction import plan_compaction
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import (
    Codebook,
    IndexFile,
    IndexSpec,
    Manifest,
    Pin,
    retire_unreferenced,
)
from index_runtime.store.objects import ObjectStore, new_object_name
from index_runtime.store.rows import RowBatch
from index_runtime.store.segcache import SegmentCache
from index_runtime.store.writer import IndexWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roles:
    writer: bool = True
    reader: bool = True
    shadow: bool = True


@dataclass(frozen=True)
class RuntimeOptions:
    maintenance: bool = True  # off: decisions come from elsewhere (the operator)
    refresh_s: float = 0.1  # how often the refresher looks for changes
    poll_s: float = 1.0  # how often a reader without the writer reads the newest manifest
    tick_s: float = 0.5  # maintenance loop period
    seed: int = 0
    shadow_url: str | None = None  # a reader without the shadow role mirrors samples here
    query_log: QueryLogSettings = field(default_factory=QueryLogSettings)  # off: querylog.py
    writer_url: str | None = None  # a reader without the writer role forwards sampled texts here
    vectors: VectorStorage = field(default_factory=VectorStorage)  # raw vectors: memory | mmap


@dataclass(frozen=True)
class Published:
    """What queries read, replaced as one reference by the refresher (never mutated): the
    view and everything that must agree with it."""

    view: View
    model: str  # the model the index serves
    spec: IndexSpec
    settings: IndexSettings
    settings_json: Mapping[str, Any]  # as in the manifest (to notice a change)
    oracle: Oracle
    shadow_graph: ShadowGraph | None
    bridge_state: tuple[dict[str, Any], Adapter | None]  # migration record, its adapter
    native_pair: tuple[View, View] | None  # (view, the new model's view of the same snapshot)


@dataclass
class Answer:
    hits: Hits
    view: View
    path: str  # "primary" | "shadow"


class Hooks:
    """Callbacks the service uses for metrics (no-ops by default)."""

    def query(self, index: str, path: str, seconds: float) -> None: ...
    def measured(self, index: str, m: Measurement, serving: int) -> None: ...
    def training(self, index: str, seconds: float, ok: bool) -> None: ...
    def compaction(self, index: str, seconds: float, ok: bool) -> None: ...
    def regeneration(self, index: str, ok: bool) -> None: ...
    def adapter(self, index: str, seconds: float) -> None: ...
    def backfill(self, index: str, rows: int) -> None: ...
    def vector_fetch(self, index: str, seconds: float) -> None: ...  # segment cache (mmap)
    # encoders (encoders/resilience.py EncoderObserver): per model, not per index
    def encoder(self, model: str, outcome: str, seconds: float | None) -> None: ...
    def encoder_state(self, model: str, state: str) -> None: ...


class IndexRuntime:
    def __init__(
        self,
        name: str,
        store: ObjectStore,
        writer: IndexWriter | None,
        options: RuntimeOptions,
        roles: Roles,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.store = store
        self.writer = writer
        self.options = options
        self.roles = roles
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.mlog = ManifestLog(store)
        self._rng = random.Random(options.seed)
        manifest = writer.manifest if writer is not None else self.mlog.latest()
        if manifest is None:
            raise NotFoundError(f"index {name!r} does not exist in {store.describe()}")
        self.segment_cache: SegmentCache | None = None  # vectors: mmap
        vs = options.vectors
        if vs.mode == "mmap" and vs.cache_dir is not None:
            self.segment_cache = SegmentCache(
                store,
                vs.cache_dir / name,
                vs.cache_bytes,
                manifest.index.key_type,
                on_fetch=lambda seconds: self.hooks.vector_fetch(name, seconds),
            )
        # owned by the refresher (under _refresh_lock)
        self.builder = ViewBuilder(store, cache=self.segment_cache)
        spec = manifest.index
        model = spec.write_models[0]
        settings = IndexSettings.from_json(manifest.settings, spec.dims[model])
        o = settings.oracle
        oracle = Oracle(o.k, o.window, o.cpu_budget, o.queue, self._measured)
        self._polled: tuple[float, Manifest] | None = None
        graph = None
        if settings.shadow.kind == "hnsw" and roles.shadow:
            graph = ShadowGraph(spec.dims[model], spec.models[model].metric, settings.shadow)
        self.regeneration_failures = 0
        self.mirror: Mirror | None = None
        if options.shadow_url and not roles.shadow:
            self.mirror = Mirror(options.shadow_url, name, settings.oracle.queue)
        # sampled query texts: kept on the writer (or a standalone server), forwarded by readers
        self.forwarder: Forwarder | None = None
        if options.query_log.active and writer is None and options.writer_url:
            self.forwarder = Forwarder(options.writer_url, name)
        # unseeded: which queries are kept must not be predictable from the (shared) options
        self.queries = QueryLog(options.query_log, clock, None, self.forwarder)
        self.stale_samples = 0
        # a reader pins the manifest it serves, so GC keeps its objects (lease, renewed)
        self.pin_holder = f"reader-{name}-{uuid.uuid4().hex[:8]}" if writer is None else None
        self.pin_lease_s = 600.0
        self._pinned_at = 0.0
        self._pinned_version = 0
        self._restores = manifest.restores  # refresher-owned: a change means a restore
        self.reader_lag_s = 0.0
        self.decision = lifecycle.Decision(lifecycle.Phase.COLD_START, (), "Starting", "")
        self.training_thread: threading.Thread | None = None
        self.failures = 0
        self.last_failure_at = 0.0
        self.last_failure = ""
        self.last_compaction_at = 0.0
        self.trainings = 0
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []  # refresher, maintenance
        self._op_threads: list[threading.Thread] = []  # training, compaction, migration
        self._threads_lock = threading.Lock()  # _op_threads; taken last, held briefly
        self.operations = Operations(name)
        self.stop_timeout_s = 30.0  # stop(): the budget for joining every thread
        self._maint_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._refresh_lock = threading.RLock()  # one builder at a time; swaps ``_pub``
        # model migration: the writer's job while it runs (the published record and its
        # adapter are in ``_pub``)
        self._bridge_key: str | None = None  # owned by the refresher
        self.migration_thread: threading.Thread | None = None  # set by _start_operation
        self.migrator = Migrator(self)
        self._native_builder: ViewBuilder | None = None  # owned by the refresher
        pending, manifest = self._snapshot(manifest)
        view = self.builder.build(manifest, pending)
        if graph is not None:
            graph.sync(view)
        self._pub = Published(
            view,
            model,
            spec,
            settings,
            manifest.settings,
            oracle,
            graph,
            self._load_bridge(manifest, ({}, None)),
            self._build_native(manifest, pending, view, settings, model),
        )
        self._renew_pin()

    # the published snapshot (read without locking) ------------------------------------------

    @property
    def published(self) -> Published:
        return self._pub

    @property
    def view(self) -> View:
        return self._pub.view

    def fresh_view(self) -> View:
        """Read-your-writes on the writer: the published view if it holds every acknowledged
        write, else a refresh now (coalescing every write since the last one). Replicas without
        the writer role serve the view they polled (reader lag is a metric)."""
        view = self._pub.view
        w = self.writer
        if w is not None and w.acknowledged_seq() > view.pending_seq:
            return self.refresh()
        return view

    @property
    def model(self) -> str:
        return self._pub.model

    @property
    def spec(self) -> IndexSpec:
        return self._pub.spec

    @property
    def settings(self) -> IndexSettings:
        return self._pub.settings

    @property
    def oracle(self) -> Oracle:
        return self._pub.oracle

    @property
    def shadow_graph(self) -> ShadowGraph | None:
        return self._pub.shadow_graph

    @property
    def bridge_state(self) -> tuple[dict[str, Any], Adapter | None]:
        return self._pub.bridge_state

    @property
    def native_pair(self) -> tuple[View, View] | None:
        return self._pub.native_pair

    # lifecycle of the object ------------------------------------------------------------------

    def start(self) -> None:
        if self.roles.shadow:
            self.oracle.start()
        if self.mirror is not None:
            self.mirror.start()
        if self.forwarder is not None:
            self.forwarder.start()
        for target, label in ((self._refresh_loop, "refresh"), (self._maint_loop, "maintenance")):
            t = threading.Thread(target=target, name=f"{label}-{self.name}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Graceful shutdown: stop the loops and the long operations (they check the stop flag
        between steps), join every thread this runtime started within ``stop_timeout_s`` (a
        stuck one is logged and left behind), then flush and close the writer, last. After
        the writer is closed nothing commits: a thread that outlived the joins gets
        ClosedError at its next commit. Idempotent."""
        self._stop.set()
        self._changed.set()
        deadline = time.monotonic() + self.stop_timeout_s
        with self._threads_lock:
            ops = list(self._op_threads)
        # the ones that commit first (migration, training, compaction), then the loops
        for t in [*ops, *self._threads]:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning(
                    "stopping %s: thread %s did not finish within %.0f s; closing without it "
                    "(it cannot commit after the writer closes)",
                    self.name,
                    t.name,
                    self.stop_timeout_s,
                )
        self.oracle.stop()
        if self.mirror is not None:
            self.mirror.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.pin_holder is not None:
            try:
                self.mlog.drop_pin(self.pin_holder)
            except Exception:
                log.exception("dropping the pin of %s failed; it expires by itself", self.name)
        if self.segment_cache is not None:  # a successor may take the directory; the
            self.segment_cache.close()  # views still read their mapped segments
        if self.writer is not None:
            self.writer.close()

    # views ------------------------------------------------------------------------------------

    def _snapshot(
        self, manifest: Manifest | None = None, force: bool = False
    ) -> tuple[list[RowBatch], Manifest]:
        """One consistent state: the writer's pending rows, then its manifest, with the rows
        the manifest already holds dropped. In that order no row is missed (a flush commits
        before it drops its rows from the pending list) and none is counted twice (a flush's
        rows stay pending until after its commit). A reader has no pending rows."""
        if self.writer is None:
            return [], manifest or self.current_manifest(force)
        pending = self.writer.pending_batches()
        m = manifest or self.writer.manifest
        done = m.flushed_seq
        kept = [
            b if int(b.seqs[0]) > done else b.take(np.flatnonzero(b.seqs > done))
            for b in pending
            if len(b.seqs) and int(b.seqs[-1]) > done
        ]
        return kept, m

    def current_manifest(self, force: bool = False) -> Manifest:
        if self.writer is not None:
            return self.writer.manifest
        now = time.monotonic()
        if force or self._polled is None or now - self._polled[0] >= self.options.poll_s:
            latest = self.mlog.latest()
            if latest is None:
                raise NotFoundError(f"index {self.name!r} is gone")
            self._polled = (now, latest)
        return self._polled[1]

    def refresh(self, force: bool = False) -> View:
        """Build a view of the newest state if anything changed, and publish it with everything
        that must agree with it (one swap). One builder at a time (``_refresh_lock``); callers
        that only need a recent view read ``rt.view`` instead. Readers read the newest
        manifest at most every ``poll_s`` unless ``force``."""
        with self._refresh_lock:
            pending, m = self._snapshot(force=force)
            p = self._pub
            top = int(pending[-1].seqs.max()) if pending else m.flushed_seq
            adopted = serving_model(m) != p.model
            if adopted:
                p = self._adopt_model(m, p)
            elif m.settings and m.settings != p.settings_json:
                # changed through the admin API: thresholds, nprobe, rerank apply from the next
                # view; the oracle's k and window size keep their values until a restart
                settings = IndexSettings.from_json(m.settings, p.spec.dims[p.model])
                p = replace(p, settings=settings, settings_json=m.settings)
            if (
                adopted
                or m.version != p.view.version
                or top != p.view.pending_seq
                or (not pending and len(p.view.delta))
            ):
                view = self.builder.build(m, pending, p.settings)
                if p.shadow_graph is not None and m.restores != self._restores:
                    # a restore brought back rows with old seqs, which sync (by seq) would skip
                    p.shadow_graph.regenerate(view)
                elif p.shadow_graph is not None:
                    p.shadow_graph.sync(view)  # before the swap: the view's rows are in the graph
                self._restores = m.restores
                p = replace(
                    p,
                    view=view,
                    bridge_state=self._load_bridge(m, p.bridge_state),
                    native_pair=self._build_native(m, pending, view, p.settings, p.model),
                )
                if self.roles.shadow:
                    p.oracle.retain(set(view.primaries))
            self._pub = p  # the one swap: queries see the old snapshot or the new one
            self.reader_lag_s = (
                0.0 if m.version == p.view.version else self.clock() - m.committed_at
            )
            self._renew_pin()
            return p.view

    def _adopt_model(self, m: Manifest, p: Published) -> Published:
        """The index's model changed (a migration cut over): new settings, oracle and shadow
        graph for the new model; the caller builds the next view from its vectors."""
        model = serving_model(m)
        log.info("index %s now serves model %s", self.name, model)
        settings = IndexSettings.from_json(m.settings, m.index.dims[model])
        self.builder = ViewBuilder(self.store, cache=self.segment_cache)
        self._native_builder = None
        o = settings.oracle
        oracle = Oracle(o.k, o.window, o.cpu_budget, o.queue, self._measured)
        if self.roles.shadow:
            p.oracle.stop()
            oracle.start()
        graph = None
        if settings.shadow.kind == "hnsw" and self.roles.shadow:
            spec = m.index.models[model]
            graph = ShadowGraph(spec.dim, spec.metric, settings.shadow)
        self.decision = lifecycle.Decision(lifecycle.Phase.COLD_START, (), "ModelChanged", "")
        return replace(
            p,
            model=model,
            spec=m.index,
            settings=settings,
            settings_json=m.settings,
            oracle=oracle,
            shadow_graph=graph,
            native_pair=None,
        )

    def _build_native(
        self, m: Manifest, pending: list[RowBatch], view: View, settings: IndexSettings, model: str
    ) -> tuple[View, View] | None:
        """During a migration with dual writes (or after one that ended keeping both models
        merged), the new model's view of the same snapshot as ``view`` (same rows and
        positions; the backfilled rows have vectors)."""
        to = m.migration.get("to")
        if not serves_both(m.migration) or to not in m.index.models or to == model:
            self._native_builder = None
            return None
        if self._native_builder is None or self._native_builder.model != to:
            self._native_builder = ViewBuilder(self.store, model=to, cache=self.segment_cache)
        return (view, self._native_builder.build(m, pending, settings))

    def _renew_pin(self) -> None:
        if self.pin_holder is None:
            return
        now = self.clock()
        version = self.view.version
        if (
            self._pinned_at
            and self._pinned_version == version
            and now - self._pinned_at < self.pin_lease_s / 3
        ):
            return
        self.mlog.put_pin(Pin(self.pin_holder, version, now + self.pin_lease_s))
        self._pinned_at, self._pinned_version = now, version

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(self.options.refresh_s)
            self._changed.clear()
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing the view of %s failed", self.name)

    # queries ----------------------------------------------------------------------------------

    def prepare_query(self, vector: Sequence[float] | np.ndarray) -> F32:
        q = np.asarray(vector, dtype=np.float32)
        d = self.spec.dims[self.model]
        if q.shape != (d,):
            raise InvalidInputError(f"query vector must have {d} dimensions, got {q.shape}")
        if not np.isfinite(q).all():
            raise InvalidInputError("query vector has NaN or infinite values")
        if self.spec.models[self.model].metric == "cosine":
            q = normalize(q)
        return q

    def accept_samples(
        self, manifest_version: int, queries: list[tuple[F32, Filter | None]]
    ) -> int:
        """Samples mirrored by a reader (shadow role). Measured only against the same manifest
        version the reader answered from; others are counted as stale. Returns accepted."""
        if not self.roles.shadow:
            raise ConflictError("this replica does not hold the oracle (not a shadow)")
        view = self.view
        if view.version != manifest_version:
            view = self.refresh(force=True)
        if view.version != manifest_version:
            self.stale_samples += len(queries)
            return 0
        accepted = 0
        for q, flt in queries:
            accepted += self.oracle.offer(Sample(view, q, view.match_mask(flt)))
        return accepted

    def search(self, q: F32, k: int, flt: Filter | None = None, view: View | None = None) -> Answer:
        """Top-k over the current view (or ``view``): the serving primary if there is one,
        else the shadow. A share of queries is mirrored to the oracle (non-blocking)."""
        if not 1 <= k <= 1000:
            raise InvalidInputError(f"k must be 1..1000, got {k}")
        started = time.perf_counter()
        view = view or self.fresh_view()
        match = view.match_mask(flt)
        if view.serving and view.serving in view.primaries:
            hits, path = view.search_primary(view.serving, q, k, match), "primary"
        elif self.shadow_graph is not None:
            hits, path = self.shadow_graph.search(view, q, k, match), "shadow"
        else:
            hits, path = view.exact(q, k, match), "shadow"
        self.hooks.query(self.name, path, time.perf_counter() - started)
        rate = self.settings.oracle.sample_rate
        if view.primaries and rate > 0 and self._rng.random() < rate:
            if self.roles.shadow:
                self.oracle.offer(Sample(view, q, match))
            elif self.mirror is not None:
                self.mirror.offer(view.version, q.tolist(), None if flt is None else flt.spec)
        return Answer(hits, view, path)

    def _measured(self, m: Measurement) -> None:
        self.hooks.measured(self.name, m, self.view.serving)

    # writes -----------------------------------------------------------------------------------

    def _writer(self) -> IndexWriter:
        if self.writer is None:
            raise ConflictError("this replica is a reader; send writes to the writer")
        return self.writer

    @property
    def write_models(self) -> tuple[str, ...]:
        """Models every upsert must carry (both during a migration)."""
        return self._writer().spec.write_models

    def upsert(self, keys: Sequence[object], vectors: dict[str, Any], texts: Any, meta: Any) -> Any:
        ack = self._writer().upsert(keys, vectors, texts, meta)
        self._changed.set()
        return ack

    def delete(self, keys: Sequence[object]) -> Any:
        ack = self._writer().delete(keys)
        self._changed.set()
        return ack

    # observation and policy -------------------------------------------------------------------

    def thresholds(self) -> lifecycle.Thresholds:
        o, lc = self.settings.oracle, self.settings.lifecycle
        return lifecycle.Thresholds(
            tau=lc.tau or required_rows(self.settings.primary),
            theta=o.theta,
            delta=o.delta,
            min_samples=o.min_samples,
            growth_factor=lc.growth_factor,
            backoff_s=lc.backoff_s,
            backoff_max_s=lc.backoff_max_s,
        )

    def observe(self) -> lifecycle.Observed:
        m = self.current_manifest()
        view = self.view
        serving = m.codebook(m.serving) if m.serving else None
        cand = m.candidate
        ready = cand is not None and set(m.files_of(cand.version)) >= {s.id for s in m.segments}
        due = (
            self.writer is not None
            and self.clock() - self.last_compaction_at
            >= self.settings.lifecycle.compaction_interval_s
            and bool(plan_compaction(m.segments, self.writer.config.compaction))
        )
        return lifecycle.Observed(
            now=self.clock(),
            live_rows=view.live_rows,
            serving=m.serving,
            serving_trained_rows=serving.trained_rows if serving else 0,
            serving_window=self.oracle.window(m.serving) if m.serving else WindowStats.empty(),
            candidate=cand.version if cand else 0,
            candidate_ready=ready and cand.version in view.primaries if cand else False,
            candidate_window=self.oracle.window(cand.version) if cand else WindowStats.empty(),
            training=self.operations.running("train") is not None,
            failures=self.failures,
            last_failure_at=self.last_failure_at,
            compaction_due=due,
        )

    def tick(self) -> lifecycle.Decision:
        """One maintenance step: flush, encode new segments, decide, act (if maintenance on)."""
        self.queries.expire()  # the query log's retention holds when no query arrives
        with self._maint_lock:
            if self.writer is not None:
                self.writer.maybe_flush()
                self.encode_segments()
            self.refresh()
            decision = lifecycle.decide(self.observe(), self.thresholds())
            self.decision = decision
            if self.options.maintenance and self.writer is not None and not self.stopping:
                for action in decision.actions:
                    self.apply(action)
            return decision

    def _maint_loop(self) -> None:
        while not self._stop.wait(self.options.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("maintenance of %s failed", self.name)

    def apply(self, action: lifecycle.Action) -> None:
        if action is lifecycle.Action.TRAIN:
            self.start_training()
        elif action is lifecycle.Action.PROMOTE:
            self.promote()
        elif action is lifecycle.Action.DISCARD:
            self.discard_candidate("CandidateRejected")
        elif action is lifecycle.Action.COMPACT:
            self.compact()

    # actions ----------------------------------------------------------------------------------

    def _start_operation(
        self, kind: str, work: Callable[[Operation], dict[str, Any] | None]
    ) -> tuple[Operation, bool]:
        """Run ``work`` in a thread of its own as an operation of ``kind`` (one running per
        kind: otherwise the running one is returned). (operation, started)."""
        if self._stop.is_set():
            raise ClosedError(f"index {self.name!r} is shutting down")
        op, new = self.operations.begin(kind)
        if not new:
            return op, False

        def run() -> None:
            try:
                self.operations.finish(op, work(op))
            except BaseException as exc:
                log.warning("%s of %s failed: %s", kind, self.name, exc)
                self.operations.fail(op, exc)

        t = threading.Thread(target=run, name=f"{kind}-{self.name}", daemon=True)
        with self._threads_lock:
            self._op_threads = [x for x in self._op_threads if x.is_alive()] + [t]
            if kind == "train":
                self.training_thread = t
            elif kind == "migration":
                self.migration_thread = t
            t.start()
        return op, True

    def start_training(self) -> bool:
        """Train a candidate codebook in the background; False if one is already training."""
        return self.start_training_op()[1]

    def start_training_op(self) -> tuple[Operation, bool]:
        """Training as an operation: (the operation, whether this call started it)."""
        self._writer()
        return self._start_operation("train", self._train)

    def _train(self, op: Operation) -> dict[str, Any]:
        """Sample, train and commit a candidate codebook, then encode the segments with it.
        Failures are counted (the lifecycle backs off) and re-raised to the operation."""
        w = self._writer()
        started = time.perf_counter()
        try:
            view = self.view
            p = self.settings.primary
            plan = plan_training(view.live_rows, view.dim, p)
            pick = sample_rows(view.live_rows, plan.sample_rows, self.options.seed + self.trainings)
            sample = view.vectors_at(view.live_pos[pick])
            self.operations.report(op, step="training", sample_rows=plan.sample_rows)
            data = train_codebook(sample, view.metric, plan, p.coarse, self.options.seed)
            if self._stop.is_set():  # shut down while FAISS trained: commit nothing
                raise ClosedError("training stopped: the runtime is shutting down")
            key = new_object_name("codebooks", ".faiss")
            self.store.put(key, data)
            now = self.clock()

            def edit(m: Manifest) -> Manifest:
                book = Codebook(
                    m.next_codebook,
                    self.model,
                    key,
                    plan.nlist,
                    plan.m,
                    plan.nbits,
                    p.coarse,
                    view.live_rows,
                    plan.sample_rows,
                    now,
                )
                keep = tuple(c for c in m.codebooks if c.version == m.serving)
                out = replace(m, codebooks=(*keep, book), next_codebook=m.next_codebook + 1)
                return retire_unreferenced(m, out, now)

            m = w.commit_edit(edit, "train")
            self.trainings += 1
            self.operations.report(op, step="encoding segments")
            self.encode_segments()
            self.hooks.training(self.name, time.perf_counter() - started, True)
            return {"codebook": m.next_codebook - 1, "trained_rows": view.live_rows}
        except Exception as exc:
            if not self._stop.is_set():
                log.warning("training %s failed: %s", self.name, exc)
                self.failures += 1
                self.last_failure_at = self.clock()
                self.last_failure = str(exc)
                self.hooks.training(self.name, time.perf_counter() - started, False)
            raise
        finally:
            self._changed.set()

    def encode_segments(self) -> int:
        """Build the missing (segment, codebook) index files and commit them. Returns count."""
        with self._encode_lock:
            return self._encode_segments()

    def _encode_segments(self) -> int:
        w = self._writer()
        m = w.manifest
        if not m.codebooks:
            return 0
        view = self.view
        files: list[IndexFile] = []
        for book in m.codebooks:
            have = m.files_of(book.version)
            missing = [s for s in m.segments if s.id not in have and s.id in view.base.seg_ranges]
            if not missing:
                continue
            codebook = self.store.get(book.key)
            blk = view.base.block
            for seg in missing:
                if self._stop.is_set():  # shutting down: commit what is encoded so far
                    break
                lo, hi = view.base.seg_ranges[seg.id]
                rows = np.flatnonzero(blk.has_vec[lo:hi]) + lo
                data = encode_segment_index(codebook, take(blk.vecs, rows), blk.seqs[rows])
                key = new_object_name("indexfiles", ".faiss")
                self.store.put(key, data)
                files.append(IndexFile(seg.id, book.version, key, len(rows), len(data)))
        if not files:
            return 0

        def edit(m: Manifest) -> Manifest:
            segs = {s.id for s in m.segments}
            books = {c.version for c in m.codebooks}
            have = {(f.segment_id, f.codebook) for f in m.index_files}
            new = tuple(
                f
                for f in files
                if f.segment_id in segs
                and f.codebook in books
                and (f.segment_id, f.codebook) not in have
            )
            return replace(m, index_files=m.index_files + new)

        w.commit_edit(edit, "index-files")
        self._changed.set()
        return len(files)

    def promote(self, version: int | None = None) -> Manifest:
        """Make the candidate (or codebook ``version``) serve; the old one is retired."""
        w = self._writer()
        cand = w.manifest.candidate
        target = version if version is not None else (cand.version if cand else 0)
        if not target or w.manifest.codebook(target) is None:
            raise ConflictError("there is no candidate codebook to promote")
        now = self.clock()

        def edit(m: Manifest) -> Manifest:
            if m.codebook(target) is None:
                raise ConflictError(f"codebook {target} no longer exists")
            out = replace(
                m, serving=target, codebooks=tuple(c for c in m.codebooks if c.version == target)
            )
            return retire_unreferenced(m, out, now)

        out = w.commit_edit(edit, f"promote-{target}")
        self.failures = 0
        self._changed.set()
        return out

    def update_settings(self, settings: dict[str, Any]) -> IndexSettings:
        """Replace the index settings (validated against the serving model's dimension)."""
        w = self._writer()
        parsed = IndexSettings.from_json(settings, self.spec.dims[self.model])
        w.commit_edit(lambda m: replace(m, settings=parsed.to_json()), "settings")
        self._changed.set()
        return parsed

    def discard_candidate(self, why: str) -> None:
        w = self._writer()
        cand = w.manifest.candidate
        if cand is None:
            return
        now = self.clock()

        def edit(m: Manifest) -> Manifest:
            out = replace(m, codebooks=tuple(c for c in m.codebooks if c.version != cand.version))
            return retire_unreferenced(m, out, now)

        w.commit_edit(edit, f"discard-{cand.version}")
        self.failures += 1
        self.last_failure_at = now
        self.last_failure = why
        self._changed.set()

    def start_compaction(self) -> tuple[Operation, bool]:
        """Compaction (and GC) as an operation: (the operation, whether this call started it)."""
        self._writer()

        def work(op: Operation) -> dict[str, Any]:
            r = self.compact()
            return {"input_segments": r.input_segments, "output_segments": r.output_segments}

        return self._start_operation("compact", work)

    def restore(self, version: int) -> Manifest:
        """Commit manifest ``version``'s state as a new version (see IndexWriter.restore) and
        serve it; other replicas pick it up on their next refresh."""
        m = self._writer().restore(version)
        self._changed.set()
        self.refresh(force=True)
        return m

    def compact(self, gc: bool = True) -> Any:
        """Compact now, in the calling thread (stops between groups when the runtime stops)."""
        w = self._writer()
        started = time.perf_counter()
        try:
            report = w.compact(gc=gc, should_stop=self._stop.is_set)
        except Exception:
            self.hooks.compaction(self.name, time.perf_counter() - started, False)
            raise
        self.last_compaction_at = self.clock()
        self.hooks.compaction(self.name, time.perf_counter() - started, True)
        self._changed.set()
        self.regenerate_shadow()
        return report

    def regenerate_shadow(self, force: bool = False) -> bool | None:
        """Rebuild the HNSW shadow if its deleted overhead passed the threshold. A failure is
        logged and counted and never fails the caller (compaction has already committed); the
        next compaction cycle tries again. Returns None if nothing was due."""
        g = self.shadow_graph
        if g is None:
            return None
        view = self.refresh()
        if not force and g.overhead(view) < self.settings.shadow.regenerate_overhead:
            return None
        try:
            g.regenerate(view)
        except Exception:
            log.exception(
                "regenerating the shadow graph of %s failed; retried next cycle", self.name
            )
            self.regeneration_failures += 1
            self.hooks.regeneration(self.name, False)
            return False
        self.hooks.regeneration(self.name, True)
        return True

    # status -----------------------------------------------------------------------------------

    # model migration (the runner is service.migrator.Migrator; these delegate) -------------------

    def _load_bridge(
        self, m: Manifest, old: tuple[dict[str, Any], Adapter | None]
    ) -> tuple[dict[str, Any], Adapter | None]:
        """The manifest's migration record and its adapter (loaded only when it changed)."""
        key = m.migration.get("adapter_key")
        adapter = old[1]
        if key != self._bridge_key:
            adapter = artifact.from_bytes(self.store.get(key)) if key else None
            self._bridge_key = key
        return (dict(m.migration), adapter)

    @property
    def bridge(self) -> dict[str, Any]:
        """The published migration record ({} when none)."""
        return self.bridge_state[0]

    @property
    def record(self) -> MigrationRecord | None:
        """The published migration record, typed."""
        return MigrationRecord.from_json(self.bridge_state[0])

    @property
    def migration_job(self) -> dict[str, Any]:
        return self.migrator.job

    def changed(self) -> None:
        """Something the views show changed: the refresher builds a new one soon."""
        self._changed.set()

    def start_migration(
        self, req: MigrationRequest, encode_old: Encode, encode_new: Encode
    ) -> tuple[Operation, bool]:
        """Start a model migration in the background (``Migrator.start``); (operation,
        whether this call started it). A request for the record's id when nothing runs
        raises ConflictError; the API uses ``migrator.start`` to answer 200 instead."""
        op, started, rec = self.migrator.start(req, encode_old, encode_new)
        if op is None:
            raise ConflictError(f"migration {req.id} is {rec.phase if rec else 'gone'}")
        return op, started

    def resume_migration(
        self, encode_old: Encode, encode_new: Encode, mid: str | None = None
    ) -> tuple[Operation, bool] | None:
        """Continue the active migration (``Migrator.resume``); None if there is none."""
        running = self.migrator.running()
        op = self.migrator.resume(encode_old, encode_new, mid)
        return None if op is None else (op, running is None)

    def backfill_snapshot(self) -> tuple[View, View, BackfillProgress, np.ndarray]:
        """(view, native view, progress, positions still to re-encode), one snapshot."""
        pair = self.native_pair
        if pair is None:
            raise ConflictError("no migration with dual writes is in progress")
        view, native = pair
        texts = [*(native.base.block.texts or [None] * len(native.base.block))]
        texts += native.delta.texts or [None] * len(native.delta)
        has_text = np.fromiter((bool(t) for t in texts), bool, len(texts))
        has_new = np.concatenate([native.base.block.has_vec, native.delta.has_vec])
        prog, todo = backfill_progress(view.alive, has_new, has_text)
        return view, native, prog, np.flatnonzero(todo)

    def cutover(
        self, force: bool = False, explicit: bool = True, mid: str | None = None
    ) -> dict[str, Any]:
        """Switch the index to the new model (``Migrator.cutover``)."""
        return self.migrator.cutover(force, explicit, mid)

    def rollback_migration(
        self, reason: str = "rolled back on request", mid: str | None = None
    ) -> None:
        """Stop the migration (any phase before Succeeded) and serve the old model only."""
        self.migrator.rollback(reason, mid)

    def search_merged(
        self, served_q: F32, new_q: F32, k: int, flt: Filter | None = None
    ) -> Answer | None:
        """During the backfill, when the guard allows it: the served strategy's top list
        merged with the native top list over the backfilled rows (calibrated probabilities,
        ``service.migrate.merged_positions``). Scores are the calibrated probabilities of
        relevance. None when the merge does not serve (then the caller serves the strategy)."""
        rec = self.bridge
        pair = self.native_pair
        if pair is None or not rec.get("merge", {}).get("serves") or not rec.get("calibration"):
            return None
        view, native = pair
        depth = max(DEPTH, k)
        served = self.search(served_q, depth, flt, view=view)
        has = native_mask(native)
        match = native.match_mask(flt)
        allowed = has if match is None else has & match
        share = float(has.sum() / max(1, view.live_rows))
        nq = normalize(np.asarray(new_q, np.float32))
        nat = native.exact_batch(nq[None, :], depth, allowed)[0] if share > 0 else None
        s_ids = served.hits.pos[None, :]
        n_ids = nat.pos[None, :] if nat is not None else np.zeros((1, 0), np.int64)
        ids, probs = merged_positions(s_ids, n_ids, share, rec["calibration"], k)
        kept = ids[0] >= 0
        ids, scores = ids[0][kept], probs[0][kept].astype(np.float32)
        return Answer(Hits(ids, scores), view, served.path)

    def backfilled_view(self, model: str) -> View | None:
        """``model``'s view of the published snapshot when a migration to ``model`` is under
        way and every live row has a ``model`` vector, else None. Its rows and positions are
        the served view's (call :meth:`fresh_view` first for read-your-writes)."""
        pair = self.native_pair
        if pair is None or pair[1].model != model or pair[1].live_rows != pair[0].live_rows:
            return None
        return pair[1]

    def search_native(self, native: View, q: F32, k: int, flt: Filter | None = None) -> Answer:
        """Exact top-k of a new-model query over ``native`` (:meth:`backfilled_view`), scored
        in the new model's metric: what the index answers after the cutover, before it."""
        if not 1 <= k <= 1000:
            raise InvalidInputError(f"k must be 1..1000, got {k}")
        q = np.asarray(q, dtype=np.float32)
        if q.shape != (native.dim,):
            raise InvalidInputError(
                f"a {native.model!r} query vector must have {native.dim} dimensions, got {q.shape}"
            )
        if not np.isfinite(q).all():
            raise InvalidInputError("query vector has NaN or infinite values")
        if native.metric == "cosine":
            q = normalize(q)
        started = time.perf_counter()
        hits = native.exact_batch(q[None, :], k, native.match_mask(flt))[0]
        self.hooks.query(self.name, "shadow", time.perf_counter() - started)
        return Answer(hits, native, "shadow")

    def query_vector(self, strategy: str, vector: F32, adapter: Adapter | None = None) -> F32:
        """The old-space vector a strategy searches with: adapters map new-model vectors.
        Pass the adapter of the same ``bridge_state`` the strategy was chosen from."""
        if strategy == STATUS_QUO:
            return self.prepare_query(vector)
        adapter = adapter or self.bridge_state[1]
        if adapter is None:
            raise ConflictError("no adapter is published for this index")
        started = time.perf_counter()
        mapped = adapter.apply(np.asarray(vector, np.float32))
        self.hooks.adapter(self.name, time.perf_counter() - started)
        return self.prepare_query(mapped)

    def status(self) -> dict[str, Any]:
        """Everything the operator and dashboards need (a projection, computed on demand)."""
        return build_status(self)
