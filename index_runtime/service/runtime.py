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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from index_runtime import lifecycle
from index_runtime.adapters import Adapter, artifact
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
from index_runtime.index.view import Hits, View
from index_runtime.migration import (
    ACTIVE,
    BRIDGED,
    STATUS_QUO,
    backfill_progress,
    cutover_decision,
)
from index_runtime.quality.oracle import Measurement, Oracle, Sample
from index_runtime.quality.window import WindowStats
from index_runtime.service.migrate import (
    DEPTH,
    Encode,
    EvalSet,
    MigrationRequest,
    closed_record,
    interval_of,
    measure_progress,
    merged_positions,
    native_mask,
    run_gate,
)
from index_runtime.service.mirror import Mirror
from index_runtime.service.operations import Operation, Operations, WorkFailed
from index_runtime.service.status import build_status
from index_runtime.store.compaction import plan_compaction
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import (
    ADAPTER_DIR,
    Codebook,
    IndexFile,
    IndexSpec,
    Manifest,
    ModelSpec,
    Pin,
    retire_unreferenced,
)
from index_runtime.store.objects import ObjectStore, new_object_name
from index_runtime.store.rows import RowBatch
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
        self.builder = ViewBuilder(store)  # owned by the refresher (under _refresh_lock)
        self._rng = random.Random(options.seed)
        manifest = writer.manifest if writer is not None else self.mlog.latest()
        if manifest is None:
            raise NotFoundError(f"index {name!r} does not exist in {store.describe()}")
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
        self.migration_job: dict[str, Any] = {}
        self.migration_thread: threading.Thread | None = None
        self._migration_lock = threading.Lock()  # record commits of the migration
        self._cancel_migration = threading.Event()
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
        if self.pin_holder is not None:
            try:
                self.mlog.drop_pin(self.pin_holder)
            except Exception:
                log.exception("dropping the pin of %s failed; it expires by itself", self.name)
        if self.writer is not None:
            self.writer.close()

    # views ------------------------------------------------------------------------------------

    def _snapshot(self, manifest: Manifest | None = None, force: bool = False) -> tuple[
        list[RowBatch], Manifest
    ]:
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
        self.builder = ViewBuilder(self.store)
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
        """During a migration with dual writes, the new model's view of the same snapshot as
        ``view`` (same rows and positions; the backfilled rows have vectors)."""
        to = m.migration.get("to")
        if m.migration.get("phase") not in BRIDGED or to not in m.index.models or to == model:
            self._native_builder = None
            return None
        if self._native_builder is None or self._native_builder.model != to:
            self._native_builder = ViewBuilder(self.store, model=to)
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
                data = encode_segment_index(codebook, blk.vecs[rows], blk.seqs[rows])
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

    # model migration ----------------------------------------------------------------------------

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

    def _job(self, phase: str, message: str = "", **extra: Any) -> None:
        self.migration_job.update(phase=phase, message=message, **extra)

    def _commit_record(self, change: Callable[[dict[str, Any]], dict[str, Any]], why: str) -> None:
        """Commit a change of the migration record (applied to the newest record)."""
        w = self._writer()
        now = self.clock()
        with self._migration_lock:
            w.commit_edit(
                lambda m: retire_unreferenced(
                    m, replace(m, migration=change(dict(m.migration))), now
                ),
                why,
            )
        self._changed.set()
        self.refresh(force=True)

    def _run(self, target: Callable[[], None]) -> tuple[Operation, bool]:
        """The migration thread, as an operation of kind ``migration``: it succeeds when the
        thread ends in any phase but Failed (its result names the phase)."""
        running = self.operations.running("migration")
        if running is not None:
            return running, False
        self._cancel_migration.clear()

        def work(op: Operation) -> dict[str, Any]:
            target()
            phase, message = self.migration_job.get("phase"), self.migration_job.get("message")
            if phase == "Failed":
                raise WorkFailed("MigrationFailed", str(message or "the migration failed"))
            return {"phase": phase, "message": message, "record_phase": self.bridge.get("phase")}

        return self._start_operation("migration", work)

    def start_migration(
        self, req: MigrationRequest, encode_old: Encode, encode_new: Encode
    ) -> tuple[Operation, bool]:
        """Start a model migration in the background: dual writes, the gate (sample pairs,
        fit, measure, select), then — unless the request says otherwise — the backfill and
        the cutover. Every step is published through the manifest. Returns the operation and
        whether this call started it (else one was running: that one)."""
        self._writer()
        running = self.operations.running("migration")
        if running is not None:
            return running, False
        if req.to_model == self.model:
            raise InvalidInputError(f"the index already serves {self.model!r}")
        if self.bridge.get("phase") in ACTIVE:
            raise ConflictError(
                f"a migration to {self.bridge.get('to')!r} is in phase "
                f"{self.bridge.get('phase')}; roll it back first"
            )
        self.migration_job = {"to": req.to_model, "started_at": self.clock()}
        self._job("Pending")
        return self._run(lambda: self._migrate(req, encode_old, encode_new))

    def _migrate(self, req: MigrationRequest, encode_old: Encode, encode_new: Encode) -> None:
        w = self._writer()
        old_model = self.model
        dual = False
        try:
            probe = next(
                (
                    t
                    for p in self.view.live_pos[:1000]
                    if (t := self.view.row(int(p), True)["text"])
                ),
                None,
            )
            if probe is None:
                raise InvalidInputError("no live rows have text; a migration re-encodes text")
            dim = int(np.asarray(encode_new([probe], "passage")).shape[1])
            now = self.clock()
            record: dict[str, Any] = {
                "from": old_model,
                "to": req.to_model,
                "phase": "Pending",
                "started_at": now,
                "options": req.options(),
            }

            def dual_writes(m: Manifest) -> Manifest:
                models = {**m.index.models, req.to_model: ModelSpec(dim, "cosine")}
                spec = replace(m.index, models=models, write_models=(old_model, req.to_model))
                return replace(m, index=spec, migration=record)

            w.change_spec(dual_writes, f"migration to {req.to_model}: dual writes")
            dual = True
            self._changed.set()
            record, adapter, ev = run_gate(
                self.view, old_model, encode_old, encode_new, req, self._job
            )
            if self._cancel_migration.is_set() or self._stop.is_set():
                return  # rolled back, or shut down, while the gate ran
            if adapter is not None:
                key = new_object_name(ADAPTER_DIR, ".safetensors")
                self.store.put(key, artifact.to_bytes(adapter))
                record["adapter_key"] = key
            if ev is not None:
                key = new_object_name(ADAPTER_DIR, ".json")
                self.store.put(key, ev.to_bytes())
                record["eval_key"] = key
            self._commit_record(lambda r: {**r, **record}, f"migration {record['phase']}")
            self._job("Bridged", record["reason"])
        except Exception as exc:
            log.warning("migration of %s to %s failed: %s", self.name, req.to_model, exc)
            if not dual:  # nothing of this migration is in the manifest yet
                failed = {"from": old_model, "to": req.to_model, "started_at": self.clock()}
                self._commit_record(lambda r: failed, "migration Failed")
            self._end_migration("Failed", str(exc))
            return
        if req.backfill:
            self._backfill_and_cut_over(encode_new, ev)

    def _end_migration(self, phase: str, reason: str) -> None:
        """Failed or RolledBack: the index stores and requires only the old model again; the
        adapter and the evaluation set are retired. Nothing stored is lost (new-model vectors
        already written stay in their segments until compaction drops the column)."""
        w = self._writer()
        now = self.clock()

        def edit(m: Manifest) -> Manifest:
            rec = closed_record(m.migration, phase, now, reason=reason)
            to = rec.get("to")
            spec = m.index
            if to in spec.models and to != serving_model(m):
                spec = replace(
                    spec,
                    models={n: v for n, v in spec.models.items() if n != to},
                    write_models=tuple(x for x in spec.write_models if x != to),
                )
            return retire_unreferenced(m, replace(m, index=spec, migration=rec), now)

        with self._migration_lock:
            w.change_spec(edit, f"migration {phase}")
        self._job(phase, reason)
        self._changed.set()
        self.refresh(force=True)

    def resume_migration(
        self, encode_old: Encode, encode_new: Encode
    ) -> tuple[Operation, bool] | None:
        """After a restart (or for a migration started with ``backfill: false``): continue
        the backfill and the cutover of the published migration as an operation (see
        :meth:`start_migration`). None if there is none to resume."""
        self._writer()
        rec = self.bridge
        if rec.get("phase") not in BRIDGED:
            return None
        running = self.operations.running("migration")
        if running is not None:
            return running, False
        self.migration_job = {"to": rec["to"], "started_at": self.clock()}
        self._job(str(rec["phase"]), "resumed")

        def run() -> None:
            try:
                ev = None
                if rec.get("eval_key"):
                    ev = EvalSet.from_bytes(
                        self.store.get(str(rec["eval_key"])), encode_old, encode_new
                    )
            except Exception as exc:
                log.warning("resuming the migration of %s failed: %s", self.name, exc)
                self._job("Failed", f"could not load the evaluation queries: {exc}")
                return
            self._backfill_and_cut_over(encode_new, ev)

        return self._run(run)

    def _backfill_and_cut_over(self, encode_new: Encode, ev: EvalSet | None) -> None:
        try:
            if self.bridge.get("phase") in ("Bridged", "Backfilling"):
                self._backfill(encode_new, ev)
            if self._cancel_migration.is_set() or self._stop.is_set():
                return  # rolled back, or shutting down: a restart resumes from the record
            self.cutover(force=False, explicit=False)
        except Exception as exc:
            log.exception("the backfill of %s stopped", self.name)
            self._job(str(self.bridge.get("phase", "")), f"stopped: {exc}; resume to continue")

    def backfill_snapshot(self) -> tuple[View, View, Any, np.ndarray]:
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

    def _backfill(self, encode_new: Encode, ev: EvalSet | None) -> None:
        """Re-encode every live row with text that has no new-model vector, in passes: a pass
        works through one snapshot's list (compare-and-set rewrites: a row written meanwhile
        already carries both vectors and is left alone); the next pass catches up with rows
        that arrived during it. Progress is checkpointed into the manifest: a restart
        continues from what is stored."""
        w = self._writer()
        rec = self.bridge
        to, old = str(rec["to"]), str(rec["from"])
        opts = rec.get("options", {})
        batch = int(opts.get("backfill_batch", 256))
        rate = float(opts.get("backfill_rate", 0.0))
        self._commit_record(lambda r: {**r, "phase": "Backfilling"}, "migration Backfilling")
        started = time.monotonic()
        written = skipped = 0
        last = 0.0
        next_share = 0.0
        self.checkpoint_backfill(ev, written, skipped, started)
        while not (self._cancel_migration.is_set() or self._stop.is_set()):
            self.refresh(force=True)
            view, _, prog, todo = self.backfill_snapshot()
            if not len(todo):
                break
            self._job("Backfilling", f"{prog.todo} rows to re-encode", progress=prog.as_dict())
            for lo in range(0, len(todo), batch):
                if self._cancel_migration.is_set() or self._stop.is_set():
                    return
                pos = todo[lo : lo + batch]
                rows = [view.row(int(p), payload=True) for p in pos]
                texts = [str(r["text"]) for r in rows]
                new = np.asarray(encode_new(texts, "passage"), np.float32)
                ack, n_skip = w.upsert_unchanged(
                    [r["key"] for r in rows],
                    [r["seq"] for r in rows],
                    {old: view.vectors_at(pos), to: new},
                    texts,
                    [r["metadata"] for r in rows],
                )
                written += ack.rows if ack else 0
                skipped += n_skip
                self._changed.set()
                self.hooks.backfill(self.name, ack.rows if ack else 0)
                if rate > 0:
                    time.sleep(len(pos) / rate)
                done = (prog.backfilled + written) / max(1, prog.live)
                if time.monotonic() - last >= 10.0 or done >= next_share:
                    self.refresh(force=True)
                    self.checkpoint_backfill(ev, written, skipped, started)
                    last = time.monotonic()
                    next_share = min(1.0, np.floor(done * 10 + 1e-9) / 10 + 0.1)
        if not (self._cancel_migration.is_set() or self._stop.is_set()):
            # the cutover decides: Succeeded or Backfilled
            self.refresh(force=True)
            self.checkpoint_backfill(ev, written, skipped, started)

    def checkpoint_backfill(
        self,
        ev: EvalSet | None,
        written: int,
        skipped: int,
        started: float,
    ) -> dict[str, Any]:
        """Measure the snapshot and publish the backfill's progress (and, with labelled
        queries, the merge's guard and a point of the quality curve) in the record."""
        view, native, prog, _ = self.backfill_snapshot()
        rec = self.bridge
        elapsed = max(1e-9, time.monotonic() - started)
        state = {
            **prog.as_dict(),
            "rewritten": written,
            "skipped": skipped,
            "rows_per_second": written / elapsed,
            "manifest_version": view.version,
            "updated_at": self.clock(),
        }
        point = None
        if ev is not None and rec.get("calibration"):
            served_q = self._served_vectors(ev)
            point = measure_progress(view, native, ev, served_q, rec["calibration"], self._k())

        def change(r: dict[str, Any]) -> dict[str, Any]:
            out = {**r, "backfill": state, "text_coverage": prog.text_coverage}
            if point is not None:
                out["merge"] = {
                    "serves": point["merge_serves"],
                    "share": point["share"],
                    "gain_calibration": point["merge_gain_calibration"],
                    "native_gain": point["native_gain"],
                }
                out["curve"] = [*r.get("curve", [])[-49:], point]
            return out

        self._commit_record(change, f"migration backfill {prog.share:.0%}")
        self._job("Backfilling", f"{prog.backfilled}/{prog.live} rows", progress=state)
        return state

    def _k(self) -> int:
        return int(self.bridge.get("options", {}).get("k", 10))

    def _served_vectors(self, ev: EvalSet) -> F32:
        adapter = self.bridge_state[1]
        if self.bridge.get("selected", STATUS_QUO) == STATUS_QUO or adapter is None:
            return ev.q_old
        return normalize(np.asarray(adapter.apply(ev.q_new), np.float32))

    def cutover(self, force: bool = False, explicit: bool = True) -> dict[str, Any]:
        """Switch the index to the new model when :func:`migration.cutover_decision` says so
        (``explicit``: an admin request, which may ``force`` past a measured regression).
        The old model's codebooks and the adapter are retired; the new model is served by the
        shadow at once and its IVF-PQ primary is trained and validated by the lifecycle, as at
        a cold start. Returns the decision."""
        w = self._writer()
        rec = self.bridge
        if rec.get("phase") not in BRIDGED:
            raise ConflictError(f"no migration waits for a cutover (phase {rec.get('phase')!r})")
        to = str(rec["to"])
        _, _, prog, _ = self.backfill_snapshot()
        auto = bool(rec.get("options", {}).get("auto_cutover", True)) or explicit
        native_gain = interval_of(rec.get("merge", {}).get("native_gain"))
        d = cutover_decision(prog, native_gain, auto, force, to)
        try:
            IndexSettings.from_json(self.current_manifest().settings, w.manifest.index.dims[to])
        except InvalidInputError as exc:
            d = replace(d, go=False, reason="SettingsInvalid", message=str(exc))
        if not d.go:
            phase = "Backfilled" if not prog.todo else str(rec["phase"])
            self._commit_record(
                lambda r: {
                    **r,
                    "phase": phase,
                    "cutover": {"reason": d.reason, "message": d.message},
                },
                f"migration cutover held: {d.reason}",
            )
            self._job(phase, d.message)
            if explicit:
                raise ConflictError(f"{d.reason}: {d.message}")
            return {"cut_over": False, "reason": d.reason, "message": d.message}
        self._job("CuttingOver", d.message)
        now = self.clock()

        def edit(m: Manifest) -> Manifest:
            spec = replace(m.index, models={to: m.index.models[to]}, write_models=(to,))
            r = closed_record(
                m.migration,
                "Succeeded",
                now,
                cutover={"reason": d.reason, "message": d.message, "at": now},
            )
            out = replace(m, index=spec, codebooks=(), index_files=(), serving=0, migration=r)
            return retire_unreferenced(m, out, now)

        with self._migration_lock:
            w.change_spec(edit, f"migration cutover to {to}")
        self._changed.set()
        self.refresh(force=True)
        self._job("Succeeded", d.message)
        return {"cut_over": True, "reason": d.reason, "message": d.message}

    def rollback_migration(self, reason: str = "rolled back on request") -> None:
        """Stop the migration (any phase before Succeeded) and serve the old model only."""
        self._writer()
        if self.bridge.get("phase") not in ACTIVE:
            raise ConflictError(f"no migration to roll back (phase {self.bridge.get('phase')!r})")
        self._cancel_migration.set()
        t = self.migration_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)
        self._end_migration("RolledBack", reason)

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
