"""One VectorIndex: observed runtime + Jobs -> lifecycle decision -> actions and status (PURE).

The writer's status holds what only the writer knows (rows, codebooks, training, failures);
the shadow's holds the overlap windows (the oracle runs there). :func:`observed` combines
them into the lifecycle's input, :func:`plan_index` calls ``index_runtime.lifecycle.decide``
and turns the decision into actions the handlers carry out through the admin API and Jobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from index_operator.reconcile.conditions import Condition, condition, merge_conditions, rfc3339
from index_operator.reconcile.jobs import JobState
from index_operator.spec import Index
from index_runtime import lifecycle
from index_runtime.contract import JobKind
from index_runtime.quality.window import WindowStats


class Act(StrEnum):
    CREATE_INDEX = "CreateIndex"  # POST /v1/indexes on the writer
    UPDATE_SETTINGS = "UpdateSettings"  # PUT admin/settings
    PROMOTE = "Promote"
    DISCARD = "Discard"
    START_JOB = "StartJob"


@dataclass(frozen=True)
class Action:
    act: Act
    job: JobKind | None = None
    seq: int = 0  # the Job's sequence number (its name is derived from it)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class IndexObservation:
    now: float
    writer: Mapping[str, Any] | None  # the writer's status document; None = unreachable
    exists: bool = True  # False: the writer answers but has no such index yet
    shadow: Mapping[str, Any] | None = None  # the shadow's status document
    jobs: Mapping[str, JobState] = field(default_factory=dict)  # job kind -> state of the last
    prior: Mapping[str, Any] = field(default_factory=dict)  # the CR's current status
    migrating: str = ""  # the ModelMigration that owns the index's model right now
    migration_phase: str = ""  # the phase of the writer's migration record ('' = none)


@dataclass(frozen=True)
class IndexPlan:
    actions: tuple[Action, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]


def _window(d: Mapping[str, Any] | None) -> WindowStats:
    if not d:
        return WindowStats.empty()
    mean = d.get("mean")
    return WindowStats(
        int(d["count"]),
        math.nan if mean is None else float(mean),
        float(d["lower"]),
        float(d["upper"]),
    )


def observed(writer: Mapping[str, Any], shadow: Mapping[str, Any] | None) -> lifecycle.Observed:
    """The lifecycle's input: the writer's view, with the windows (and whether the candidate's
    index files are loaded for validation) taken from the shadow, where the oracle runs."""
    o = dict(writer["observed"])
    base = lifecycle.Observed(
        now=float(o["now"]),
        live_rows=int(o["live_rows"]),
        serving=int(o["serving"]),
        serving_trained_rows=int(o["serving_trained_rows"]),
        candidate=int(o["candidate"]),
        candidate_ready=bool(o["candidate_ready"]),
        training=bool(o["training"]),
        failures=int(o["failures"]),
        last_failure_at=float(o["last_failure_at"]),
        compaction_due=False,  # the operator decides compaction (thresholds + schedule)
    )
    src = shadow if shadow is not None else writer
    so = dict(src["observed"])
    return replace(
        base,
        serving_window=_window(so["serving_window"])
        if so["serving"] == base.serving
        else WindowStats.empty(),
        candidate_window=_window(so["candidate_window"])
        if so["candidate"] == base.candidate
        else WindowStats.empty(),
        candidate_ready=base.candidate_ready and bool(so["candidate_ready"]),
    )


def thresholds(writer: Mapping[str, Any]) -> lifecycle.Thresholds:
    return lifecycle.Thresholds(**dict(writer["thresholds"]))


def compaction_needed(ix: Index, writer: Mapping[str, Any]) -> str:
    """Why a compaction should run now ('' = it should not): the deleted share or the number
    of segments over the VectorIndex's thresholds (the CronJob covers the schedule)."""
    c = writer["counts"]
    if c["segments"] > 1 and c["deleted_ratio"] >= ix.compaction_deleted_ratio:
        return f"deleted ratio {c['deleted_ratio']:.2f} >= {ix.compaction_deleted_ratio}"
    if c["segments"] > ix.compaction_max_segments:
        return f"{c['segments']} segments > {ix.compaction_max_segments}"
    return ""


# Training and compaction of the served model go on during a migration (gate, bridged serving
# and a backfill that can take days) except in this window, where the cutover switches the
# served model: a codebook trained on the old model across it is never served, and a
# compaction racing the cutover's commit only conflicts with it.
CUTOVER_WINDOW = ("Backfilled", "CuttingOver")


def maintenance_held(migration_phase: str) -> str:
    """Why the operator starts no training or compaction now ('' = it may): only while the
    migration's cutover is near. Elsewhere both are safe with the backfill running: the
    backfill's compare-and-set matches a row by its seq, which compaction keeps, and the
    objects an active record names are referenced (GC keeps them)."""
    if migration_phase in CUTOVER_WINDOW:
        return f"the migration is {migration_phase}: maintenance waits for the cutover"
    return ""


def _seq(prior: Mapping[str, Any], kind: JobKind) -> int:
    return int(((prior.get("jobs") or {}).get(kind.value) or {}).get("seq", 0))


def _overlap(writer: Mapping[str, Any], shadow: Mapping[str, Any] | None) -> dict[str, Any]:
    windows = (shadow or writer).get("windows") or {}
    which = "candidate" if windows.get("candidate") else "serving"
    w = windows.get(which)
    if not w or not w.get("count"):
        return {"window": which, "samples": 0, "summary": "-"}
    mean, lo, hi = float(w["mean"]), float(w["lower"]), float(w["upper"])
    return {
        "window": which,
        "mean": round(mean, 4),
        "lower": round(lo, 4),
        "upper": round(hi, 4),
        "samples": int(w["count"]),
        "summary": f"{mean:.3f} [{lo:.3f}, {hi:.3f}]",
    }


def _unavailable(ix: Index, obs: IndexObservation, reason: str, message: str) -> IndexPlan:
    acts = (Action(Act.CREATE_INDEX),) if obs.writer is not None and not obs.exists else ()
    conds = [Condition("Ready", False, reason, message)]
    status = {
        **{k: v for k, v in obs.prior.items() if k not in ("conditions",)},
        "observedGeneration": ix.ref.generation,
        "phase": "Pending",
        "reason": reason,
        "message": message,
        "conditions": merge_conditions(
            obs.prior.get("conditions"), conds, ix.ref.generation, obs.now
        ),
    }
    return IndexPlan(acts, status, _transition(obs.prior, "Pending", reason, message))


def _transition(
    prior: Mapping[str, Any], phase: str, reason: str, message: str
) -> tuple[Event, ...]:
    if prior.get("phase") == phase:
        return ()
    kind = "Warning" if phase in ("Degraded", "Pending") and prior.get("phase") else "Normal"
    return (Event(kind, reason, f"{prior.get('phase') or 'New'} -> {phase}: {message}"),)


def plan_index(ix: Index, obs: IndexObservation, desired_settings: Mapping[str, Any]) -> IndexPlan:
    """Everything one reconcile of a VectorIndex should do, from what was observed.

    ``desired_settings`` is the spec's settings as the runtime normalizes them (so equality
    means "already applied")."""
    if obs.writer is None:
        return _unavailable(ix, obs, "RuntimeUnavailable", "the writer does not answer yet")
    if not obs.exists:
        return _unavailable(
            ix, obs, "CreatingIndex", "the writer has no such index yet; creating it"
        )
    w = obs.writer
    th = thresholds(w)
    decision = lifecycle.decide(observed(w, obs.shadow), th)

    actions: list[Action] = []
    events: list[Event] = []
    jobs = {k: dict(v) for k, v in (obs.prior.get("jobs") or {}).items()}
    held = maintenance_held(obs.migration_phase)

    def job_busy(kind: JobKind) -> bool:
        """A Job of this kind runs, or the last one failed less than the backoff ago."""
        if obs.jobs.get(kind.value) == JobState.ACTIVE:
            return True
        last = jobs.get(kind.value) or {}
        failed_at = float(last.get("failedAt", 0))
        return last.get("state") == JobState.FAILED.value and obs.now < failed_at + max(
            th.backoff_s, 1.0
        )

    for kind in (JobKind.TRAIN, JobKind.COMPACT):  # record how the last Job ended
        state = obs.jobs.get(kind.value)
        if (
            kind.value in jobs
            and state is not None
            and jobs[kind.value].get("state") != state.value
        ):
            jobs[kind.value]["state"] = state.value
            if state is JobState.FAILED:
                jobs[kind.value]["failedAt"] = obs.now
                events.append(
                    Event("Warning", "JobFailed", f"{jobs[kind.value].get('name')} failed")
                )

    if w.get("settings") != desired_settings:
        actions.append(Action(Act.UPDATE_SETTINGS))
    for a in decision.actions:
        if a is lifecycle.Action.PROMOTE:
            actions.append(Action(Act.PROMOTE))
            events.append(Event("Normal", "Promoted", decision.message))
        elif a is lifecycle.Action.DISCARD:
            actions.append(Action(Act.DISCARD))
            events.append(Event("Warning", "CandidateRejected", decision.message))
        elif a is lifecycle.Action.TRAIN and not job_busy(JobKind.TRAIN) and not held:
            actions.append(Action(Act.START_JOB, JobKind.TRAIN, _seq(obs.prior, JobKind.TRAIN) + 1))
    why = compaction_needed(ix, w)
    if why and not job_busy(JobKind.COMPACT) and not held:
        actions.append(Action(Act.START_JOB, JobKind.COMPACT, _seq(obs.prior, JobKind.COMPACT) + 1))
        events.append(Event("Normal", "CompactionStarted", why))

    phase, reason, message = decision.phase.value, decision.reason, decision.message
    if obs.jobs.get(JobKind.TRAIN.value) == JobState.ACTIVE and phase in (
        "ColdStart",
        "Training",
        "Serving",
        "Degraded",
    ):
        phase = "Retraining" if w["serving"]["codebook"] else "Training"
        reason, message = "TrainingJobRunning", "a training Job runs"
    served = str(w.get("model", ""))
    conds = [
        Condition("Ready", True, phase, f"queries are answered by the {w['serving']['path']}"),
        Condition(
            "Progressing",
            phase in ("Training", "Validating", "Retraining"),
            reason,
            message,
        ),
        Condition(
            "Degraded",
            phase == "Degraded",
            reason if phase == "Degraded" else "AsExpected",
            message,
        ),
    ]
    if served and served != ix.model and not obs.migrating:
        conds.append(
            Condition(
                "ModelReferenceOutdated",
                True,
                "MigratedToAnotherModel",
                f"the index serves model {served!r}; set spec.modelRef.name to it",
            )
        )
    elif condition(obs.prior.get("conditions"), "ModelReferenceOutdated"):
        conds.append(
            Condition("ModelReferenceOutdated", False, "UpToDate", "spec.modelRef is served")
        )
    counts = w["counts"]
    events.extend(_transition(obs.prior, phase, reason, message))
    status = {
        "observedGeneration": ix.ref.generation,
        "phase": phase,
        "reason": reason,
        "message": message,
        "servingIndex": w["serving"]["path"],
        "codebookVersion": int(w["serving"]["codebook"]),
        "model": served,
        "overlap": _overlap(w, obs.shadow),
        "counts": {
            "vectors": int(counts["live"]),
            "segments": int(counts["segments"]),
            "tombstones": int(counts["tombstones"]),
            "deletedRatio": round(float(counts["deleted_ratio"]), 4),
        },
        "migration": obs.migrating,
        "jobs": jobs,
        "conditions": merge_conditions(
            obs.prior.get("conditions"), conds, ix.ref.generation, obs.now
        ),
    }
    last = float((w.get("compaction") or {}).get("last_success_at") or 0)
    if last > 0:
        status["lastCompaction"] = rfc3339(last)
    return IndexPlan(tuple(actions), status, tuple(events))
