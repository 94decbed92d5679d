"""The operator's own Prometheus metrics (its reconciles and its use of the Kubernetes API),
served on ``--metrics-port`` (the chart's operator Service and ServiceMonitor scrape it).

Names follow Prometheus conventions (``promtool check metrics`` runs on them in the tests):
counters end in ``_total``, durations are seconds. Each operator has its own registry, so two
in one process (tests) do not share series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

KINDS = ("VectorIndex", "ModelMigration")
OUTCOMES = ("ok", "error")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "driftless_operator_reconciles",
            "Reconcile passes by custom resource kind and outcome (error: the pass raised and "
            "kopf retries it)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "driftless_operator_reconcile_duration_seconds",
            "Wall time of one reconcile pass, including the runtime's status calls",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.api_requests = Counter(
            "driftless_operator_api_requests",
            "Requests of the operator's own Kubernetes client by verb and HTTP status "
            "(0: no answer); kopf's watches of the custom resources are not counted",
            ["verb", "code"],
            registry=self.registry,
        )
        self.pruned = Counter(
            "driftless_operator_pruned_children",
            "Children deleted because the desired set no longer has them, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.watch_restarts = Counter(
            "driftless_operator_watch_restarts",
            "Watches of the children that broke and listed again, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.purges_skipped = Counter(
            "driftless_operator_purges_skipped",
            "VectorIndexes with reclaimPolicy Delete released without purging their data "
            "(their namespace was being deleted: the purge Job is refused there)",
            registry=self.registry,
        )
        for kind in KINDS:  # every series exists from the start (rate() and absent() work)
            self.reconcile_seconds.labels(kind)
            for outcome in OUTCOMES:
                self.reconciles.labels(kind, outcome)

    def request(self, verb: str, code: int) -> None:
        self.api_requests.labels(verb, str(code)).inc()

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Counts and times one pass; an exception counts as an error and propagates."""
        start = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.reconcile_seconds.labels(kind).observe(time.perf_counter() - start)
            self.reconciles.labels(kind, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
