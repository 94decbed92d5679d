"""The ModelMigration state machine as the operator drives it (PURE).

The runtime's migration record (``contract.MigrationRecord``, in the index manifest, read
from the writer's status) is the truth about the data; the Jobs are how work is started; the
CR's status is a projection of both. One call of :func:`plan_migration` says what to do next:

    Pending -> gate Job -> (SamplingPairs, TrainingAdapter, Evaluating: the record's phases)
      -> Bridged -> backfill Indexed Job (seq 0, 1, ...) -> Backfilling -> Backfilled
      -> cutover (Auto, or Manual once approved; requested once, not while held)
      -> CuttingOver -> Succeeded
    a failed gate (the runtime rolled the writes back)      -> RolledBack (reason GateFailed)
    spec.rollback before Succeeded                           -> RolledBack (RollbackRequested)
    the gate Job fails before any record exists              -> Failed (GateJobFailed)

The record is this migration's when its ``id`` is the CR's uid (a record without id, from
the previous release, by target model while it is active). A migration that has a record is
never marked Failed by the operator: a failed gate Job is reported (JobFailed; the writer
resumes the gate from its record), a failed backfill Job is replaced by the next one (seq + 1)
at once if the record progressed since it was created, else at most once per
``stallSeconds``; no progress for ``stallSeconds`` shows the condition Stalled; a paused
record shows Paused with the runtime's reason. Events are posted on transitions only.

A sharded index (``shards > 1``) is migrated through its router: the record is the router's
merge of the shards' (``index_runtime.shard_migration.merge_records``, every shard's id, phase
and reason under ``shards``). Its backfill is internal (no Job: each shard's writer re-encodes
its rows); the cutover is asked once every shard is ready (``CoordinatedCutover``) and held by
the first shard that holds; nothing is decided before every shard has this migration's record
(StartingOnShards); shards whose migrations ended apart (the router's ``Mixed``) are rolled
back (RolledBack, ShardFailed), unless some shard was cut over (Failed, ShardsSplit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from index_operator.reconcile.conditions import Condition, condition, merge_conditions
from index_operator.reconcile.index import Event
from index_operator.reconcile.jobs import JobState
from index_operator.spec import Migration
from index_runtime.contract import JobKind, MigrationRecord
from index_runtime.machine import summary

TERMINAL = ("Succeeded", "Failed", "RolledBack")
CLOCK_SKEW_S = 5.0  # the API server's clock against the writer's (record without id only)
GATE = ("Pending", "SamplingPairs", "TrainingAdapter", "Evaluating")
BACKFILL = ("Bridged", "Backfilling")
# conditions whose rise posts a Warning event (the phase's own transitions post the others)
ALERTS = ("Stalled", "Paused", "JobFailed")
# a Backfilled record's cutover reasons that only wait for the request
READY_TO_CUT = ("", "AwaitingCutover", "CoordinatedCutover")
MIXED = "Mixed"  # a sharded index's merged record: the shards' migrations ended apart


class MAct(StrEnum):
    START_JOB = "StartJob"
    CUTOVER = "Cutover"
    ROLLBACK = "Rollback"
    RESUME = "Resume"  # the runtime waits for a backfill request (the gate ran without one)


@dataclass(frozen=True)
class MAction:
    act: MAct
    job: JobKind | None = None
    force: bool = False
    seq: int = 0  # the backfill Job's sequence number (its name is derived from it)


@dataclass(frozen=True)
class MigrationObservation:
    now: float
    record: MigrationRecord | None  # the writer's migration record (None: none or unreachable)
    reachable: bool = True
    index_exists: bool = True
    target_exists: bool = True
    from_model: str = ""  # the model the index serves
    busy: str = ""  # another ModelMigration of the same index is active
    gate_job: JobState = JobState.MISSING
    backfill_job: JobState = JobState.MISSING  # the Job of status.backfillJob.seq
    prior: Mapping[str, Any] | None = None
    shards: int = 1  # the index's spec.shards


@dataclass(frozen=True)
class MigrationPlan:
    actions: tuple[MAction, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]


def ours(mig: Migration, rec: MigrationRecord | None) -> MigrationRecord | None:
    """The record if it is this migration's: same id. A record without id (written by the
    previous release) by target model, if it started after this ModelMigration was created
    (an earlier migration's record to the same model is not this one's)."""
    if rec is None:
        return None
    if rec.id:
        return rec if rec.id == mig.uid else None
    after = rec.started_at >= mig.created_at - CLOCK_SKEW_S
    return rec if rec.to_model == mig.target and after else None


def _strategies(rec: MigrationRecord) -> list[dict[str, Any]]:
    out = []
    for r in rec.strategies:
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
        if r.get("fitted_on"):  # adapters: pairs:N, queries:M (the query log's sample)
            out[-1]["fittedOn"] = [str(x) for x in r["fitted_on"]]
    return out


def _progress(rec: MigrationRecord) -> dict[str, Any]:
    bf = rec.backfill or {}
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


def _guard_and_merged(rec: MigrationRecord) -> dict[str, Any]:
    """status.guard (flips of what serves during the backfill) and, for a migration that
    ended keeping both models, status.merged with what it measured and costs."""
    g = rec.guard_state
    out: dict[str, Any] = {
        "guard": {"serves": g.serves, "flips": g.flips, "checkpoints": g.checkpoints}
    }
    if rec.kept_merged:
        c = rec.cutover or {}
        gain, cost = c.get("merge_vs_native") or {}, c.get("cost") or {}
        out["merged"] = {
            "models": [rec.from_model, rec.to_model],
            "gain": round(float(gain.get("mean", 0.0)), 4),
            "gainLower": round(float(gain.get("low", 0.0)), 4),
            "storedVectorBytes": int(cost.get("stored_vector_bytes", 0)),
            "encodersPerQuery": int(cost.get("encoders_per_query", 2)),
        }
    return out


def progress_mark(rec: MigrationRecord) -> str:
    """What moves when the migration makes progress: in the backfill the rows re-encoded
    (overall and per worker share: a checkpoint that only refreshes ``updated_at`` is not
    progress), in the gate every commit of the record (each commits a partial result)."""
    if rec.phase in BACKFILL:
        bf = rec.backfill or {}
        workers = bf.get("workers") or {}
        rows = sum(int((w or {}).get("rows", 0)) for w in workers.values())
        return f"{rec.phase}:{bf.get('backfilled', 0)}:{bf.get('rewritten', 0)}:{rows}"
    return f"{rec.phase}:{rec.updated_at}"


@dataclass(frozen=True)
class _Tracked:
    """The operator's bookkeeping kept in the CR's status between passes."""

    mark: str
    progress_at: float  # when the operator first saw ``mark`` (its own clock)
    seq: int  # the current backfill Job's sequence number
    created_at: float  # when that Job was created (0: not yet)


def _tracked(prior: Mapping[str, Any], rec: MigrationRecord, now: float) -> _Tracked:
    p = prior.get("progress") or {}
    job = prior.get("backfillJob") or {}
    mark = progress_mark(rec)
    at = float(p.get("lastProgressAt") or 0.0)
    if p.get("mark") != mark or not at:
        at = now
    return _Tracked(mark, at, int(job.get("seq", 0)), float(job.get("createdAt") or 0.0))


def _backfill(
    mig: Migration, obs: MigrationObservation, t: _Tracked, stalled: bool
) -> tuple[MAction | None, str]:
    """Whether to (re)create the backfill Job, and a note for the message. The record's phase
    is Bridged or Backfilling (the runtime finishes the phase; the Job only re-encodes)."""
    job = JobState(obs.backfill_job)
    if job is JobState.MISSING and not t.created_at:
        return MAction(MAct.START_JOB, JobKind.BACKFILL, seq=t.seq), "starting the backfill Job"
    if job is JobState.ACTIVE:
        return None, ""
    progressed = t.progress_at > t.created_at
    retry = obs.now >= t.created_at + mig.backfill_stall_s
    nxt = MAction(MAct.START_JOB, JobKind.BACKFILL, seq=t.seq + 1)
    if job is JobState.FAILED:
        if progressed or retry:
            return nxt, f"backfill Job {t.seq} failed; started {t.seq + 1}"
        return None, f"backfill Job {t.seq} failed; retried after {mig.backfill_stall_s} s"
    # Succeeded, or gone after its TTL: the workers found nothing to do; only a stall restarts
    if stalled and retry:
        return nxt, f"no progress since backfill Job {t.seq} ended; started {t.seq + 1}"
    return None, ""


def plan_migration(mig: Migration, obs: MigrationObservation) -> MigrationPlan:
    prior = dict(obs.prior or {})
    phase0 = str(prior.get("phase") or "")
    done = _Done(mig, obs, prior)
    if phase0 in TERMINAL:
        return done(phase0, str(prior.get("reason", "")), str(prior.get("message", "")))
    if not obs.index_exists:
        return done("Pending", "IndexNotFound", f"no VectorIndex {mig.index!r}")
    if not obs.target_exists:
        return done("Pending", "ModelNotFound", f"no EmbeddingModel {mig.target!r}")
    if not obs.reachable:
        return done(phase0 or "Pending", "RuntimeUnavailable", "the writer does not answer")
    rec = ours(mig, obs.record)
    other = obs.record if rec is None and obs.record is not None else None
    if rec is None and obs.from_model == mig.target and phase0 in ("", "Pending"):
        return done("Failed", "AlreadyOnTargetModel", f"the index already serves {mig.target!r}")
    if rec is None and obs.busy:
        return done("Pending", "AnotherMigrationActive", f"{obs.busy} migrates this index")
    if rec is None and other is not None and other.active:
        msg = f"the writer runs migration {other.id or '?'} to {other.to_model!r}"
        return done("Pending", "AnotherMigrationActive", msg)

    if mig.rollback and rec is not None and rec.active:
        return done(
            "RolledBack", "RollbackRequested", "spec.rollback is set", rec, [MAction(MAct.ROLLBACK)]
        )
    if mig.rollback and rec is None:
        if obs.gate_job is JobState.ACTIVE:
            # the gate Job may still start this migration on the writer: stay open until its
            # record shows (then it is rolled back above) or the Job ends without one
            msg = "spec.rollback is set; waiting for the gate Job to start it, to roll it back"
            return done("Pending", "RollbackRequested", msg)
        return done("RolledBack", "RollbackRequested", "rolled back before the gate ran")

    if rec is None:
        if obs.shards > 1 and mig.keep_merged == "IfBetter":  # the shards refuse it
            msg = (
                f"VectorIndex {mig.index!r} has {obs.shards} shards: a migration of a sharded "
                "index cannot keep both models merged; set spec.cutover.keepMerged to Never"
            )
            return done("Pending", "KeepMergedUnsupported", msg)
        if obs.gate_job is JobState.MISSING:
            acts = [MAction(MAct.START_JOB, JobKind.MIGRATE)]
            return done("Pending", "GateJobCreated", "the gate Job was created", None, acts)
        if obs.gate_job is JobState.FAILED:  # the runtime never accepted it
            return done("Failed", "GateJobFailed", "the gate Job failed; see its logs")
        return done("Pending", "GateJobStarting", "waiting for the gate Job")

    view = summary(rec)
    if missing := _not_on(rec):  # a sharded index: the start has not reached every shard
        shards = ", ".join(map(str, missing))
        if obs.gate_job is JobState.FAILED:  # nobody will start it there: undo the others
            msg = f"the gate Job failed before the migration started on shards {shards}"
            return done("RolledBack", "GateJobFailed", msg, rec, [MAction(MAct.ROLLBACK)])
        msg = (
            f"shards {shards} have no record of this migration yet (the gate Job starts it "
            "on every shard through the router)"
        )
        return done(phase0 or "Pending", "StartingOnShards", msg, rec)
    if rec.phase == MIXED:
        return _diverged(done, rec)
    if rec.phase == "Failed":
        return done("RolledBack", "GateFailed", view.message, rec)
    if rec.phase == "RolledBack":
        return done("RolledBack", "RolledBack", view.message or "rolled back", rec)
    if rec.phase == "Succeeded" and rec.kept_merged:
        msg = f"the index keeps {rec.from_model!r} and {mig.target!r} and serves their merge"
        return done("Succeeded", "KeptMerged", msg, rec)
    if rec.phase == "Succeeded":
        return done("Succeeded", "CutOver", f"the index serves {mig.target!r}", rec)

    t = _tracked(prior, rec, obs.now)
    idle = obs.now - t.progress_at
    stalled = rec.paused is None and view.progressing and idle >= mig.backfill_stall_s
    extra: list[Condition] = [
        Condition(
            "Stalled",
            stalled,
            "NoProgress" if stalled else "AsExpected",
            f"no progress for {idle:.0f} s (limit {mig.backfill_stall_s} s)" if stalled else "",
        ),
        Condition(
            "Paused",
            rec.paused is not None,
            rec.paused.reason if rec.paused else "NotPaused",
            rec.paused.message if rec.paused else "",
        ),
    ]
    acts = []
    phase, reason, message = rec.phase, view.reason, view.message
    job_failed = ""
    if rec.phase in GATE and obs.gate_job is JobState.FAILED:
        job_failed = (
            "the gate Job failed (see its logs); the writer resumes the gate from its record"
        )
        reason = "GateJobFailed"
    elif rec.phase in BACKFILL:
        if view.reason == "AwaitingBackfill":  # bridged: the backfill starts when asked
            acts.append(MAction(MAct.RESUME))
        # a sharded index's backfill is internal (every shard's writer re-encodes its own
        # rows): no Job; the Indexed Job's workers use a writer's rows endpoints
        act, note = (None, "") if obs.shards > 1 else _backfill(mig, obs, t, stalled)
        if act is not None:
            acts.append(act)
            t = _Tracked(t.mark, t.progress_at, act.seq, obs.now)
        if obs.backfill_job is JobState.FAILED:
            job_failed = note
        if rec.phase == "Bridged":  # the CR's reasons as before the typed record
            reason = "GatePassed"
            message = f"serving new-model queries with {rec.selected}; starting the backfill"
        else:
            reason, message = "Backfilling", f"{_progress(rec)['summary']} of rows re-encoded"
        if obs.shards > 1:
            message += f" (internal: each of the {obs.shards} shards' writers re-encodes its rows)"
        message += f"; {note}" if note else ""
    elif rec.phase == "Backfilled":
        held, held_msg = cutover_held(rec)
        go = mig.cutover_policy == "Auto" or mig.cutover_approved
        if go and (not held or mig.cutover_force):
            # once per state of the record: a held cutover is not asked again every pass
            # (unless forced); the runtime commits a held decision once per reason
            acts.append(MAction(MAct.CUTOVER, force=mig.cutover_force))
        if go and not held:
            phase, reason, message = "CuttingOver", "CutoverRequested", "every row has a new vector"
        elif held:
            reason, message = held, held_msg
        else:
            reason, message = "AwaitingApproval", "set spec.cutover.approved to cut over"
    elif rec.phase == "CuttingOver":
        reason, message = "CuttingOver", f"switching the index to {mig.target!r}"
    if rec.paused is not None:
        reason, message = rec.paused.reason, rec.paused.message
    extra.append(
        Condition("JobFailed", bool(job_failed), reason if job_failed else "AsExpected", job_failed)
    )
    if job_failed and rec.phase in GATE:
        message = job_failed
    bookkeeping = {
        "backfillJob": {"seq": t.seq, "createdAt": t.created_at} if t.created_at else None,
        "mark": t.mark,
        "lastProgressAt": t.progress_at,
    }
    return done(phase, reason, message, rec, acts, extra, bookkeeping)


def cutover_held(rec: MigrationRecord) -> tuple[str, str]:
    """Why a Backfilled record's cutover is held ('' when it may go now): the runtime's
    reason, except the ones that only wait for the request (``AwaitingCutover``; a shard of a
    coordinated migration that is ready, ``CoordinatedCutover``). A sharded index's record
    (merged by its router) lists every shard: the first Backfilled shard that holds for a
    reason of its own holds the index's cutover."""
    for s in _shards(rec):
        why = str(s.get("reason") or "")
        if s.get("phase") == "Backfilled" and why not in READY_TO_CUT:
            if not _camel(why):  # no cutover decision yet: the record's own (prose) reason
                return "ShardNotReady", f"shard {s.get('shard')} has not decided: {why}"
            return why, f"shard {s.get('shard')} holds the cutover: {why}"
    held = str((rec.cutover or {}).get("reason") or "")
    if held in READY_TO_CUT:
        return "", ""
    return held, str((rec.cutover or {}).get("message", ""))


def cutover_refused(message: str) -> tuple[str, str]:
    """The reason and message of a 409 to a cutover request: an unsharded writer answers
    ``<Reason>: <message>``; a router's refusal names the shards (``shard 1 is Backfilling``),
    reported as ``CutoverRefused``."""
    why, _, msg = message.partition(": ")
    if msg and _camel(why):
        return why, msg
    return "CutoverRefused", message


def _camel(reason: str) -> bool:
    """A machine reason (``NativeRegression``), not prose."""
    return re.fullmatch(r"[A-Z][A-Za-z0-9]*", reason) is not None


def _shards(rec: MigrationRecord) -> list[Mapping[str, Any]]:
    """A sharded index's record (merged by the router): every shard's id, phase and reason
    (empty for an unsharded writer's record)."""
    return [s or {} for s in rec.extra.get("shards") or ()]


def _not_on(rec: MigrationRecord) -> list[int]:
    """The shards whose record is not this migration's (not started there yet, or an
    earlier migration's): the router's merged phase means nothing until every shard has it."""
    return [int(s.get("shard", i)) for i, s in enumerate(_shards(rec)) if s.get("id") != rec.id]


def _diverged(done: _Done, rec: MigrationRecord) -> MigrationPlan:
    """A sharded index whose shards' migrations ended apart (a shard's gate Failed or was
    rolled back while others went on: the router's merged phase ``Mixed``): the index cannot
    cut over, so the shards still active are rolled back and the migration is RolledBack."""
    shards = _shards(rec)
    ended = [s for s in shards if s.get("phase") in ("Failed", "RolledBack")]
    active = [s for s in shards if s.get("phase") not in TERMINAL]
    what = ", ".join(f"shard {s.get('shard')} {s.get('phase')}" for s in ended) or "?"
    msg = f"the shards' migrations ended apart ({what})"
    if cut := [str(s.get("shard")) for s in shards if s.get("phase") == "Succeeded"]:
        # some shards serve the new model: neither a rollback (the router refuses it once a
        # shard is cut) nor a cutover (the others ended) can join them; RolledBack said the
        # index was whole on the old model
        msg += f"; shards {', '.join(cut)} serve {rec.to_model!r}: the index is split"
        return done("Failed", "ShardsSplit", msg, rec)
    if active:
        msg += f"; rolling back shards {', '.join(str(s.get('shard')) for s in active)}"
    acts = [MAction(MAct.ROLLBACK)] if active else []
    return done("RolledBack", "ShardFailed", msg, rec, acts)


@dataclass(frozen=True)
class _Done:
    """Builds the plan: the status (conditions merged, the record's projection), the events
    (phase transitions, rising alert conditions) and the actions."""

    mig: Migration
    obs: MigrationObservation
    prior: Mapping[str, Any]

    def __call__(
        self,
        phase: str,
        reason: str,
        message: str,
        rec: MigrationRecord | None = None,
        acts: list[MAction] | None = None,
        extra: list[Condition] | None = None,
        bookkeeping: Mapping[str, Any] | None = None,
    ) -> MigrationPlan:
        mig, obs, prior = self.mig, self.obs, self.prior
        g = mig.ref.generation
        alerts = {c.type for c in extra or () if c.status}
        quiet = not alerts & {"Stalled", "Paused"}
        conds = [
            Condition("Ready", phase == "Succeeded", reason or phase, message),
            Condition(
                "Progressing",
                quiet and (phase not in (*TERMINAL, "Pending") or reason == "GateJobCreated"),
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
            *(extra or ()),
        ]
        held = str(((rec.cutover if rec else None) or {}).get("reason") or "")
        if phase == "Backfilled" or held:
            holding = phase == "Backfilled" and reason not in ("Backfilled",)
            conds.append(
                Condition(
                    "CutoverHeld",
                    holding,
                    reason if holding else "NotHeld",
                    message if holding else "",
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
        if rec is not None:
            progress = _progress(rec)
            if bookkeeping:
                progress.update(
                    mark=bookkeeping["mark"], lastProgressAt=bookkeeping["lastProgressAt"]
                )
                if bookkeeping["backfillJob"]:
                    status["backfillJob"] = bookkeeping["backfillJob"]
            status.update(
                {
                    "strategy": str(rec.selected or ""),
                    "metric": str(rec.metric or ""),
                    "textCoverage": round(float(rec.extra.get("text_coverage") or 0.0), 4),
                    "strategies": _strategies(rec),
                    "progress": progress,
                }
            )
            status.update(_guard_and_merged(rec))
        events: list[Event] = []
        if prior.get("phase") != phase:
            kind = "Warning" if phase in ("Failed", "RolledBack") else "Normal"
            events.append(
                Event(kind, reason or phase, f"{prior.get('phase') or 'New'} -> {phase}: {message}")
            )
        for c in extra or ():
            before = condition(prior.get("conditions"), c.type) or {}
            if c.status and c.type in ALERTS and before.get("status") != "True":
                events.append(Event("Warning", c.reason, c.message))
        return MigrationPlan(tuple(acts or ()), status, tuple(events))
