"""The model migration's state machine (PURE: no I/O, no clock, no threads).

Given the persisted record (:class:`index_runtime.contract.MigrationRecord`) and what the runner
observed on the current snapshot, :func:`next_step` says what the writer's runner does next;
:func:`summary` says what the operator shows. Like :func:`index_runtime.lifecycle.decide`, only
the callers act. Every step is idempotent: it is derived from what is committed, so re-running
it after a crash at any point converges (a step's objects are written before the commit that
names them; an object written by a step that crashed before its commit is never named and GC
retires it).

Phases and the step that leaves each (``paused`` is not a phase: a permanent pause waits)::

    (start) --DUAL_WRITES--> Pending --SAMPLE--> TrainingAdapter --FIT--> Evaluating
    Evaluating --EVALUATE--> Bridged --(backfill requested)--> Backfilling
    Backfilling --BACKFILL / CHECKPOINT ...--> (todo = 0) --CHECKPOINT--> cutover decision
        go      --CUTOVER--> Succeeded
        held    --HOLD--> Backfilled (committed once per reason) --WAIT ...
    any active phase --rollback--> RolledBack;  a gate that cannot measure --> Failed
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from index_runtime.contract import MigrationRecord

GATE = ("Pending", "SamplingPairs", "TrainingAdapter", "Evaluating")


class Step(StrEnum):
    DUAL_WRITES = "dual_writes"  # add the target model to the index, commit the record
    SAMPLE = "sample"  # sample rows with text, encode them with the new model -> pairs_key
    FIT = "fit"  # fit every adapter kind on the pairs' fit split -> fitted adapters
    EVALUATE = "evaluate"  # measure, select, calibrate -> Bridged (adapter_key, eval_key)
    BACKFILL = "backfill"  # re-encode rows without a new-model vector (internal mode)
    CHECKPOINT = "checkpoint"  # measure the snapshot, commit progress (and the curve)
    CUTOVER = "cutover"  # switch the index to the new model -> Succeeded
    HOLD = "hold"  # commit why the cutover waits -> Backfilled
    WAIT = "wait"  # nothing to commit now: poll again (or rest, see NextStep.rest)
    NOTHING = "nothing"  # no active migration


@dataclass(frozen=True)
class Observed:
    """What the runner measured on one snapshot (counts over live rows of the view)."""

    dual_writes: bool = True  # the target model is among the index's write models
    todo: int | None = None  # rows with text and no new-model vector (None: not measured)
    blocked: int = 0  # rows with neither text nor a new-model vector
    cutover_go: bool = False  # migration.cutover_decision(...).go on this snapshot
    cutover_reason: str = ""  # ...its reason (CamelCase)
    checkpoint_due: bool = False  # progress moved since the last checkpoint and it is time


@dataclass(frozen=True)
class NextStep:
    step: Step
    reason: str  # CamelCase, for logs and the operation's progress
    rest: bool = False  # WAIT only: no work can start without a request (the runner may exit)


def _recorded(rec: MigrationRecord, key: str) -> object:
    return (rec.backfill or {}).get(key)


def next_step(rec: MigrationRecord | None, obs: Observed) -> NextStep:
    """The runner's next step for ``rec`` (None: no migration ever ran)."""
    if rec is None or not rec.active:
        return NextStep(Step.NOTHING, "NoActiveMigration")
    if rec.paused is not None and rec.paused.permanent:
        return NextStep(Step.WAIT, rec.paused.reason, rest=True)
    if not obs.dual_writes:
        return NextStep(Step.DUAL_WRITES, "DualWritesMissing")
    if rec.phase in GATE:
        if rec.pairs_key is None:
            return NextStep(Step.SAMPLE, "SamplingPairs")
        if not rec.fitted:
            return NextStep(Step.FIT, "TrainingAdapter")
        return NextStep(Step.EVALUATE, "Evaluating")
    if rec.phase == "Bridged" and not rec.options.get("backfill", True):
        return NextStep(Step.WAIT, "AwaitingBackfill", rest=True)
    if obs.todo is None:
        return NextStep(Step.CHECKPOINT, "Measuring")
    if obs.todo > 0:
        if rec.phase == "Bridged" or obs.checkpoint_due:  # a checkpoint commits Backfilling
            return NextStep(Step.CHECKPOINT, "BackfillRunning")
        if rec.backfill_mode == "external":  # the Indexed Job's workers re-encode
            return NextStep(Step.WAIT, "BackfillWorkers")
        return NextStep(Step.BACKFILL, "BackfillRunning")
    if rec.phase in ("Bridged", "Backfilling") and _recorded(rec, "todo") != obs.todo:
        return NextStep(Step.CHECKPOINT, "BackfillDone")  # the final point of the curve
    if obs.cutover_go:
        return NextStep(Step.CUTOVER, "CutOver")
    held = (rec.cutover or {}).get("reason")
    if rec.phase != "Backfilled" or held != obs.cutover_reason:
        return NextStep(Step.HOLD, obs.cutover_reason)
    return NextStep(Step.WAIT, obs.cutover_reason, rest=True)


@dataclass(frozen=True)
class MachineView:
    """What the operator shows for a record (its condition and whether to wait)."""

    phase: str
    paused: bool
    progressing: bool  # the runner has work it can do without a request
    terminal: bool
    reason: str
    message: str


def summary(rec: MigrationRecord | None) -> MachineView:
    """The record as the operator reports it. ``progressing`` is False when the migration
    waits for someone: a permanent pause, a Bridged migration without a backfill request, a
    held cutover."""
    if rec is None:
        return MachineView("", False, False, False, "NoMigration", "no migration recorded")
    if rec.terminal:
        reason = {"Succeeded": "CutOver", "RolledBack": "RolledBack"}.get(rec.phase, "Failed")
        if rec.kept_merged:
            reason = "KeptMerged"
        message = str((rec.cutover or {}).get("message") or rec.reason or rec.error or "")
        return MachineView(rec.phase, False, False, True, reason, message)
    if rec.paused is not None:
        p = rec.paused
        return MachineView(rec.phase, True, not p.permanent, False, p.reason, p.message)
    if rec.phase == "Bridged" and not rec.options.get("backfill", True):
        return MachineView(
            rec.phase, False, False, False, "AwaitingBackfill", rec.reason or "bridged"
        )
    if rec.phase == "Backfilled":
        c = rec.cutover or {}
        return MachineView(
            rec.phase, False, False, False, str(c.get("reason", "")), str(c.get("message", ""))
        )
    if rec.phase in ("Bridged", "Backfilling"):
        b = rec.backfill or {}
        message = f"{b.get('backfilled', 0)}/{b.get('live', 0)} rows re-encoded"
        return MachineView(rec.phase, False, True, False, "BackfillRunning", message)
    return MachineView(rec.phase, False, True, False, "GateRunning", f"the gate is {rec.phase}")


def same_migration(rec: MigrationRecord | None, migration_id: str | None) -> bool:
    """Whether a request with ``migration_id`` addresses ``rec`` (no id: the current one)."""
    return rec is not None and (not migration_id or not rec.id or rec.id == migration_id)
