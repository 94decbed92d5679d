"""The ModelMigration state machine (PURE).

The runtime's migration record (in the index manifest, read from the writer's status) is the
truth about the data; the Jobs are how work is started; the CR's status is a projection of
both. One call of :func:`plan_migration` says what to do next:

    Pending -> gate Job -> (SamplingPairs, TrainingAdapter, Evaluating: the record's phases)
      -> Bridged -> backfill Job -> Backfilling -> Backfilled
      -> cutover (Auto, or Manual once approved) -> CuttingOver -> Succeeded
    a failed gate (the runtime rolled the writes back)      -> RolledBack (reason GateFailed)
    spec.rollback before Succeeded                           -> RolledBack (RollbackRequested)
    a Job that fails for good, or a missing index or model   -> Failed
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from index_operator.reconcile.conditions import Condition, merge_conditions
from index_operator.reconcile.index import Event
from index_operator.reconcile.jobs import JobState
from index_operator.spec import Migration
from index_runtime.contract import JobKind
from index_runtime.migration import ACTIVE, PHASES

TERMINAL = ("Succeeded", "Failed", "RolledBack")


class MAct(StrEnum):
    START_JOB = "StartJob"
    CUTOVER = "Cutover"
    ROLLBACK = "Rollback"


@dataclass(frozen=True)
class MAction:
    act: MAct
    job: JobKind | None = None
    force: bool = False


@dataclass(frozen=True)
class MigrationObservation:
    now: float
    record: Mapping[str, Any] | None  # the writer's migration record (None: unreachable)
    reachable: bool = True
    index_exists: bool = True
    target_exists: bool = True
    from_model: str = ""  # the model the index serves
    busy: str = ""  # another ModelMigration of the same index is active
    gate_job: JobState = JobState.MISSING
    backfill_job: JobState = JobState.MISSING
    prior: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class MigrationPlan:
    actions: tuple[MAction, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]


def _ours(mig: Migration, rec: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The record if it is this migration's (same target model)."""
    return rec if rec and rec.get("to") == mig.target else None


def _strategies(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in rec.get("strategies") or ():
        out.append(
            {
                "name": str(r["name"]),
                "value": round(float(r["metric"]["mean"]), 4),
                "gain": round(float(r["gain"]["mean"]), 4),
                "gainLower": round(float(r["gain"]["low"]), 4),
                "gainUpper": round(float(r["gain"]["high"]), 4),
                "eligible": bool(r["eligible"]),
            }
        )
    return out


def _progress(rec: Mapping[str, Any]) -> dict[str, Any]:
    bf = rec.get("backfill") or {}
    if not bf:
        return {"summary": "-"}
    share = float(bf.get("share", 0.0))
    return {
        "live": int(bf.get("live", 0)),
        "backfilled": int(bf.get("backfilled", 0)),
        "blocked": int(bf.get("blocked", 0)),
        "share": round(share, 4),
        "summary": f"{share:.0%}",
    }


def plan_migration(mig: Migration, obs: MigrationObservation) -> MigrationPlan:
    prior = dict(obs.prior or {})
    phase0 = str(prior.get("phase") or "")
    rec = _ours(mig, obs.record)
    acts: list[MAction] = []
    phase, reason, message = phase0 or "Pending", str(prior.get("reason") or ""), ""

    if phase0 in TERMINAL:
        return _finish(
            mig,
            obs,
            prior,
            phase0,
            str(prior.get("reason", "")),
            str(prior.get("message", "")),
            acts,
            rec,
        )
    if not obs.index_exists:
        return _finish(
            mig, obs, prior, "Pending", "IndexNotFound", f"no VectorIndex {mig.index!r}", acts, rec
        )
    if not obs.target_exists:
        return _finish(
            mig,
            obs,
            prior,
            "Pending",
            "ModelNotFound",
            f"no EmbeddingModel {mig.target!r}",
            acts,
            rec,
        )
    if not obs.reachable:
        return _finish(
            mig, obs, prior, phase, "RuntimeUnavailable", "the writer does not answer", acts, rec
        )
    if rec is None and obs.from_model == mig.target and phase0 in ("", "Pending"):
        msg = f"the index already serves {mig.target!r}"
        return _finish(mig, obs, prior, "Failed", "AlreadyOnTargetModel", msg, acts, rec)
    if rec is None and obs.busy:
        return _finish(
            mig,
            obs,
            prior,
            "Pending",
            "AnotherMigrationActive",
            f"{obs.busy} migrates this index",
            acts,
            rec,
        )

    rphase = str(rec.get("phase")) if rec else ""
    if mig.rollback and rphase in ACTIVE:
        acts.append(MAction(MAct.ROLLBACK))
        return _finish(
            mig, obs, prior, "RolledBack", "RollbackRequested", "spec.rollback is set", acts, rec
        )
    if mig.rollback and not rec:
        return _finish(
            mig,
            obs,
            prior,
            "RolledBack",
            "RollbackRequested",
            "rolled back before the gate ran",
            acts,
            rec,
        )

    if rec is None:
        if obs.gate_job is JobState.MISSING:
            acts.append(MAction(MAct.START_JOB, JobKind.MIGRATE))
            phase, reason, message = "Pending", "GateJobCreated", "the gate Job was created"
        elif obs.gate_job is JobState.FAILED:
            return _finish(
                mig,
                obs,
                prior,
                "Failed",
                "GateJobFailed",
                "the gate Job failed; see its logs",
                acts,
                rec,
            )
        else:
            phase, reason, message = "Pending", "GateJobStarting", "waiting for the gate Job"
    elif rphase == "Failed":
        phase, reason, message = "RolledBack", "GateFailed", str(rec.get("reason", ""))
    elif rphase == "RolledBack":
        phase, reason, message = "RolledBack", "RolledBack", str(rec.get("reason", "rolled back"))
    elif rphase == "Succeeded":
        phase, reason, message = "Succeeded", "CutOver", f"the index serves {mig.target!r}"
    elif rphase == "Bridged":
        phase, reason = "Bridged", "GatePassed"
        message = f"serving new-model queries with {rec.get('selected')}; starting the backfill"
        if obs.backfill_job is JobState.MISSING:
            acts.append(MAction(MAct.START_JOB, JobKind.BACKFILL))
    elif rphase in ("Backfilling", "Backfilled"):
        phase, reason, message = rphase, rphase, f"{_progress(rec)['summary']} of rows re-encoded"
        if obs.backfill_job is JobState.FAILED:
            return _finish(
                mig,
                obs,
                prior,
                "Failed",
                "BackfillJobFailed",
                "the backfill Job failed; see its logs",
                acts,
                rec,
            )
        held = (rec.get("cutover") or {}).get("reason", "")
        if rphase == "Backfilled":
            go = mig.cutover_policy == "Auto" or mig.cutover_approved
            if go:
                acts.append(MAction(MAct.CUTOVER, force=mig.cutover_force))
                phase, reason, message = (
                    "CuttingOver",
                    "CutoverRequested",
                    "every row has a new vector",
                )
            else:
                reason, message = "AwaitingApproval", "set spec.cutover.approved to cut over"
            if held and held != "AwaitingCutover":
                reason, message = str(held), str((rec.get("cutover") or {}).get("message", ""))
        elif obs.backfill_job is JobState.MISSING and phase0 not in ("Backfilling",):
            acts.append(MAction(MAct.START_JOB, JobKind.BACKFILL))
    elif rphase in PHASES:
        phase, reason, message = (
            rphase,
            "GateRunning",
            str((rec.get("job") or {}).get("message", "")),
        )
    return _finish(mig, obs, prior, phase, reason, message, acts, rec)


def _finish(
    mig: Migration,
    obs: MigrationObservation,
    prior: Mapping[str, Any],
    phase: str,
    reason: str,
    message: str,
    acts: list[MAction],
    rec: Mapping[str, Any] | None,
) -> MigrationPlan:
    g = mig.ref.generation
    held = str(((rec or {}).get("cutover") or {}).get("reason", ""))
    conds = [
        Condition("Ready", phase == "Succeeded", reason or phase, message),
        Condition(
            "Progressing",
            phase not in (*TERMINAL, "Pending") or reason == "GateJobCreated",
            reason or phase,
            message,
        ),
        Condition(
            "Bridged",
            phase in ("Bridged", "Backfilling", "Backfilled", "CuttingOver"),
            reason or phase,
            message,
        ),
        Condition(
            "Failed",
            phase == "Failed",
            reason if phase == "Failed" else "AsExpected",
            message if phase == "Failed" else "",
        ),
    ]
    if phase == "Backfilled" or held:
        holding = phase == "Backfilled" and reason not in ("Backfilled",)
        conds.append(
            Condition(
                "CutoverHeld", holding, reason if holding else "NotHeld", message if holding else ""
            )
        )
    status: dict[str, Any] = {
        **{k: v for k, v in prior.items() if k != "conditions"},
        "observedGeneration": g,
        "phase": phase,
        "reason": reason,
        "message": message,
        "conditions": merge_conditions(prior.get("conditions"), conds, g, obs.now),
    }
    if obs.from_model and "fromModel" not in status:
        status["fromModel"] = obs.from_model
    if rec:
        status.update(
            {
                "strategy": str(rec.get("selected") or ""),
                "metric": str(rec.get("metric") or ""),
                "textCoverage": round(float(rec.get("text_coverage") or 0.0), 4),
                "strategies": _strategies(rec),
                "progress": _progress(rec),
            }
        )
    events: tuple[Event, ...] = ()
    if prior.get("phase") != phase:
        kind = "Warning" if phase in ("Failed", "RolledBack") else "Normal"
        events = (
            Event(kind, reason or phase, f"{prior.get('phase') or 'New'} -> {phase}: {message}"),
        )
    return MigrationPlan(tuple(acts), status, events)
