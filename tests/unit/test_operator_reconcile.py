"""Reconcile decisions, table-driven: the index lifecycle as the operator sees it, the
ModelMigration state machine, Job states, conditions; and the runtime/operator contract."""

from __future__ import annotations

from typing import Any

import pytest

from index_operator.reconcile.conditions import Condition, merge_conditions
from index_operator.reconcile.index import Act, IndexObservation, plan_index
from index_operator.reconcile.jobs import JobState, job_state
from index_operator.reconcile.migration import MAct, MigrationObservation, plan_migration
from index_operator.spec import Index, Migration
from index_runtime import contract
from index_runtime.contract import JobKind, MigrationRecord

IX = Index.parse(
    {
        "kind": "VectorIndex",
        "metadata": {"name": "docs", "namespace": "s", "uid": "u", "generation": 2},
        "spec": {
            "modelRef": {"name": "old"},
            "storage": {"bucket": "bkt"},
            "compaction": {"deletedRatio": 0.3},
        },
    }
)
SETTINGS = {"primary": {"nlist": "auto"}}


def window(
    count: int = 0, mean: float | None = None, lo: float = 0.0, hi: float = 1.0
) -> dict[str, Any]:
    return {"count": count, "mean": mean, "lower": lo, "upper": hi}


def writer(
    live: int = 100,
    serving: int = 0,
    candidate: int = 0,
    ready: bool = False,
    training: bool = False,
    deleted: float = 0.0,
    segments: int = 3,
    model: str = "old",
) -> dict[str, Any]:
    return {
        "model": model,
        "settings": SETTINGS,
        "serving": {"path": "primary" if serving else "shadow", "codebook": serving},
        "counts": {"live": live, "segments": segments, "tombstones": 0, "deleted_ratio": deleted},
        "windows": {},
        "compaction": {"last_success_at": 0},
        "observed": {
            "now": 1000.0,
            "live_rows": live,
            "serving": serving,
            "serving_trained_rows": 500 if serving else 0,
            "serving_window": window(),
            "candidate": candidate,
            "candidate_ready": ready,
            "candidate_window": window(),
            "training": training,
            "failures": 0,
            "last_failure_at": 0.0,
            "compaction_due": False,
        },
        "thresholds": {
            "tau": 500,
            "theta": 0.9,
            "delta": 0.05,
            "min_samples": 50,
            "growth_factor": 4.0,
            "backoff_s": 30.0,
            "backoff_max_s": 900.0,
        },
    }


def shadow_with(w: dict[str, Any], key: str, win: dict[str, Any]) -> dict[str, Any]:
    s = {**w, "observed": {**w["observed"], key: win}}
    s["windows"] = {"candidate" if "candidate" in key else "serving": win}
    return s


def obs(
    w: dict[str, Any] | None, shadow: dict[str, Any] | None = None, **kw: Any
) -> IndexObservation:
    return IndexObservation(now=1000.0, writer=w, shadow=shadow, **kw)


CAND = writer(live=800, candidate=1, ready=True)
SERV = writer(live=800, serving=1)
INDEX_TABLE = [
    ("writer down", obs(None), "Pending", "RuntimeUnavailable", []),
    ("no index yet", obs({}, exists=False), "Pending", "CreatingIndex", [Act.CREATE_INDEX]),
    ("cold start", obs(writer(live=100)), "ColdStart", "CollectingRows", []),
    ("enough rows: train Job", obs(writer(live=800)), "Training", "EnoughRows", [Act.START_JOB]),
    (
        "train Job running",
        obs(
            writer(live=800),
            jobs={"train": JobState.ACTIVE},
            prior={"jobs": {"train": {"seq": 1, "name": "docs-train-1"}}},
        ),
        "Training",
        "TrainingJobRunning",
        [],
    ),
    (
        "validating",
        obs(CAND, shadow_with(CAND, "candidate_window", window(20, 0.95, 0.8, 1.0))),
        "Validating",
        "Validating",
        [],
    ),
    (
        "validated: promote",
        obs(CAND, shadow_with(CAND, "candidate_window", window(60, 0.97, 0.93, 1.0))),
        "Validating",
        "Validated",
        [Act.PROMOTE],
    ),
    (
        "rejected: discard",
        obs(CAND, shadow_with(CAND, "candidate_window", window(60, 0.5, 0.4, 0.6))),
        "Validating",
        "CandidateRejected",
        [Act.DISCARD],
    ),
    (
        "serving",
        obs(SERV, shadow_with(SERV, "serving_window", window(60, 0.95, 0.92, 0.98))),
        "Serving",
        "Serving",
        [],
    ),
    (
        "degraded: retrain",
        obs(SERV, shadow_with(SERV, "serving_window", window(60, 0.7, 0.6, 0.8))),
        "Degraded",
        "OverlapBelowThreshold",
        [Act.START_JOB],
    ),
    ("grew: retrain", obs(writer(live=2500, serving=1)), "Degraded", "DataGrew", [Act.START_JOB]),
    (
        "deleted share: compact",
        obs(writer(live=100, deleted=0.4)),
        "ColdStart",
        "CollectingRows",
        [Act.START_JOB],
    ),
    (
        "too many segments: compact",
        obs(writer(live=100, segments=80)),
        "ColdStart",
        "CollectingRows",
        [Act.START_JOB],
    ),
    (
        "retraining and compaction go on during the backfill",
        obs(writer(live=2500, serving=1, deleted=0.5), migrating="mm", migration_phase="Backfilling"),
        "Degraded",
        "DataGrew",
        [Act.START_JOB, Act.START_JOB],
    ),
    (
        "no retraining or compaction around the cutover",
        obs(writer(live=2500, serving=1, deleted=0.5), migrating="mm", migration_phase="Backfilled"),
        "Degraded",
        "DataGrew",
        [],
    ),
    (
        "settings drifted",
        obs({**writer(), "settings": {"primary": {"nlist": 64}}}),
        "ColdStart",
        "CollectingRows",
        [Act.UPDATE_SETTINGS],
    ),
    (
        "failed train Job backs off",
        obs(
            writer(live=800),
            jobs={"train": JobState.FAILED},
            prior={"jobs": {"train": {"seq": 1, "name": "docs-train-1", "state": "Active"}}},
        ),
        "Training",
        "EnoughRows",
        [],
    ),
]


@pytest.mark.parametrize(
    ("name", "o", "phase", "reason", "acts"), INDEX_TABLE, ids=[r[0] for r in INDEX_TABLE]
)
def test_index_plan(
    name: str, o: IndexObservation, phase: str, reason: str, acts: list[Act]
) -> None:
    plan = plan_index(IX, o, SETTINGS)
    assert (plan.status["phase"], plan.status["reason"]) == (phase, reason)
    assert [a.act for a in plan.actions] == acts
    assert plan.status["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in plan.status["conditions"])
    if Act.START_JOB in acts:
        job = next(a for a in plan.actions if a.act is Act.START_JOB)
        assert job.seq == 1 and job.job in (JobKind.TRAIN, JobKind.COMPACT)


def test_index_events_on_transitions_and_model_reference_condition() -> None:
    p = plan_index(IX, obs(writer(live=800), prior={"phase": "ColdStart"}), SETTINGS)
    assert [(e.type, e.reason) for e in p.events] == [
        ("Normal", "EnoughRows"),
        ("Normal", "EnoughRows"),
    ][:1] or p.events
    assert any("ColdStart -> Training" in e.message for e in p.events)
    assert plan_index(IX, obs(writer(), prior={"phase": "ColdStart"}), SETTINGS).events == ()
    moved = plan_index(IX, obs(writer(model="new")), SETTINGS).status["conditions"]
    cond = next(c for c in moved if c["type"] == "ModelReferenceOutdated")
    assert cond["status"] == "True" and "spec.modelRef.name" in cond["message"]


def migration(generation: int = 1, **spec: Any) -> Migration:
    return Migration.parse(
        {
            "kind": "ModelMigration",
            "metadata": {"name": "mm", "namespace": "s", "uid": "m", "generation": generation},
            "spec": {"indexRef": {"name": "docs"}, "targetModelRef": {"name": "new"}, **spec},
        }
    )


MIG = migration()
MANUAL = migration(2, cutover={"policy": "Manual"})
ROLLBACK = migration(2, rollback=True)


def rec(phase: str, **kw: Any) -> dict[str, Any]:
    """A record of migration ``m`` (MIG's uid) as the writer's status carries it."""
    return {"id": "m", "to": "new", "from": "old", "phase": phase, "selected": "status-quo", **kw}


def mobs(record: Any = None, **kw: Any) -> MigrationObservation:
    parsed = MigrationRecord.from_json(record)
    return MigrationObservation(now=1.0, record=parsed, from_model="old", **kw)


MIG_TABLE = [
    ("start: gate Job", MIG, mobs(), "Pending", "GateJobCreated", [MAct.START_JOB]),
    ("gate Job starting", MIG, mobs(gate_job=JobState.ACTIVE), "Pending", "GateJobStarting", []),
    (
        "gate runs",
        MIG,
        mobs(rec("TrainingAdapter"), gate_job=JobState.ACTIVE),
        "TrainingAdapter",
        "GateRunning",
        [],
    ),
    (
        "bridged: backfill Job",
        MIG,
        mobs(rec("Bridged"), gate_job=JobState.SUCCEEDED),
        "Bridged",
        "GatePassed",
        [MAct.START_JOB],
    ),
    (
        "backfilling",
        MIG,
        mobs(
            rec("Backfilling", backfill={"share": 0.4, "live": 10, "backfilled": 4}),
            backfill_job=JobState.ACTIVE,
        ),
        "Backfilling",
        "Backfilling",
        [],
    ),
    (
        "backfilled: cut over",
        MIG,
        mobs(rec("Backfilled"), backfill_job=JobState.SUCCEEDED),
        "CuttingOver",
        "CutoverRequested",
        [MAct.CUTOVER],
    ),
    (
        "manual waits",
        MANUAL,
        mobs(rec("Backfilled"), backfill_job=JobState.SUCCEEDED),
        "Backfilled",
        "AwaitingApproval",
        [],
    ),
    (
        "held by the runtime",
        MANUAL,
        mobs(rec("Backfilled", cutover={"reason": "NativeWorse", "message": "worse"})),
        "Backfilled",
        "NativeWorse",
        [],
    ),
    ("succeeded", MIG, mobs(rec("Succeeded")), "Succeeded", "CutOver", []),
    (
        "failed gate rolls back",
        MIG,
        mobs(rec("Failed", reason="no live rows have text")),
        "RolledBack",
        "GateFailed",
        [],
    ),
    (
        "rollback requested",
        ROLLBACK,
        mobs(rec("Backfilling")),
        "RolledBack",
        "RollbackRequested",
        [MAct.ROLLBACK],
    ),
    (
        "gate Job failed for good",
        MIG,
        mobs(gate_job=JobState.FAILED),
        "Failed",
        "GateJobFailed",
        [],
    ),
    (
        "a failed backfill Job is replaced, the migration goes on",
        MIG,
        mobs(
            rec("Backfilling"),
            backfill_job=JobState.FAILED,
            prior={"phase": "Backfilling", "backfillJob": {"seq": 0, "createdAt": 0.5}},
        ),
        "Backfilling",
        "Backfilling",
        [MAct.START_JOB],
    ),
    ("index missing", MIG, mobs(index_exists=False), "Pending", "IndexNotFound", []),
    ("model missing", MIG, mobs(target_exists=False), "Pending", "ModelNotFound", []),
    ("writer down", MIG, mobs(reachable=False), "Pending", "RuntimeUnavailable", []),
    (
        "already on the target",
        MIG,
        MigrationObservation(now=1.0, record=None, from_model="new"),
        "Failed",
        "AlreadyOnTargetModel",
        [],
    ),
    ("another migration first", MIG, mobs(busy="older"), "Pending", "AnotherMigrationActive", []),
    (
        "another migration's record is not ours",
        MIG,
        mobs({**rec("Succeeded"), "id": "other", "to": "third"}),
        "Pending",
        "GateJobCreated",
        [MAct.START_JOB],
    ),
]


@pytest.mark.parametrize(
    ("name", "mig", "o", "phase", "reason", "acts"), MIG_TABLE, ids=[r[0] for r in MIG_TABLE]
)
def test_migration_plan(
    name: str, mig: Migration, o: MigrationObservation, phase: str, reason: str, acts: list[MAct]
) -> None:
    plan = plan_migration(mig, o)
    assert (plan.status["phase"], plan.status["reason"]) == (phase, reason)
    assert [a.act for a in plan.actions] == acts


def test_terminal_migrations_do_nothing_more() -> None:
    done = mobs(rec("Backfilled"), prior={"phase": "Succeeded", "reason": "CutOver"})
    assert plan_migration(MIG, done).actions == ()


@pytest.mark.parametrize(
    ("job", "state"),
    [
        (None, JobState.MISSING),
        ({"spec": {}, "status": {}}, JobState.ACTIVE),
        (
            {"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}},
            JobState.SUCCEEDED,
        ),
        (
            {"spec": {}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}},
            JobState.FAILED,
        ),
        ({"spec": {"completions": 2}, "status": {"succeeded": 1}}, JobState.ACTIVE),
        ({"spec": {"completions": 2}, "status": {"succeeded": 2}}, JobState.SUCCEEDED),
    ],
)
def test_job_state(job: Any, state: JobState) -> None:
    assert job_state(job) is state


def test_conditions_keep_their_transition_time_until_the_status_changes() -> None:
    a = merge_conditions(None, [Condition("Ready", False, "Starting", "")], 1, 0.0)
    b = merge_conditions(a, [Condition("Ready", False, "StillStarting", "x")], 2, 100.0)
    c = merge_conditions(b, [Condition("Ready", True, "Serving", "")], 2, 200.0)
    assert (
        b[0]["lastTransitionTime"] == a[0]["lastTransitionTime"] and b[0]["observedGeneration"] == 2
    )
    assert c[0]["lastTransitionTime"] != a[0]["lastTransitionTime"] and c[0]["status"] == "True"


def test_contract_commands_parse_with_the_runtime_cli() -> None:
    """Both sides agree: every command the builders emit is accepted by the runtime's parser."""
    from index_runtime.cli import build_parser

    p = build_parser()
    for role in contract.Role:
        args = p.parse_args(contract.serve_command(role)[1:])
        assert (
            args.role == role.value
            and args.port == contract.HTTP_PORT
            and args.maintenance == "off"
        )
        assert args.from_env
    for kind in contract.JobKind:
        assert p.parse_args(contract.job_command(kind)[1:]).kind == kind.value
    assert (
        contract.thread_count(None) == 1
        and contract.thread_count(2500) == 2
        and contract.thread_count(500) == 1
    )


def test_contract_paths_are_served(tmp_path: Any) -> None:
    from tests.service_helpers import running_service

    with running_service(tmp_path) as c:
        for path in (contract.LIVENESS_PATH, contract.READINESS_PATH, contract.METRICS_PATH):
            assert c.get(path).status_code == 200
        c.post("/v1/indexes", json={"name": "x", "model": "m", "dim": 4})
        st = c.get(contract.STATUS_PATH.format(index="x")).json()
        assert {"observed", "thresholds", "model", "settings"} <= set(st)


def test_jobs_report_bad_configuration_with_the_contract_exit_code() -> None:
    from index_runtime.jobs import run_job

    assert run_job(JobKind.TRAIN, {}) == contract.ExitCode.INVALID
    env = {
        contract.Env.WRITER_URL: "http://127.0.0.1:9",
        contract.Env.ADMIN_TOKEN: "t",
        contract.Env.INDEX: "x",
    }
    assert (
        run_job(JobKind.TRAIN, {**env, contract.Env.JOB_SPEC: "[1]"}) == contract.ExitCode.INVALID
    )
    no_retries = {**env, contract.Env.JOB_SPEC: '{"retries": 0}'}
    assert run_job(JobKind.TRAIN, no_retries) == contract.ExitCode.FAILED  # nobody listens


def test_the_kube_client_takes_kopfs_credentials(tmp_path: Any) -> None:
    """Token, insecure, and client certificates embedded in a kubeconfig (kind, minikube)."""
    import shutil
    import ssl
    import subprocess

    kopf = pytest.importorskip("kopf")
    from index_operator.kube import Kube

    k = Kube()
    k.configure(kopf.ConnectionInfo(server="http://127.0.0.1:1/", insecure=True, token="t"))
    assert (k.server, k.token, k.ssl_context) == ("http://127.0.0.1:1", "t", False)
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-subj",
            "/CN=t",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    k.configure(
        kopf.ConnectionInfo(
            server="https://api:6443",
            ca_data=cert.read_text(),
            certificate_data=cert.read_text(),
            private_key_data=key.read_text(),
        )
    )
    assert isinstance(k.ssl_context, ssl.SSLContext)
