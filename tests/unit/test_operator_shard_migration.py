"""A ModelMigration of a sharded index in the operator's pure core. The operator reads the
router's status, whose record is merged from the shards' (``shard_migration.merge_records``,
used here as the router uses it): no backfill Job (each shard's writer re-encodes its own
rows), the backfill resumed through the router, the cutover asked once every shard is ready
(``CoordinatedCutover``) or held by the first shard that holds, nothing decided from a merged
phase before every shard has this migration's record, and shards that ended apart rolled
back."""

from __future__ import annotations

from typing import Any

import pytest

from index_operator.reconcile.jobs import JobState
from index_operator.reconcile.migration import (
    MAct,
    MigrationObservation,
    MigrationPlan,
    cutover_refused,
    plan_migration,
)
from index_operator.spec import Migration
from index_runtime.contract import JobKind, MigrationRecord
from index_runtime.shard_migration import merge_records

SHARDS = 3
UID = "m-2"


def migration(**spec: Any) -> Migration:
    return Migration.parse(
        {
            "kind": "ModelMigration",
            "metadata": {"name": "mm", "namespace": "s", "uid": UID},
            "spec": {"indexRef": {"name": "docs"}, "targetModelRef": {"name": "new"}, **spec},
        }
    )


AUTO = migration()
MANUAL = migration(cutover={"policy": "Manual"})


def shard(phase: str, reason: str = "", id: str = UID, rows: int = 100) -> dict[str, Any]:
    """One coordinated shard's record as its writer stores it (the gate Job asked for
    ``backfill: false, cutover: manual``, the router added ``coordinated: true``)."""
    rec: dict[str, Any] = {
        "id": id,
        "from": "old",
        "to": "new",
        "phase": phase,
        "options": {"backfill": False, "auto_cutover": False, "coordinated": True},
        "backfill": {"live": rows, "backfilled": rows if phase == "Backfilled" else 0},
    }
    if reason:
        rec["cutover"] = {"reason": reason, "message": f"{reason} (shard message)"}
    return rec


def merged(*shards: dict[str, Any] | None) -> MigrationRecord:
    """What the router's status carries under ``migration.record``."""
    rec = MigrationRecord.from_json(merge_records(list(shards)))
    assert rec is not None
    return rec


def tick(
    mig: Migration, rec: MigrationRecord | None, prior: dict[str, Any] | None = None, **kw: Any
) -> MigrationPlan:
    obs = MigrationObservation(
        now=10.0, record=rec, from_model="old", prior=prior, shards=SHARDS, **kw
    )
    return plan_migration(mig, obs)


def acts(plan: MigrationPlan) -> list[tuple[MAct, JobKind | None, bool]]:
    return [(a.act, a.job, a.force) for a in plan.actions]


def cond(plan: MigrationPlan, type_: str) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_a_bridged_index_is_resumed_through_the_router_without_a_backfill_job() -> None:
    """Every shard Bridged and waiting for the backfill request: the operator asks once
    (the router forwards it to every shard) and starts no Indexed Job, now or later."""
    rec = merged(*(shard("Bridged") for _ in range(SHARDS)))
    plan = tick(AUTO, rec, gate_job=JobState.SUCCEEDED)
    assert acts(plan) == [(MAct.RESUME, None, False)]
    assert plan.status["phase"] == "Bridged" and "backfillJob" not in plan.status
    # the backfill runs on every shard; a missing Job is not a reason to create one, even
    # after a stall (the shards' writers run it; Stalled still shows)
    running = merged(*(shard("Backfilling") for _ in range(SHARDS)))
    first = tick(AUTO, running, plan.status)
    assert acts(first) == [] and first.status["reason"] == "Backfilling"
    assert "internal" in first.status["message"] and "3 shards" in first.status["message"]
    late = plan_migration(
        AUTO,
        MigrationObservation(
            now=10.0 + 10 * AUTO.backfill_stall_s,
            record=running,
            from_model="old",
            prior=first.status,
            shards=SHARDS,
            backfill_job=JobState.FAILED,
        ),
    )
    assert acts(late) == [] and cond(late, "Stalled")["status"] == "True"
    assert late.status["progress"]["live"] == 3 * 100  # the shards' counts summed


def test_the_unsharded_index_still_gets_its_backfill_job() -> None:
    """The same record on an unsharded writer (no shards list): the Indexed Job starts."""
    rec = MigrationRecord.from_json(shard("Backfilling"))
    plan = plan_migration(
        AUTO, MigrationObservation(now=10.0, record=rec, from_model="old", shards=1)
    )
    assert acts(plan) == [(MAct.START_JOB, JobKind.BACKFILL, False)]


@pytest.mark.parametrize(
    ("mig", "expected", "reason"),
    [
        (AUTO, [(MAct.CUTOVER, None, False)], "CutoverRequested"),
        (MANUAL, [], "AwaitingApproval"),
        (
            migration(cutover={"policy": "Manual", "approved": True}),
            [(MAct.CUTOVER, None, False)],
            "CutoverRequested",
        ),
    ],
    ids=["auto", "manual", "manual-approved"],
)
def test_every_shard_ready_is_a_cutover_under_auto_or_approval(
    mig: Migration, expected: list[Any], reason: str
) -> None:
    """A coordinated shard never cuts over by itself: Backfilled with CoordinatedCutover is
    ready, and the operator asks the router for the cutover as it asks an unsharded writer."""
    rec = merged(*(shard("Backfilled", "CoordinatedCutover") for _ in range(SHARDS)))
    plan = tick(mig, rec, {"phase": "Backfilling"})
    assert acts(plan) == expected
    assert plan.status["reason"] == reason


def test_a_shard_that_holds_holds_the_index_unless_forced() -> None:
    """Shards 0 and 2 ready, shard 1 measured a regression: no cutover request (the router
    would refuse it every pass); the reason is shard 1's. ``force`` asks, forced."""
    rec = merged(
        shard("Backfilled", "CoordinatedCutover"),
        shard("Backfilled", "NativeRegression"),
        shard("Backfilled", "CoordinatedCutover"),
    )
    plan = tick(AUTO, rec, {"phase": "Backfilling"})
    assert acts(plan) == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Backfilled", "NativeRegression")
    assert "shard 1" in plan.status["message"]
    assert cond(plan, "CutoverHeld")["status"] == "True"
    forced = tick(migration(cutover={"force": True}), rec, plan.status)
    assert acts(forced) == [(MAct.CUTOVER, None, True)]
    # a shard just Backfilled, before its cutover decision: the router lists the record's
    # prose reason; not ready, and not a reason to show as one
    fresh = shard("Backfilled")
    fresh["reason"] = "adapter:procrustes gains +0.37 over the status quo"
    early = merged(
        shard("Backfilled", "CoordinatedCutover"), fresh, shard("Backfilled", "CoordinatedCutover")
    )
    plan = tick(AUTO, early, {"phase": "Backfilling"})
    assert acts(plan) == [] and plan.status["reason"] == "ShardNotReady"
    assert "shard 1" in plan.status["message"]


def test_a_begun_cutover_is_asked_to_finish() -> None:
    """Shard 0 cut over, the others still Backfilled and ready (the router stopped between
    shards): the merged phase is Backfilled and the request finishes the cutover."""
    rec = merged(
        shard("Succeeded", "CutOver"),
        shard("Backfilled", "CoordinatedCutover"),
        shard("Backfilled", "CoordinatedCutover"),
    )
    assert acts(tick(AUTO, rec, {"phase": "CuttingOver"})) == [(MAct.CUTOVER, None, False)]
    done = merged(*(shard("Succeeded", "CutOver") for _ in range(SHARDS)))
    end = tick(AUTO, done, {"phase": "CuttingOver"})
    assert (end.status["phase"], end.status["reason"]) == ("Succeeded", "CutOver")


def test_nothing_is_decided_before_every_shard_has_this_migration() -> None:
    """Shard 2 still shows an earlier, rolled-back migration (the start has not reached it,
    or its reader lags): the router's merged phase is then ``Mixed``, which must not end this
    migration; the operator waits (no action, no terminal phase)."""
    rec = merged(shard("Evaluating"), shard("Evaluating"), shard("RolledBack", id="m-1"))
    assert rec.phase == "Mixed"  # what the router reports
    plan = tick(AUTO, rec, {"phase": "Pending"}, gate_job=JobState.ACTIVE)
    assert acts(plan) == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "StartingOnShards")
    assert "shards 2" in plan.status["message"]
    # the gate Job gave up (its retries spent) before reaching shard 2: nobody will start it
    # there, so the shards that started are rolled back
    failed = tick(AUTO, rec, plan.status, gate_job=JobState.FAILED)
    assert acts(failed) == [(MAct.ROLLBACK, None, False)]
    assert (failed.status["phase"], failed.status["reason"]) == ("RolledBack", "GateJobFailed")


def test_shards_that_ended_apart_are_rolled_back() -> None:
    """Shard 1's gate failed (the runtime rolled it back) while the others are Bridged: the
    index cannot cut over; the active shards are rolled back through the router."""
    rec = merged(shard("Bridged"), shard("Failed"), shard("Bridged"))
    plan = tick(AUTO, rec, {"phase": "Evaluating"})
    assert acts(plan) == [(MAct.ROLLBACK, None, False)]
    assert (plan.status["phase"], plan.status["reason"]) == ("RolledBack", "ShardFailed")
    assert "shard 1 Failed" in plan.status["message"]
    ended = merged(shard("RolledBack"), shard("Failed"), shard("RolledBack"))
    assert acts(tick(AUTO, ended, {"phase": "Evaluating"})) == []


def test_shards_split_between_the_models_are_not_reported_rolled_back() -> None:
    """Shard 0 cut over while the others ended (rolled back, failed): the index serves two
    models. Reported RolledBack (with a rollback the router refuses once a shard is cut), it
    looked whole on the old model; it is Failed, naming the split, and nothing is asked."""
    for rest in (("RolledBack", "RolledBack"), ("Failed", "Backfilled")):
        rec = merged(shard("Succeeded", "CutOver"), *(shard(p, "CoordinatedCutover") for p in rest))
        assert rec.phase == "Mixed"
        plan = tick(AUTO, rec, {"phase": "CuttingOver"})
        assert acts(plan) == []
        assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "ShardsSplit")
        assert "shards 0 serve 'new'" in plan.status["message"], plan.status["message"]


def test_keeping_both_models_merged_is_refused_before_the_gate() -> None:
    """The shards refuse ``keep_merged: if_better`` in a coordinated migration: the operator
    says so instead of starting a gate Job that would fail."""
    plan = tick(migration(cutover={"keepMerged": "IfBetter"}), None)
    assert acts(plan) == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "KeepMergedUnsupported")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "NativeRegression: the new model is worse",
            ("NativeRegression", "the new model is worse"),
        ),
        (
            "shard 1 is Backfilling; shard 2 holds: X: y",
            ("CutoverRefused", "shard 1 is Backfilling; shard 2 holds: X: y"),
        ),
        ("no shard has a migration", ("CutoverRefused", "no shard has a migration")),
    ],
)
def test_a_refused_cutover_keeps_the_writers_reason_or_names_the_routers(
    message: str, expected: tuple[str, str]
) -> None:
    assert cutover_refused(message) == expected
