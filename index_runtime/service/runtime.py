"""One index at run time: writer, views, search, the exact oracle and the maintenance loop.

Roles (``Roles``): ``writer`` owns the WAL and commits; ``reader`` serves queries from the
newest manifest it has loaded (polling); ``shadow`` holds the exact oracle and the overlap
windows. Standalone, one process has all three.

Threads: the *refresher* builds a new :class:`View` when the manifest or the pending rows
change and swaps it in by reference; the *maintenance* loop flushes, encodes new segments with
every codebook, asks :func:`index_runtime.lifecycle.decide` what to do and does it (only with
maintenance on); training runs in a thread of its own. Queries never wait for any of them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from index_runtime import lifecycle
from index_runtime.adapters import Adapter, artifact
from index_runtime.errors import ConflictError, InvalidInputError, NotFoundError
from index_runtime.index.filters import Filter
from index_runtime.index.loader import ViewBuilder
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
from index_runtime.migration import STATUS_QUO
from index_runtime.quality.oracle import Measurement, Oracle, Sample
from index_runtime.quality.window import WindowStats
from index_runtime.service.migrate import Encode, MigrationRequest, run_gate
from index_runtime.service.mirror import Mirror
from index_runtime.service.status import build_status
from index_runtime.store.compaction import plan_compaction
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import (
    ADAPTER_DIR,
    Codebook,
    IndexFile,
    Manifest,
    Pin,
    retire_unreferenced,
)
from index_runtime.store.objects import ObjectStore, new_object_name
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
        self.builder = ViewBuilder(store)
        self._rng = random.Random(options.seed)
        manifest = writer.manifest if writer is not None else self.mlog.latest()
        if manifest is None:
            raise NotFoundError(f"index {name!r} does not exist in {store.describe()}")
        self.spec = manifest.index
        self.model = manifest.index.write_models[0]
        self.settings = IndexSettings.from_json(manifest.settings, self.spec.dims[self.model])
        o = self.settings.oracle
        self.oracle = Oracle(o.k, o.window, o.cpu_budget, o.queue, self._measured)
        self._polled: tuple[float, Manifest] | None = None
        self.shadow_graph: ShadowGraph | None = None
        if self.settings.shadow.kind == "hnsw" and roles.shadow:
            dim = self.spec.dims[self.model]
            metric = self.spec.models[self.model].metric
            self.shadow_graph = ShadowGraph(dim, metric, self.settings.shadow)
        self.regeneration_failures = 0
        self.mirror: Mirror | None = None
        if options.shadow_url and not roles.shadow:
            self.mirror = Mirror(options.shadow_url, name, self.settings.oracle.queue)
        self.stale_samples = 0
        # a reader pins the manifest it serves, so GC keeps its objects (lease, renewed)
        self.pin_holder = f"reader-{name}-{uuid.uuid4().hex[:8]}" if writer is None else None
        self.pin_lease_s = 600.0
        self._pinned_at = 0.0
        self._pinned_version = 0
        self.view: View = self.builder.build(manifest, self._pending())
        if self.shadow_graph is not None:
            self.shadow_graph.sync(self.view)
        self._renew_pin()
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
        self._threads: list[threading.Thread] = []
        self._maint_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        # model migration: the published record and its adapter (loaded from the manifest,
        # swapped by reference), and the writer's job while it runs
        self.bridge_state: tuple[dict[str, Any], Adapter | None] = ({}, None)  # swapped as one
        self._bridge_key: str | None = None
        self.migration_job: dict[str, Any] = {}
        self.migration_thread: threading.Thread | None = None
        self._load_bridge(manifest)

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

    def stop(self) -> None:
        """Stop the loops, then flush and close the writer (graceful shutdown)."""
        self._stop.set()
        self._changed.set()
        for t in self._threads:
            t.join(timeout=10)
        if self.training_thread is not None:
            self.training_thread.join(timeout=30)
        self.oracle.stop()
        if self.pin_holder is not None:
            self.mlog.drop_pin(self.pin_holder)
        if self.mirror is not None:
            self.mirror.stop()
        if self.writer is not None:
            self.writer.close()

    # views ------------------------------------------------------------------------------------

    def _pending(self) -> list[Any]:
        return self.writer.pending_batches() if self.writer is not None else []

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
        """Build a view of the newest state if anything changed, and swap it in. Readers read
        the newest manifest at most every ``poll_s`` unless ``force``."""
        m = self.current_manifest(force)
        pending = self._pending()
        top = int(pending[-1].seqs.max()) if pending else m.flushed_seq
        if (
            m.version != self.view.version
            or top != self.view.pending_seq
            or (not pending and len(self.view.delta))
        ):
            view = self.builder.build(m, pending, self.settings)
            if self.shadow_graph is not None:
                self.shadow_graph.sync(view)  # before the swap: the view's rows are in the graph
            self.view = view
            if self.roles.shadow:
                self.oracle.retain(set(self.view.primaries))
            self._load_bridge(m)
        self.reader_lag_s = 0.0 if m.version == self.view.version else self.clock() - m.committed_at
        self._renew_pin()
        return self.view

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

    def search(self, q: F32, k: int, flt: Filter | None = None) -> Answer:
        """Top-k over the current view: the serving primary if there is one, else the shadow.
        A share of queries is mirrored to the oracle (non-blocking)."""
        if not 1 <= k <= 1000:
            raise InvalidInputError(f"k must be 1..1000, got {k}")
        started = time.perf_counter()
        view = self.view
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
            training=self.training_thread is not None and self.training_thread.is_alive(),
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
            if self.options.maintenance and self.writer is not None:
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

    def start_training(self) -> bool:
        """Train a candidate codebook in the background; False if one is already training."""
        self._writer()
        if self.training_thread is not None and self.training_thread.is_alive():
            return False
        self.training_thread = threading.Thread(
            target=self._train, name=f"train-{self.name}", daemon=True
        )
        self.training_thread.start()
        return True

    def _train(self) -> None:
        w = self._writer()
        started = time.perf_counter()
        try:
            view = self.view
            p = self.settings.primary
            plan = plan_training(view.live_rows, view.dim, p)
            pick = sample_rows(view.live_rows, plan.sample_rows, self.options.seed + self.trainings)
            sample = view.vectors_at(view.live_pos[pick])
            data = train_codebook(sample, view.metric, plan, p.coarse, self.options.seed)
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

            w.commit_edit(edit, "train")
            self.trainings += 1
            self.encode_segments()
            self.hooks.training(self.name, time.perf_counter() - started, True)
        except Exception as exc:
            log.warning("training %s failed: %s", self.name, exc)
            self.failures += 1
            self.last_failure_at = self.clock()
            self.last_failure = str(exc)
            self.hooks.training(self.name, time.perf_counter() - started, False)
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

    def compact(self, gc: bool = True) -> Any:
        w = self._writer()
        started = time.perf_counter()
        try:
            report = w.compact(gc=gc)
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

    def _load_bridge(self, m: Manifest) -> None:
        """Publish the manifest's migration record and load its adapter when it changed."""
        key = m.migration.get("adapter_key")
        adapter = self.bridge_state[1]
        if key != self._bridge_key:
            adapter = artifact.from_bytes(self.store.get(key)) if key else None
            self._bridge_key = key
        self.bridge_state = (dict(m.migration), adapter)

    @property
    def bridge(self) -> dict[str, Any]:
        """The published migration record ({} when none)."""
        return self.bridge_state[0]

    def start_migration(
        self, req: MigrationRequest, encode_old: Encode, encode_new: Encode
    ) -> bool:
        """Run the gate (sample pairs, fit, measure, select) in the background and publish
        the result through the manifest. False if one is already running."""
        self._writer()
        if self.migration_thread is not None and self.migration_thread.is_alive():
            return False
        if req.to_model == self.model:
            raise InvalidInputError(f"the index already serves {self.model!r}")
        self.migration_job = {
            "to": req.to_model,
            "phase": "Pending",
            "message": "",
            "started_at": self.clock(),
        }
        self.migration_thread = threading.Thread(
            target=self._migrate,
            args=(req, encode_old, encode_new),
            name=f"migrate-{self.name}",
            daemon=True,
        )
        self.migration_thread.start()
        return True

    def _migrate(self, req: MigrationRequest, encode_old: Encode, encode_new: Encode) -> None:
        def progress(phase: str, message: str) -> None:
            self.migration_job.update(phase=phase, message=message)

        w = self._writer()
        try:
            record, adapter = run_gate(self.view, self.model, encode_old, encode_new, req, progress)
            if adapter is not None:
                key = new_object_name(ADAPTER_DIR, ".safetensors")
                self.store.put(key, artifact.to_bytes(adapter))
                record["adapter_key"] = key
        except Exception as exc:
            log.warning("migration of %s to %s failed: %s", self.name, req.to_model, exc)
            record = {
                "from": self.model,
                "to": req.to_model,
                "phase": "Failed",
                "reason": str(exc),
                "finished_at": self.clock(),
            }
        now = self.clock()
        w.commit_edit(
            lambda m: retire_unreferenced(m, replace(m, migration=record), now),
            f"migration {record['phase']}",
        )
        self.migration_job.update(phase=record["phase"], message=record.get("reason", ""))
        self._changed.set()
        self.refresh(force=True)

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
