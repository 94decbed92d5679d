"""The gate Job (``driftless job migrate``) against a sharded index's router: the start is
answered per shard (each shard's own operation, which the router does not poll), so the Job
waits on the router's merged record until every shard's gate has ended; a retried pod asks
again (the same id completes a start that reached only some shards)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from index_runtime.jobs import GATE_DONE, Admin, run_migrate
from index_runtime.shard_migration import merge_records

SPEC = {"id": "m-2", "to_model": "new", "backfill_mode": "internal"}


def shard(phase: str, id: str = "m-2") -> dict[str, Any]:
    return {"id": id, "from": "old", "to": "new", "phase": phase, "selected": "status-quo"}


def status(*shards: dict[str, Any] | None) -> dict[str, Any]:
    """The router's status: one record merged from the shards' (as ``router.status``)."""
    return {"sharded": True, "migration": {"record": merge_records(list(shards))}}


class RouterAdmin(Admin):
    """The router's admin API as the Job sees it: statuses in turn (the last repeats)."""

    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        super().__init__("http://router", "docs", "t")
        self._statuses: Iterator[dict[str, Any]] = iter(statuses)
        self._last: dict[str, Any] = {}
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((method, path, body))
        if (method, path) == ("GET", "/status"):
            self._last = next(self._statuses, self._last)
            return self._last
        if (method, path) == ("POST", "/admin/migrations"):
            answer = {"status": 202, "body": {"operation": "op-x", "started": True}}
            return {"shards": [{"shard": i, **answer} for i in range(3)], "id": "m-2"}
        raise AssertionError(f"the Job called {method} {path}")  # e.g. /admin/operations/...


def test_the_gate_job_waits_on_the_merged_record_until_every_shard_ended_its_gate() -> None:
    admin = RouterAdmin(
        [
            {},  # before the start: no migration
            status(shard("Evaluating"), shard("Bridged"), shard("SamplingPairs")),
            status(shard("Bridged"), shard("Bridged"), shard("Evaluating")),
            status(shard("Bridged"), shard("Bridged"), shard("Bridged")),
        ]
    )
    out = run_migrate(admin, SPEC, 0.0, 60)
    assert out.startswith("gate finished: phase Bridged")
    posts = [c for c in admin.calls if c[0] == "POST"]
    assert len(posts) == 1 and posts[0][2]["backfill"] is False  # type: ignore[index]
    assert sum(c[1] == "/status" for c in admin.calls) == 4  # polled until the last shard


def test_a_shard_whose_gate_failed_does_not_end_the_wait_before_the_others() -> None:
    """The merged phase is ``Mixed`` as soon as one shard failed; the Job still waits for
    every shard's gate to end, then reports (the operator rolls the others back)."""
    admin = RouterAdmin(
        [
            {},
            status(shard("Failed"), shard("Evaluating"), shard("Evaluating")),
            status(shard("Failed"), shard("Bridged"), shard("Bridged")),
        ]
    )
    assert run_migrate(admin, SPEC, 0.0, 60).startswith("gate finished: phase Mixed")
    assert sum(c[1] == "/status" for c in admin.calls) == 3


def test_a_retried_pod_starts_again_on_a_partly_started_index() -> None:
    """Shard 2 has no record (the first pod's start did not reach it): a retried pod POSTs
    the same id again instead of only waiting (which would never end)."""
    partial = status(shard("Evaluating"), shard("Evaluating"), None)
    admin = RouterAdmin([partial, status(*(shard(p) for p in ("Bridged",) * 3))])
    run_migrate(admin, SPEC, 0.0, 60)
    assert ("POST", "/admin/migrations") in [(m, p) for m, p, _ in admin.calls]


def test_an_unsharded_record_is_done_by_its_own_phase() -> None:
    """The merged record's per-shard rule does not change an unsharded writer's record."""
    from index_runtime.jobs import _reached

    assert _reached({"phase": "Bridged"}, GATE_DONE)
    assert not _reached({"phase": "Evaluating"}, GATE_DONE)
    assert not _reached(
        merge_records([shard("Bridged"), shard("Bridged", id="m-1")]) or {}, GATE_DONE
    )
