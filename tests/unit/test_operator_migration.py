"""The operator's side of a migration, pass by pass: records matched by id, Jobs that fail
without failing a migration that progresses, Stalled and Paused, events on transitions only,
the backfill's Indexed Job, and maintenance held only around the cutover."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from index_operator import resources as res
from index_operator.reconcile.index import maintenance_held
from index_operator.reconcile.jobs import JobState
from index_operator.reconcile.migration import (
    MAct,
    MigrationObservation,
    MigrationPlan,
    plan_migration,
)
from index_operator.spec import Index, Migration, Model
from index_runtime.contract import Env, JobKind, MigrationRecord

IX = Index.parse(
    {
        "kind": "VectorIndex",
        "metadata": {"name": "docs", "namespace": "s", "uid": "u"},
        "spec": {"modelRef": {"name": "old"}, "storage": {"bucket": "bkt"}},
    }
)
STALL = 600


def migration(uid: str = "m-2", **spec: Any) -> Migration:
    return Migration.parse(
        {
            "kind": "ModelMigration",
            "metadata": {
                "name": "mm",
                "namespace": "s",
                "uid": uid,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {
                "indexRef": {"name": "docs"},
                "targetModelRef": {"name": "new"},
                "backfill": {"stallSeconds": STALL},
                **spec,
            },
        }
    )


MIG = migration()


def record(phase: str, id: str = "m-2", **kw: Any) -> MigrationRecord:
    rec = MigrationRecord.from_json({"id": id, "from": "old", "to": "new", "phase": phase, **kw})
    assert rec is not None
    return rec


def backfilling(rows: int, updated_at: float = 0.0) -> MigrationRecord:
    bf = {"live": 1000, "backfilled": rows, "share": rows / 1000, "updated_at": updated_at}
    return record("Backfilling", backfill=bf, updated_at=updated_at)


def tick(
    mig: Migration,
    now: float,
    rec: MigrationRecord | None,
    prior: dict[str, Any] | None,
    **kw: Any,
) -> MigrationPlan:
    return plan_migration(
        mig,
        MigrationObservation(now=now, record=rec, from_model="old", prior=prior, **kw),
    )


def cond(plan: MigrationPlan, type_: str) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


@pytest.mark.parametrize(
    "earlier",
    [
        record("RolledBack", id="m-1", reason="rollback requested"),
        record("Failed", id="m-1", reason="no live rows have text"),
        # written by the previous release (no id), before this ModelMigration existed
        record("RolledBack", id="", started_at=1767225000.0),
    ],
    ids=["rolled-back", "failed", "rolled-back-without-id"],
)
def test_a_migration_after_a_rolled_back_or_failed_one_to_the_same_model_starts(
    earlier: MigrationRecord,
) -> None:
    """The record of an earlier migration to the same model is not this one's (matched by
    id): the first pass creates the gate Job instead of reporting RolledBack."""
    plan = tick(MIG, 1.0, earlier, None)
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "GateJobCreated")
    assert [(a.act, a.job) for a in plan.actions] == [(MAct.START_JOB, JobKind.MIGRATE)]
    # the runtime starts it afresh under this id: from then on the record is ours
    ours = tick(MIG, 2.0, record("SamplingPairs"), plan.status, gate_job=JobState.ACTIVE)
    assert ours.status["phase"] == "SamplingPairs"


def test_a_record_without_id_started_after_the_migration_was_created_is_its_own() -> None:
    """An operator upgraded in the middle of a migration the previous release started."""
    rec = record("Backfilled", id="", started_at=1767225700.0)
    assert tick(MIG, 1.0, rec, {"phase": "Backfilling"}).status["phase"] == "CuttingOver"


def test_an_active_record_of_another_migration_is_waited_for() -> None:
    plan = tick(MIG, 1.0, record("Backfilling", id="m-1"), None)
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "AnotherMigrationActive")
    assert plan.actions == ()


@pytest.mark.parametrize(("metric", "dim"), [("cosine", 384), ("ip", 768), ("l2", 64)])
def test_the_gate_request_carries_id_target_space_and_an_external_backfill(
    metric: str, dim: int
) -> None:
    mig = migration(backfill={"parallelism": 8})
    job = res.desired_gate_job(IX, mig, res.Cluster(), Model("new", dim, metric, "x"))
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    spec = json.loads(next(e["value"] for e in env if e["name"] == Env.JOB_SPEC))
    assert {k: spec[k] for k in ("id", "metric", "dim", "backfill_mode", "backfill_shares")} == {
        "id": "m-2",
        "metric": metric,
        "dim": dim,
        "backfill_mode": "external",
        "backfill_shares": 8,
    }


def test_a_failed_gate_job_after_the_record_exists_is_reported_not_failed() -> None:
    """The writer resumes the gate from its record: the operator says the Job failed and
    leaves the migration to it; past the stall limit without a commit it shows Stalled."""
    rec = record("TrainingAdapter", updated_at=100.0)
    prior = tick(MIG, 10.0, rec, None, gate_job=JobState.ACTIVE).status
    plan = tick(MIG, 20.0, rec, prior, gate_job=JobState.FAILED)
    assert plan.status["phase"] == "TrainingAdapter" and plan.actions == ()
    failed = cond(plan, "JobFailed")
    assert failed["status"] == "True" and "gate Job failed" in failed["message"]
    assert plan.status["message"] == failed["message"]
    assert cond(plan, "Failed")["status"] == "False"
    assert [e.type for e in plan.events] == ["Warning"]
    later = tick(MIG, 10.0 + STALL, rec, plan.status, gate_job=JobState.FAILED)
    assert cond(later, "Stalled")["status"] == "True" and later.status["phase"] != "Failed"
    assert later.events and all(e.reason != "GateJobFailed" for e in later.events)


def test_a_backfill_job_that_fails_is_replaced_never_failed_and_stalls_are_shown() -> None:
    """A walk over passes: Job 0 fails after progress -> Job 1 at once; Job 1 fails without
    progress -> Stalled after stallSeconds and Job 2 no earlier than stallSeconds after Job 1
    was created; the migration is never Failed."""
    created: list[int] = []
    jobs: dict[int, JobState] = {}
    status: dict[str, Any] | None = None
    phases: set[str] = set()

    def run(now: float, rec: MigrationRecord, state: Callable[[int], JobState]) -> MigrationPlan:
        nonlocal status
        seq = int(((status or {}).get("backfillJob") or {}).get("seq", 0))
        plan = tick(MIG, now, rec, status, backfill_job=state(seq))
        for a in plan.actions:
            assert a.act is MAct.START_JOB and a.job is JobKind.BACKFILL
            created.append(a.seq)
            jobs[a.seq] = JobState.ACTIVE
        status = plan.status
        phases.add(status["phase"])
        return plan

    def state(seq: int) -> JobState:
        return jobs.get(seq, JobState.MISSING)

    run(0.0, record("Bridged"), state)
    assert created == [0]
    for i in range(1, 5):
        run(i * 10.0, backfilling(i * 100), state)
    jobs[0] = JobState.FAILED
    run(60.0, backfilling(450), state)
    assert created == [0, 1]  # progressed since Job 0 started: replaced at once
    jobs[1] = JobState.FAILED
    plan = run(70.0, backfilling(450), state)
    assert created == [0, 1] and cond(plan, "Stalled")["status"] == "False"
    assert cond(plan, "JobFailed")["status"] == "True"
    plan = run(60.0 + STALL - 1, backfilling(450), state)
    assert cond(plan, "Stalled")["status"] == "False" and created == [0, 1]
    plan = run(60.0 + STALL, backfilling(450), state)  # no progress since Job 1 was created
    assert cond(plan, "Stalled")["status"] == "True" and plan.status["phase"] == "Backfilling"
    assert created == [0, 1, 2] and res.backfill_job_name(MIG, 2) == "mm-backfill-2"
    run(61.0 + STALL, backfilling(450), state)  # Job 2 runs: nothing more
    assert created == [0, 1, 2]
    plan = run(70.0 + STALL, backfilling(460), state)  # progress again
    assert cond(plan, "Stalled")["status"] == "False"
    assert "Failed" not in phases and cond(plan, "Failed")["status"] == "False"


def test_a_bridged_migration_waiting_for_a_backfill_request_gets_one_and_its_job() -> None:
    """The gate Job starts the migration without a backfill (the operator drives it): while
    the record is Bridged and waits, the operator asks the writer to go on."""
    rec = record("Bridged", options={"backfill": False})
    plan = tick(MIG, 1.0, rec, {"phase": "Evaluating"})
    assert [a.act for a in plan.actions] == [MAct.RESUME, MAct.START_JOB]
    going = tick(MIG, 2.0, record("Bridged"), plan.status, backfill_job=JobState.ACTIVE)
    assert going.actions == ()


def test_events_only_on_transitions() -> None:
    """Ten passes in one phase post one event; a paused record one Paused warning; a cutover
    the runtime holds under policy Auto is requested once, not on every pass."""
    status: dict[str, Any] | None = None
    events, cutovers = [], 0
    recs = [backfilling(100 + i) for i in range(10)]
    paused = {"reason": "EncoderFailed", "message": "the encoder says 404", "at": 1.0}
    recs += [record("Backfilling", paused=paused)] * 10
    recs += [record("Backfilled")]
    held = {"reason": "NativeWorse", "message": "the new model measured worse"}
    recs += [record("Backfilled", cutover=held)] * 10
    for i, rec in enumerate(recs):
        plan = tick(MIG, float(i), rec, status, backfill_job=JobState.ACTIVE)
        status = plan.status
        events += [(status["phase"], e.reason) for e in plan.events]
        cutovers += sum(a.act is MAct.CUTOVER for a in plan.actions)
        if rec.paused is not None:
            p = cond(plan, "Paused")
            assert (p["status"], p["reason"], p["message"]) == (
                "True",
                "EncoderFailed",
                "the encoder says 404",
            )
            assert cond(plan, "Progressing")["status"] == "False"
    assert events == [
        ("Backfilling", "Backfilling"),
        ("Backfilling", "EncoderFailed"),
        ("CuttingOver", "CutoverRequested"),
        ("Backfilled", "NativeWorse"),
    ]
    assert cutovers == 1
    assert cond(plan, "CutoverHeld")["reason"] == "NativeWorse"


kv = pytest.importorskip("kubernetes_validate")


def test_the_backfill_is_an_indexed_job_of_parallelism_pods_without_a_deadline() -> None:
    gpu = {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"nvidia.com/gpu": 1}}
    mig = migration(backfill={"parallelism": 4, "stallSeconds": 900, "resources": gpu})
    target = Model("new", 384, "cosine", "all-MiniLM-L6-v2")  # a bundled model
    job = res.desired_backfill_job(IX, mig, res.Cluster(), 3, target)
    kv.validate(job, kv.latest_version(), strict=True)
    spec = job["spec"]
    assert job["metadata"]["name"] == "mm-backfill-3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert "activeDeadlineSeconds" not in spec and spec["backoffLimitPerIndex"] >= 1
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and c["image"] == res.Cluster().jobs_image
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (env[Env.BACKFILL_SHARES], env[Env.MIGRATION_ID], env[Env.BACKFILL_STALL_S]) == (
        "4",
        "m-2",
        "900",
    )
    assert Env.ENCODERS in env  # from the index's ConfigMap: the worker encodes itself
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env[Env.OMP_THREADS] == "2"  # from the default CPU limit the GPU spec kept
    assert c["resources"]["requests"]["cpu"]  # a GPU alone keeps the default CPU request
    http = Model("new", 384, "cosine", "http://enc.ml.svc:8000/v1#m")
    assert res.desired_backfill_job(IX, mig, res.Cluster(), 0, http)["spec"]["template"][
        "spec"
    ]["containers"][0]["image"] == res.Cluster().runtime_image


@pytest.mark.parametrize(
    ("phase", "held"),
    [
        ("", False),
        ("SamplingPairs", False),
        ("Bridged", False),
        ("Backfilling", False),
        ("Backfilled", True),
        ("CuttingOver", True),
    ],
)
def test_maintenance_waits_only_around_the_cutover_the_cronjob_too(phase: str, held: bool) -> None:
    assert bool(maintenance_held(phase)) is held
    cron = res.desired_compaction_cronjob(IX, res.Cluster(), suspend=bool(maintenance_held(phase)))
    kv.validate(cron, kv.latest_version(), strict=True)
    assert cron["spec"]["suspend"] is held


def test_a_rollback_asked_while_the_gate_job_starts_rolls_back_what_it_starts() -> None:
    """spec.rollback set after the gate Job was created but before the writer has a record:
    the CR must not end RolledBack while the Job can still start the migration (it would run
    on the writer, dual-writing, with nobody to roll it back)."""
    prior = tick(MIG, 1.0, None, None).status  # the gate Job was created
    asked = migration(rollback=True)
    plan = tick(asked, 2.0, None, prior, gate_job=JobState.ACTIVE)
    assert plan.status["phase"] not in ("RolledBack", "Succeeded", "Failed"), plan.status
    later = tick(asked, 3.0, record("SamplingPairs"), plan.status, gate_job=JobState.ACTIVE)
    assert [a.act for a in later.actions] == [MAct.ROLLBACK]
    assert later.status["phase"] == "RolledBack"
    # the Job ended without starting anything: nothing to roll back
    ended = tick(asked, 4.0, None, plan.status, gate_job=JobState.FAILED)
    assert ended.status["phase"] == "RolledBack" and not ended.actions


def test_a_migration_that_kept_both_models_is_ready_and_shows_the_cost_and_the_flips() -> None:
    """cutover.keepMerged IfBetter travels to the runtime's request; a record that ended
    kept merged is Succeeded (Ready, reason KeptMerged) with status.merged and status.guard."""
    mig = migration(cutover={"keepMerged": "IfBetter"})
    assert mig.gate_request()["keep_merged"] == "if_better"
    assert MIG.gate_request()["keep_merged"] == "never"
    cut = {
        "reason": "KeptMerged",
        "message": "both kept",
        "merged": True,
        "merge_vs_native": {"mean": 0.031, "low": 0.012, "high": 0.05},
        "cost": {"stored_vector_bytes": 1536000, "rows": 1000, "dim": 384, "encoders_per_query": 2},
    }
    guard = {"serves": True, "flips": 1, "checkpoints": 9}
    plan = tick(mig, 5.0, record("Succeeded", cutover=cut, guard=guard), {"phase": "CuttingOver"})
    st = plan.status
    assert st["phase"] == "Succeeded" and cond(plan, "Ready")["status"] == "True"
    assert st["reason"] == "KeptMerged"
    assert st["merged"] == {
        "models": ["old", "new"],
        "gain": 0.031,
        "gainLower": 0.012,
        "storedVectorBytes": 1536000,
        "encodersPerQuery": 2,
    }
    assert st["guard"] == {"serves": True, "flips": 1, "checkpoints": 9}
    # a plain cutover has no status.merged; an earlier release's record shows no flips
    plain = tick(MIG, 5.0, record("Succeeded", cutover={"reason": "CutOver"}), None).status
    assert "merged" not in plain and plain["guard"]["flips"] == 0
