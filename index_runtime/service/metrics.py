"""Prometheus metrics of the runtime: ``driftless_`` prefix, base units, low-cardinality labels
(the index name, the query path, the window — never a query, key or segment id).

Event metrics (latencies, durations, failures) are recorded through :class:`Hooks`; state
metrics (windows, counts, phase) are refreshed from each runtime's status at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from index_runtime.encoders.breaker import State
from index_runtime.encoders.resilience import OUTCOMES
from index_runtime.lifecycle import Phase
from index_runtime.migration import PHASES
from index_runtime.quality.oracle import Measurement
from index_runtime.service.runtime import Hooks, IndexRuntime
from index_runtime.store.segcache import SegmentCache

MIGRATION_PHASES = ("None", *PHASES)
GATE_STEPS = ("SamplingPairs", "TrainingAdapter", "Evaluating")  # only the writer's job knows
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ENCODER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FETCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # up to 64 MiB objects
# segment cache counters (CacheStats field -> metric name, help)
CACHE_COUNTERS = {
    "hits": ("hits", "Segment opens answered from the local cache (mapped or verified file)."),
    "misses": ("misses", "Segment opens that fetched the segment from the object store."),
    "evictions": ("evictions", "Cached segment files deleted to keep the budget or unused."),
    "rejected": (
        "crc_failures",
        "Cached segment files that failed verification (CRC32 or size against their sidecar "
        "and the manifest, or Arrow could not open them); deleted and fetched again.",
    ),
}


class Metrics(Hooks):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.query_seconds = Histogram(
            "driftless_query_duration_seconds",
            "Search latency inside the runtime, by index and serving path.",
            ["index", "path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.query_errors = Counter(
            "driftless_query_errors",
            "Searches that failed (4xx and 5xx), by index and HTTP status class.",
            ["index", "status_class"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "driftless_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        g = {
            "overlap": ("overlap_ratio", "Mean overlap@k of the window against the exact oracle."),
            "overlap_lower": ("overlap_lower_ratio", "Lower 95% bound of the overlap window."),
            "overlap_upper": ("overlap_upper_ratio", "Upper 95% bound of the overlap window."),
            "samples": ("window_samples", "Samples in the overlap window."),
            "rank_correlation": (
                "rank_correlation",
                "Mean Spearman rank correlation over items common to both answers.",
            ),
            "distortion_ratio": (
                "distortion_ratio",
                "Mean |PQ - exact score| relative to the exact top-k score spread.",
            ),
        }
        self.window = {
            key: Gauge(f"driftless_oracle_{name}", help_, ["index", "window"], registry=r)
            for key, (name, help_) in g.items()
        }
        self.oracle_samples = Counter(
            "driftless_oracle_samples",
            "Sampled queries measured by the exact oracle, by window.",
            ["index", "window"],
            registry=r,
        )
        self.oracle_dropped = Gauge(
            "driftless_oracle_dropped_samples",
            "Sampled queries dropped because the oracle's queue was full (since start).",
            ["index"],
            registry=r,
        )
        self.theta = Gauge("driftless_oracle_theta", "Cutover threshold θ.", ["index"], registry=r)
        self.retrain_below = Gauge(
            "driftless_oracle_retrain_threshold",
            "Retraining threshold θ − δ.",
            ["index"],
            registry=r,
        )
        self.vectors = Gauge("driftless_index_vectors", "Live rows.", ["index"], registry=r)
        self.segments = Gauge("driftless_index_segments", "Live segments.", ["index"], registry=r)
        self.tombstones = Gauge(
            "driftless_index_tombstones", "Tombstones still stored.", ["index"], registry=r
        )
        self.deleted_ratio = Gauge(
            "driftless_index_deleted_ratio",
            "Share of stored rows that serve nothing (superseded or deleted).",
            ["index"],
            registry=r,
        )
        self.primary_overhead = Gauge(
            "driftless_index_deleted_overhead_ratio",
            "Share of entries in the serving structure that are dead, by structure.",
            ["index", "structure"],
            registry=r,
        )
        self.reader_lag = Gauge(
            "driftless_reader_lag_seconds",
            "How far the served view is behind the newest manifest.",
            ["index"],
            registry=r,
        )
        self.manifest_version = Gauge(
            "driftless_manifest_version", "Manifest version served.", ["index"], registry=r
        )
        self.codebook = Gauge(
            "driftless_codebook_version", "Codebook serving (0 = shadow).", ["index"], registry=r
        )
        self.phase = Gauge(
            "driftless_index_phase",
            "1 for the index's current phase.",
            ["index", "phase"],
            registry=r,
        )
        self.training_seconds = Histogram(
            "driftless_training_duration_seconds",
            "Codebook training and encoding duration.",
            ["index"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.training_failures = Counter(
            "driftless_training_failures", "Failed trainings.", ["index"], registry=r
        )
        self.rejections = Gauge(
            "driftless_training_consecutive_failures",
            "Consecutive failed or rejected trainings (drives the back-off).",
            ["index"],
            registry=r,
        )
        self.compaction_seconds = Histogram(
            "driftless_compaction_duration_seconds",
            "Compaction duration.",
            ["index"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.compaction_failures = Counter(
            "driftless_compaction_failures", "Failed compactions.", ["index"], registry=r
        )
        self.regenerations = Counter(
            "driftless_shadow_regenerations",
            "HNSW shadow graph regenerations after compaction, by result.",
            ["index", "result"],
            registry=r,
        )
        self.last_compaction = Gauge(
            "driftless_compaction_last_success_timestamp_seconds",
            "When compaction last succeeded (Unix time; 0 = never).",
            ["index"],
            registry=r,
        )

        self.adapter_seconds = Histogram(
            "driftless_adapter_duration_seconds",
            "Time to map one query through the migration's adapter.",
            ["index"],
            buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
            registry=r,
        )
        self.migration_phase = Gauge(
            "driftless_migration_phase",
            "1 for the model migration's current phase.",
            ["index", "phase"],
            registry=r,
        )
        self.migration_strategy = Gauge(
            "driftless_migration_strategy",
            "1 for the strategy serving during the migration (status-quo or adapter:<kind>).",
            ["index", "strategy"],
            registry=r,
        )
        self.migration_arr = Gauge(
            "driftless_migration_estimated_arr_ratio",
            "Estimated ARR@k of the served strategy (mean and 95% bounds).",
            ["index", "bound"],
            registry=r,
        )
        self.migration_gain = Gauge(
            "driftless_migration_gain_ratio",
            "Paired gain of the served strategy over the status quo on the decision metric.",
            ["index", "bound"],
            registry=r,
        )
        self.text_coverage = Gauge(
            "driftless_migration_text_coverage_ratio",
            "Share of live rows that have text or a new-model vector (others cannot be re-encoded).",
            ["index"],
            registry=r,
        )
        self.backfill_rows = Gauge(
            "driftless_migration_backfill_rows",
            "Live rows by backfill state at the last checkpoint (backfilled, todo, blocked).",
            ["index", "state"],
            registry=r,
        )
        self.backfill_share = Gauge(
            "driftless_migration_backfill_ratio",
            "Share of live rows with a new-model vector at the last checkpoint.",
            ["index"],
            registry=r,
        )
        self.backfill_rewritten = Counter(
            "driftless_migration_backfill_rewritten_rows",
            "Rows the backfill re-encoded and rewrote (rate() of it is the backfill rate).",
            ["index"],
            registry=r,
        )
        self.writable = Gauge(
            "driftless_writer_writable",
            "1 while the writer accepts writes, 0 while local storage refuses them (disk full, "
            "I/O errors, writer epoch not taken); see the status' storage.reason.",
            ["index"],
            registry=r,
        )
        self.storage_errors = Counter(
            "driftless_storage_errors",
            "Storage errors of the writer by op (epoch, wal, flush) and kind (no_space, io, or "
            "the object store's error reason).",
            ["index", "op", "kind"],
            registry=r,
        )
        self._storage_seen: dict[tuple[str, str, str], int] = {}
        # a state, not a count: the alert on it resolves as soon as a flush succeeds again
        self.flush_failing = Gauge(
            "driftless_writer_flush_failing",
            "1 while the writer's last flush (segments to the object store + manifest commit) "
            "failed: acknowledged writes are in its WAL only and readers do not see them.",
            ["index"],
            registry=r,
        )
        self.merge_serving = Gauge(
            "driftless_migration_merge_serving",
            "1 while the guard lets the progressive merge serve, else 0.",
            ["index"],
            registry=r,
        )
        self.guard_flips = Counter(
            "driftless_migration_guard_flips",
            "Changes of what serves decided by the merge's guard at backfill checkpoints "
            "(the record's guard.flips, summed over migrations; hysteresis keeps it low).",
            ["index"],
            registry=r,
        )
        self._flips_seen: dict[tuple[str, str], int] = {}
        self.merged_models = Gauge(
            "driftless_migration_kept_merged",
            "1 while the index keeps both models of its last migration and serves their "
            "merge (cutover policy keep_merged: if_better), else 0.",
            ["index"],
            registry=r,
        )

        # the segment cache of readers with vectors: mmap (no series otherwise) ------------
        self.cache_bytes = Gauge(
            "driftless_vector_cache_bytes",
            "Bytes of segment files in the local vector cache.",
            ["index"],
            registry=r,
        )
        self.cache_in_use = Gauge(
            "driftless_vector_cache_in_use_bytes",
            "Bytes of cached segment files that views read (never evicted).",
            ["index"],
            registry=r,
        )
        self.cache_capacity = Gauge(
            "driftless_vector_cache_capacity_bytes",
            "The vector cache's budget; exceeded only while the files in use need more.",
            ["index"],
            registry=r,
        )
        self.cache_counters = {
            field: Counter(f"driftless_vector_cache_{name}", help_, ["index"], registry=r)
            for field, (name, help_) in CACHE_COUNTERS.items()
        }
        self._cache_seen: dict[str, tuple[SegmentCache, dict[str, int]]] = {}
        self.cache_fetch_seconds = Histogram(
            "driftless_vector_cache_fetch_duration_seconds",
            "Time to fetch a segment from the object store into the vector cache and map it.",
            ["index"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )

        # encoders (per model: one encoder serves every index of the process) -------------
        self.encoder_requests = Counter(
            "driftless_encoder_requests",
            "Calls to an encoder by model and outcome (ok, unavailable: transient failure, "
            "rejected: permanent failure, circuit_open: not sent); every retry is a call.",
            ["model", "outcome"],
            registry=r,
        )
        self.encoder_seconds = Histogram(
            "driftless_encoder_seconds",
            "Duration of the encoder calls that were sent, by model (failures included).",
            ["model"],
            buckets=ENCODER_BUCKETS,
            registry=r,
        )
        self.encoder_breaker = Gauge(
            "driftless_encoder_breaker_state",
            "1 for the state of the model's encoder circuit breaker (closed, open, half_open).",
            ["model", "state"],
            registry=r,
        )

    # event hooks ----------------------------------------------------------------------------

    def encoder(self, model: str, outcome: str, seconds: float | None) -> None:
        self.encoder_requests.labels(model, outcome).inc()
        if seconds is not None:
            self.encoder_seconds.labels(model).observe(seconds)

    def encoder_state(self, model: str, state: str) -> None:
        """Also called once when a model's guard is created: its series start at zero."""
        for outcome in OUTCOMES:
            self.encoder_requests.labels(model, outcome)
        self.encoder_seconds.labels(model)
        for s in State:
            self.encoder_breaker.labels(model, s.value).set(1 if s.value == state else 0)

    def adapter(self, index: str, seconds: float) -> None:
        self.adapter_seconds.labels(index).observe(seconds)

    def backfill(self, index: str, rows: int) -> None:
        self.backfill_rewritten.labels(index).inc(rows)

    def vector_fetch(self, index: str, seconds: float) -> None:
        self.cache_fetch_seconds.labels(index).observe(seconds)

    def query(self, index: str, path: str, seconds: float) -> None:
        self.query_seconds.labels(index, path).observe(seconds)

    def measured(self, index: str, m: Measurement, serving: int) -> None:
        self.oracle_samples.labels(index, "serving" if m.codebook == serving else "candidate").inc()

    def training(self, index: str, seconds: float, ok: bool) -> None:
        self.training_seconds.labels(index).observe(seconds)
        if not ok:
            self.training_failures.labels(index).inc()

    def compaction(self, index: str, seconds: float, ok: bool) -> None:
        self.compaction_seconds.labels(index).observe(seconds)
        if not ok:
            self.compaction_failures.labels(index).inc()

    def regeneration(self, index: str, ok: bool) -> None:
        self.regenerations.labels(index, "ok" if ok else "failed").inc()

    def init_index(self, index: str) -> None:
        """Create every labelled series of an index at zero, so dashboards see them at once."""
        for path in ("primary", "shadow"):
            self.query_seconds.labels(index, path)
        for window in ("serving", "candidate"):
            self.oracle_samples.labels(index, window)
        for sc in ("4xx", "5xx"):
            self.query_errors.labels(index, sc)
        self.training_seconds.labels(index)
        self.training_failures.labels(index)
        self.compaction_seconds.labels(index)
        self.compaction_failures.labels(index)
        for result in ("ok", "failed"):
            self.regenerations.labels(index, result)

    # state ----------------------------------------------------------------------------------

    def collect_state(self, runtimes: Iterable[IndexRuntime]) -> None:
        for rt in runtimes:
            st = rt.status()
            n = rt.name
            self.vectors.labels(n).set(st["counts"]["live"])
            self.segments.labels(n).set(st["counts"]["segments"])
            self.tombstones.labels(n).set(st["counts"]["tombstones"])
            self.deleted_ratio.labels(n).set(st["counts"]["deleted_ratio"])
            for structure in ("primary", "shadow"):
                self.primary_overhead.labels(n, structure).set(st["deletion_overhead"][structure])
            self.reader_lag.labels(n).set(st["reader"]["lag_seconds"])
            self.manifest_version.labels(n).set(st["reader"]["manifest_version"])
            self.codebook.labels(n).set(st["serving"]["codebook"])
            self.oracle_dropped.labels(n).set(st["oracle"]["dropped"])
            self.theta.labels(n).set(st["oracle"]["theta"])
            self.retrain_below.labels(n).set(st["oracle"]["theta"] - st["oracle"]["delta"])
            self.rejections.labels(n).set(st["training"]["consecutive_failures"])
            self.last_compaction.labels(n).set(st["compaction"]["last_success_at"])
            for p in Phase:
                self.phase.labels(n, p.value).set(1 if st["phase"] == p.value else 0)
            for window in ("serving", "candidate"):
                w = st["windows"].get(window)
                _set_window(self.window, n, window, w)
            self._collect_migration(n, rt.bridge, rt.migration_job)
            self._collect_storage(n, st.get("storage"))
            if rt.segment_cache is not None:
                self._collect_cache(n, rt.segment_cache)

    def _collect_cache(self, n: str, cache: SegmentCache) -> None:
        """Gauges from the cache's state; the counters follow the increase of its counts
        (per cache object: a reopened index's new cache counts from zero again)."""
        state = cache.state()
        self.cache_bytes.labels(n).set(state.bytes)
        self.cache_in_use.labels(n).set(state.in_use_bytes)
        self.cache_capacity.labels(n).set(state.budget_bytes)
        self.cache_fetch_seconds.labels(n)  # the series exists before the first fetch
        prev = self._cache_seen.get(n)
        if prev is None or prev[0] is not cache:
            prev = self._cache_seen[n] = (cache, {})
        seen = prev[1]
        for field, counter in self.cache_counters.items():
            count = getattr(state.stats, field)
            counter.labels(n).inc(max(count - seen.get(field, 0), 0))
            seen[field] = count

    def _collect_storage(self, n: str, storage: dict[str, Any] | None) -> None:
        if storage is None:
            return
        self.writable.labels(n).set(1 if storage["writable"] else 0)
        self.flush_failing.labels(n).set(1 if storage.get("flush_error") else 0)
        for e in storage["errors"]:  # the writer counts; the counter follows its increase
            label = (n, e["op"], e["kind"])
            new = e["count"] - self._storage_seen.get(label, 0)
            if new > 0:
                self.storage_errors.labels(*label).inc(new)
                self._storage_seen[label] = e["count"]

    def _collect_migration(self, n: str, record: dict[str, Any], job: dict[str, Any]) -> None:
        current = record.get("phase") or "None"
        if current == "Pending" and job.get("phase") in GATE_STEPS:
            current = job["phase"]
        for p in MIGRATION_PHASES:
            self.migration_phase.labels(n, p).set(1 if current == p else 0)
        if not record.get("strategies"):
            return
        for row in record["strategies"]:
            self.migration_strategy.labels(n, row["name"]).set(
                1 if row["name"] == record["selected"] else 0
            )
            if row["name"] == record["selected"]:
                for bound, key in (("mean", "mean"), ("lower", "low"), ("upper", "high")):
                    self.migration_arr.labels(n, bound).set(row["arr"][key])
                    self.migration_gain.labels(n, bound).set(row["gain"][key])
        self.text_coverage.labels(n).set(record.get("text_coverage", float("nan")))
        bf = record.get("backfill")
        if bf:
            for state in ("backfilled", "todo", "blocked"):
                self.backfill_rows.labels(n, state).set(bf[state])
            self.backfill_share.labels(n).set(bf["share"])
        self.merge_serving.labels(n).set(1 if record.get("merge", {}).get("serves") else 0)
        self._collect_guard(n, record)

    def _collect_guard(self, n: str, record: dict[str, Any]) -> None:
        """The flip counter follows the increase of the record's ``guard.flips`` per migration
        (a process that starts mid-migration counts the flips it has not seen yet once)."""
        flips = int((record.get("guard") or {}).get("flips") or 0)
        label = (n, str(record.get("id") or record.get("started_at") or ""))
        new = flips - self._flips_seen.get(label, 0)
        if new > 0:
            self.guard_flips.labels(n).inc(new)
            self._flips_seen[label] = flips
        else:
            self.guard_flips.labels(n)  # the series exists (0) before the first flip
        merged = record.get("phase") == "Succeeded" and (record.get("cutover") or {}).get("merged")
        self.merged_models.labels(n).set(1 if merged else 0)


def _set_window(
    gauges: dict[str, Gauge], index: str, window: str, w: dict[str, float] | None
) -> None:
    get: Callable[[str], float] = (
        (lambda k: float("nan"))
        if w is None
        else (lambda k: float("nan") if w.get(k) is None else float(w[k]))
    )
    gauges["overlap"].labels(index, window).set(get("mean"))
    gauges["overlap_lower"].labels(index, window).set(get("lower"))
    gauges["overlap_upper"].labels(index, window).set(get("upper"))
    gauges["samples"].labels(index, window).set(0 if w is None else w["count"])
    gauges["rank_correlation"].labels(index, window).set(get("rank_correlation"))
    gauges["distortion_ratio"].labels(index, window).set(get("distortion_ratio"))
