"""The writer's migration runner: owns the migration's thread, its commit lock and its
in-memory job state (what the status shows between commits).

One loop: read the committed record -> :func:`index_runtime.machine.next_step` -> do the step
-> commit. Every step writes its objects before the commit that names them and derives its
input from what is committed, so a process killed at any point resumes from the last commit
(:meth:`Migrator.resume_on_start`). Every commit goes through :meth:`Migrator._commit`, which
applies the change to the newest record only while it is still this migration's and active
(a rollback or a cutover that landed meanwhile wins), and names a crash point.

Faults: an encoder that is unavailable (``EncoderUnavailableError``, other 503s) is retried
with backoff forever (the job's message says so; the record shows a non-permanent pause); one
that rejects the model (``EncoderRejectedError``) pauses the migration until a resume request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from index_runtime.contract import MigrationPause, MigrationRecord
from index_runtime.crash import crash_point
from index_runtime.errors import (
    ClosedError,
    ConflictError,
    DriftlessError,
    EncoderRejectedError,
    InvalidInputError,
    MigrationMismatchError,
)
from index_runtime.index.loader import serving_model
from index_runtime.index.settings import IndexSettings
from index_runtime.machine import Observed, Step, next_step, same_migration
from index_runtime.migration import BRIDGED, coordinated_cutover, cutover_decision, merged_cost
from index_runtime.service import migration_gate as gate
from index_runtime.service.migrate import (
    Encode,
    MigrationRequest,
    closed_record,
    interval_of,
)
from index_runtime.service.migration_backfill import Backfill
from index_runtime.service.migration_gate import Superseded
from index_runtime.service.operations import Operation, WorkFailed
from index_runtime.store.manifest import Manifest, retire_unreferenced

if TYPE_CHECKING:
    from index_runtime.service.runtime import IndexRuntime

log = logging.getLogger(__name__)
GATE_STEPS = (Step.DUAL_WRITES, Step.SAMPLE, Step.FIT, Step.EVALUATE)


class Migrator:
    """The migration of one index's writer (see the module docstring)."""

    def __init__(self, rt: IndexRuntime) -> None:
        self.rt = rt
        self.job: dict[str, Any] = {}  # phase, message, progress: the status between commits
        self.lock = threading.Lock()  # record commits (taken inside the writer's locks' callers)
        self.cancel = threading.Event()  # a rollback or cutover asks the loop to stop
        self.encoders: tuple[Encode, Encode] | None = None
        self.backfill = Backfill(self)
        self.retry_s = 0.5  # first backoff after a transient fault; doubles up to retry_max_s
        self.retry_max_s = 30.0
        self.wait_s = 0.5  # poll period while external workers backfill

    # the record ----------------------------------------------------------------------------

    def record(self) -> MigrationRecord | None:
        """The newest committed record (the writer's manifest, not the published view)."""
        return MigrationRecord.from_json(self.rt._writer().manifest.migration)

    def set_job(self, phase: str, message: str = "", **extra: Any) -> None:
        self.job = {**self.job, "phase": phase, "message": message, **extra}

    def _commit(
        self,
        change: Callable[[MigrationRecord], MigrationRecord],
        why: str,
        point: str,
        spec: Callable[[Manifest, MigrationRecord], Manifest] | None = None,
        mid: str | None = None,
    ) -> MigrationRecord:
        """Apply ``change`` to the newest record and commit it (with ``spec``: a change of the
        index spec too, under the writer's write lock). Refused (``Superseded``) when the
        newest record is not active or not migration ``mid`` (default: the job's id)."""
        w = self.rt._writer()
        now = self.rt.clock()
        want = self.job.get("id") if mid is None else mid
        out: list[MigrationRecord] = []

        def edit(m: Manifest) -> Manifest:
            cur = MigrationRecord.from_json(m.migration)
            if cur is None or not cur.active or not same_migration(cur, want):
                raise Superseded(f"the migration changed meanwhile ({why} dropped)")
            new = change(cur).replace(updated_at=now)
            out.append(new)
            m2 = replace(m, migration=new.to_json())
            return retire_unreferenced(m, spec(m2, new) if spec else m2, now)

        with self.lock:
            if spec is not None:
                w.change_spec(edit, why)
            else:
                w.commit_edit(edit, why)
        crash_point(point)
        self.rt.changed()
        self.rt.refresh(force=True)
        return out[-1]

    def commit(
        self, change: Callable[[MigrationRecord], MigrationRecord], why: str, point: str
    ) -> MigrationRecord:
        """A record change that also clears a non-permanent pause (the step went through)."""

        def unpause(r: MigrationRecord) -> MigrationRecord:
            r = change(r)
            return r.replace(paused=None) if r.paused and not r.paused.permanent else r

        return self._commit(unpause, why, point)

    # requests --------------------------------------------------------------------------------

    def note_worker(
        self, share: int, cursor: int, rows: int, skipped: int = 0, mid: str = ""
    ) -> None:
        """An external backfill worker's progress (the backfill endpoint calls this after each
        batch it rewrote); the runner commits it at its next checkpoint (<= ``period_s``)."""
        self.backfill.note_worker(share, cursor, rows, skipped, mid)

    def running(self) -> Operation | None:
        return self.rt.operations.running("migration")

    def start(
        self, req: MigrationRequest, encode_old: Encode, encode_new: Encode
    ) -> tuple[Operation | None, bool, MigrationRecord | None]:
        """Start migration ``req.id`` (contract: same id -> the running operation, or the
        record if nothing runs; another id while one is active -> 409; a new id after one
        ended starts afresh). Returns (operation or None, whether this call started it,
        the current record)."""
        self.rt._writer()
        rec = self.record()
        op = self.running()
        if req.id and rec is not None and rec.id == req.id:
            if op is not None:
                return op, False, rec
            if rec.active and not self._resting(rec):  # e.g. a writer that lost its runner
                self.encoders = (encode_old, encode_new)
                self.job = {"id": rec.id, "to": rec.to_model, "started_at": self.rt.clock()}
                self.set_job(rec.phase, "resumed by a repeated start")
                return (*self._run(rec.id), rec)
            return None, False, rec
        if rec is not None and rec.active:
            if req.id and rec.id and rec.id != req.id:
                raise MigrationMismatchError(
                    f"migration {rec.id} to {rec.to_model!r} is in phase {rec.phase}; roll it "
                    f"back first (this request is migration {req.id})"
                )
            raise ConflictError(
                f"a migration to {rec.to_model!r} is in phase {rec.phase}; roll it back first"
            )
        if op is not None:
            if req.id and self.job.get("id") not in (None, "", req.id):
                raise MigrationMismatchError(f"migration {self.job.get('id')} is starting")
            return op, False, rec
        if rec is not None and rec.kept_merged:  # a later migration first drops the old model
            if req.to_model == rec.to_model:
                raise InvalidInputError(
                    f"the index already serves {rec.to_model!r} (merged with {rec.from_model!r})"
                )
            self.drop_merged(rec)
        if req.to_model == self.rt.model:
            raise InvalidInputError(f"the index already serves {self.rt.model!r}")
        mid = req.id or uuid.uuid4().hex
        self.encoders = (encode_old, encode_new)
        self.cancel.clear()
        self.job = {"id": mid, "to": req.to_model, "started_at": self.rt.clock()}
        self.set_job("Pending")
        return (*self._run(mid, first=req), rec)

    def resume(
        self, encode_old: Encode, encode_new: Encode, mid: str | None = None
    ) -> Operation | None:
        """Continue the active migration (after a restart, a permanent pause, or for one begun
        with ``backfill: false``): clears the pause, marks the backfill requested. None when
        no migration is active."""
        self.rt._writer()
        rec = self.record()
        if rec is None or not rec.active:
            return None
        self._check_id(rec, mid)
        op = self.running()
        if op is not None:
            return op
        self.encoders = (encode_old, encode_new)
        self.job = {"id": rec.id, "to": rec.to_model, "started_at": self.rt.clock()}
        self.set_job(rec.phase, "resumed")
        if rec.paused is not None or not rec.options.get("backfill", True):
            self.commit(
                lambda r: r.replace(paused=None, options={**r.options, "backfill": True}),
                "migration resumed",
                "migration.resume.committed",
            )
        return self._run(rec.id)[0]

    def resume_on_start(self, encode_old: Encode | None, encode_new: Encode | None) -> None:
        """A writer that (re)starts continues any active migration from its last commit
        (when it has both models' encoders; otherwise the job says what is missing)."""
        rec = self.record()
        if rec is None or not rec.active or self.running() is not None:
            return
        if encode_old is None or encode_new is None:
            self.job = {"id": rec.id, "phase": rec.phase, "message": "cannot resume: no encoder"}
            return
        self.encoders = (encode_old, encode_new)
        self.job = {"id": rec.id, "to": rec.to_model, "started_at": self.rt.clock()}
        self.set_job(rec.phase, "resumed after a restart")
        if not self._resting(rec):
            self._run(rec.id)

    # staying merged ------------------------------------------------------------------------

    def source_model(self) -> str:
        """The model a new migration starts from: the index's model, or the new model of a
        migration that ended keeping both merged (the later migration drops the old one)."""
        rec = self.record()
        return rec.to_model if rec is not None and rec.kept_merged else self.rt.model

    def drop_merged(self, rec: MigrationRecord) -> None:
        """End the merged state of ``rec`` (terminal, kept merged): the index stores and
        serves only its new model, as a plain cutover would have left it; the record stays
        Succeeded and says when the old model was dropped (its adapter is retired by GC)."""
        now = self.rt.clock()
        old, to = rec.from_model, rec.to_model

        def edit(m: Manifest) -> Manifest:
            cur = MigrationRecord.from_json(m.migration)
            if cur is None or cur.id != rec.id or not cur.kept_merged:
                raise Superseded("the merged migration changed meanwhile")
            cut = {**(cur.cutover or {}), "merged": False, "dropped_at": now,
                   "dropped": old}  # fmt: skip
            out = cur.replace(cutover=cut, adapter_key=None, updated_at=now)
            return retire_unreferenced(m, replace(_only(m, to), migration=out.to_json()), now)

        with self.lock:
            self.rt._writer().change_spec(edit, f"migration {rec.id}: drop merged {old}")
        crash_point("migration.cutover.committed")  # the deferred cutover
        self.rt.changed()
        self.rt.refresh(force=True)
        self.set_job("Succeeded", f"dropped {old!r}; the index serves {to!r} alone")

    def _check_id(self, rec: MigrationRecord, mid: str | None) -> None:
        if not same_migration(rec, mid):
            raise MigrationMismatchError(
                f"the index's migration is {rec.id} (to {rec.to_model!r}), not {mid}"
            )

    def _resting(self, rec: MigrationRecord) -> bool:
        return bool(next_step(rec, self.observe(rec)).rest)

    def rollback(self, reason: str = "rolled back on request", mid: str | None = None) -> str:
        """Stop the migration (any phase before Succeeded) and serve the old model only."""
        self.rt._writer()
        rec = self.record()
        if rec is not None and rec.kept_merged:  # ended: both models' vectors are stored
            raise ConflictError(
                f"migration {rec.id} ended keeping {rec.from_model!r} and {rec.to_model!r} "
                f"merged, so there is nothing to roll back; a cutover with force drops "
                f"{rec.from_model!r}, a migration to another model drops it first"
            )
        if rec is None or not rec.active:
            phase = rec.phase if rec else None
            raise ConflictError(f"no migration to roll back (phase {phase!r})")
        self._check_id(rec, mid)
        self.cancel.set()
        t = self.rt.migration_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)
        self.end("RolledBack", reason, rec.id)
        return "RolledBack"

    def end(self, phase: str, reason: str, mid: str) -> None:
        """Failed or RolledBack: the index stores and requires only the old model again; the
        record's objects are retired. Nothing stored is lost (new-model vectors already
        written stay in their segments until compaction drops the column)."""
        now = self.rt.clock()

        def spec(m: Manifest, rec: MigrationRecord) -> Manifest:
            s = m.index
            to = rec.to_model
            if to in s.models and to != serving_model(m):
                s = replace(
                    s,
                    models={n: v for n, v in s.models.items() if n != to},
                    write_models=tuple(x for x in s.write_models if x != to),
                )
            return replace(m, index=s)

        def close(r: MigrationRecord) -> MigrationRecord:
            return _closed(r, phase, now, reason=reason)

        point = (
            "migration.rollback.committed"
            if phase == "RolledBack"
            else "migration.failed.committed"
        )
        self._commit(close, f"migration {phase}", point, spec, mid)
        self.set_job(phase, reason)

    # the loop ----------------------------------------------------------------------------------

    def _run(self, mid: str, first: MigrationRequest | None = None) -> tuple[Operation, bool]:
        """The loop as an operation of kind ``migration``: it succeeds when the loop ends in
        any phase but Failed (its result names the phase)."""
        self.cancel.clear()

        def work(op: Operation) -> dict[str, Any]:
            self.loop(mid, first)
            rec = self.record()
            phase = rec.phase if rec else self.job.get("phase")
            message = self.job.get("message")
            if phase == "Failed":
                raise WorkFailed("MigrationFailed", str(message or "the migration failed"))
            paused = rec.paused.to_json() if rec and rec.paused else None
            return {"phase": phase, "message": message, "record_phase": phase, "paused": paused}

        return self.rt._start_operation("migration", work)

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.rt.stopping

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopped() and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    def observe(self, rec: MigrationRecord) -> Observed:
        dual = rec.to_model in self.rt._writer().spec.write_models
        if rec.phase not in BRIDGED or not dual:
            return Observed(dual_writes=dual)
        self.rt.refresh(force=True)
        _, _, prog, _ = self.rt.backfill_snapshot()
        d = self.cutover_decision(rec, prog, explicit=False)
        return Observed(
            dual_writes=True,
            todo=prog.todo,
            blocked=prog.blocked,
            cutover_go=d.go,
            cutover_reason=d.reason,
            checkpoint_due=self.backfill.checkpoint_due(rec, prog),
        )

    def loop(self, mid: str, first: MigrationRequest | None) -> None:
        """Run steps until the migration rests, ends, or the runtime stops."""
        failures = 0
        while not self.stopped():
            step = Step.DUAL_WRITES
            try:
                rec = self.record()
                if first is not None:
                    gate.dual_writes(self, first, mid)
                    first = None
                    continue
                if rec is None or not same_migration(rec, mid):
                    return
                nxt = next_step(rec, self.observe(rec))
                step = nxt.step
                if step is Step.NOTHING or (step is Step.WAIT and nxt.rest):
                    self.set_job(rec.phase, _rest_message(rec, nxt.reason))
                    return
                if step is Step.WAIT:
                    self.set_job(rec.phase, nxt.reason)
                    self.sleep(self.wait_s)
                    continue
                self.do(step, rec)
                failures = 0
            except Superseded:
                return
            except ClosedError:
                return  # the writer closed under us: a restart resumes from the record
            except EncoderRejectedError as exc:
                self._pause(mid, "EncoderFailed", str(exc), permanent=True)
                return
            except DriftlessError as exc:
                if exc.status != 503:  # not transient
                    if self._fail(step, exc, mid):
                        return
                    raise
                failures += 1
                wait = min(self.retry_max_s, self.retry_s * 2 ** (failures - 1))
                wait *= 0.5 + random.random()  # jitter
                self.set_job(str(self.job.get("phase", "")), f"retrying in {wait:.1f} s: {exc}")
                if failures == 1:
                    self._pause(mid, exc.reason, str(exc), permanent=False)
                self.sleep(wait)
            except Exception as exc:
                if self._fail(step, exc, mid):
                    return
                raise

    def _fail(self, step: Step, exc: Exception, mid: str) -> bool:
        """A gate step that cannot succeed ends the migration Failed; a backfill step's other
        errors stop the loop (a resume continues from the record). True when handled."""
        rec = self.record()
        if self.stopped():
            return True
        log.warning("migration %s of %s: %s failed: %s", mid, self.rt.name, step, exc)
        if rec is None or not rec.active:
            if step is Step.DUAL_WRITES:  # nothing of it was committed: record the failure
                self._record_failed_start(mid, str(exc))
            return True
        if not same_migration(rec, mid):
            return True
        if step in GATE_STEPS:
            self.end("Failed", str(exc), mid)
            return True
        self.set_job(rec.phase, f"stopped: {exc}; resume to continue")
        return True

    def _record_failed_start(self, mid: str, reason: str) -> None:
        now = self.rt.clock()
        failed = MigrationRecord(
            id=mid,
            from_model=self.rt.model,
            to_model=str(self.job.get("to", "")),
            phase="Failed",
            started_at=float(self.job.get("started_at", now)),
            updated_at=now,
            finished_at=now,
            reason=reason,
        )

        def edit(m: Manifest) -> Manifest:
            cur = MigrationRecord.from_json(m.migration)
            if cur is not None and cur.active:
                raise Superseded("another migration is active")
            return replace(m, migration=failed.to_json())

        with self.lock, contextlib.suppress(Superseded):
            self.rt._writer().commit_edit(edit, "migration Failed")
        crash_point("migration.failed.committed")
        self.rt.changed()
        self.rt.refresh(force=True)
        self.set_job("Failed", reason)

    def _pause(self, mid: str, reason: str, message: str, permanent: bool) -> None:
        log.warning("migration %s of %s paused: %s", mid, self.rt.name, message)
        self.set_job(str(self.job.get("phase", "")), f"paused: {message}")
        pause = MigrationPause(reason, message, self.rt.clock(), permanent)
        # no record yet, or the store is down too: the job says it
        with contextlib.suppress(Superseded, DriftlessError):
            self._commit(lambda r: r.replace(paused=pause), f"migration paused: {reason}",
                         "migration.pause.committed", mid=mid)  # fmt: skip

    # the steps -------------------------------------------------------------------------------

    def do(self, step: Step, rec: MigrationRecord) -> None:
        self.set_job(rec.phase, step.value)
        if step is Step.DUAL_WRITES:
            gate.restore_dual_writes(self, rec)
        elif step is Step.SAMPLE:
            gate.sample(self, rec)
        elif step is Step.FIT:
            gate.fit(self, rec)
        elif step is Step.EVALUATE:
            gate.evaluate(self, rec)
        elif step is Step.BACKFILL:
            self.backfill.run_pass(rec)
        elif step is Step.CHECKPOINT:
            self.backfill.checkpoint(rec)
        elif step in (Step.CUTOVER, Step.HOLD):
            self.cutover(force=False, explicit=False, mid=rec.id)

    def _encoders(self) -> tuple[Encode, Encode]:
        if self.encoders is None:
            raise ConflictError("no encoders for this migration")
        return self.encoders

    # the cutover -------------------------------------------------------------------------------

    def cutover_decision(self, rec: MigrationRecord, prog: Any, explicit: bool,
                         force: bool = False) -> Any:  # fmt: skip
        # coordinated: the runner's own decision is only whether the shard is ready (as if
        # auto); the cutover itself is the router's explicit request
        coordinated = bool(rec.options.get("coordinated", False)) and not explicit
        auto = bool(rec.options.get("auto_cutover", True)) or explicit or coordinated
        gain = interval_of((rec.merge or {}).get("native_gain"))
        keep = rec.options.get("keep_merged") == "if_better" and rec.guard_state.serves
        m = rec.merge or {}
        mvn, mvs = (
            interval_of(m.get(k)) if keep else None for k in ("merge_vs_native", "merge_vs_served")
        )
        d = cutover_decision(prog, gain, auto, force, rec.to_model, mvn, mvs)
        try:
            dim = self.rt._writer().manifest.index.dims[rec.to_model]
            IndexSettings.from_json(self.rt.current_manifest().settings, dim)
        except (InvalidInputError, KeyError) as exc:
            d = replace(d, go=False, reason="SettingsInvalid", message=str(exc))
        return coordinated_cutover(d) if coordinated else d

    def cutover(self, force: bool = False, explicit: bool = True,
                mid: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Switch the index to the new model when :func:`migration.cutover_decision` says so
        (``explicit``: an admin request, which may ``force`` past a measured regression). A
        held cutover is committed only when its reason changes (no manifest version, no
        event per tick). The new model is served by the shadow at once with its own metric."""
        self.rt._writer()
        rec = self.record()
        if rec is not None and rec.kept_merged and same_migration(rec, mid):
            if not force:
                raise ConflictError(
                    f"migration {rec.id} ended keeping {rec.from_model!r} and {rec.to_model!r} "
                    f"merged; cut over with force to drop {rec.from_model!r}"
                )
            self.drop_merged(rec)
            return {"cut_over": True, "reason": "MergeEnded", "message": self.job["message"]}
        if rec is not None and mid and rec.id == mid and rec.phase == "Succeeded":
            # the same cutover again (a retry, or a router's second caller that raced the
            # first): done already, not a conflict
            return {"cut_over": True, "reason": "AlreadyCutOver",
                    "message": f"migration {mid} is cut over to {rec.to_model!r}"}  # fmt: skip
        if rec is None or rec.phase not in BRIDGED:
            phase = rec.phase if rec else None
            raise ConflictError(f"no migration waits for a cutover (phase {phase!r})")
        self._check_id(rec, mid)
        self.rt.refresh(force=True)
        _, _, prog, _ = self.rt.backfill_snapshot()
        d = self.cutover_decision(rec, prog, explicit, force)
        if not d.go:
            phase = "Backfilled" if not prog.todo else rec.phase
            held = (rec.cutover or {}).get("reason")
            if held != d.reason or rec.phase != phase:
                cut = {"reason": d.reason, "message": d.message, "at": self.rt.clock()}
                self.commit(lambda r: r.replace(phase=phase, cutover=cut),
                            f"migration cutover held: {d.reason}", "migration.cutover.held")  # fmt: skip
            self.set_job(phase, d.message)
            if explicit:
                raise ConflictError(f"{d.reason}: {d.message}")
            return {"cut_over": False, "reason": d.reason, "message": d.message}
        self.set_job("CuttingOver", d.message)
        now = self.rt.clock()
        to = rec.to_model

        def spec(m: Manifest, r: MigrationRecord) -> Manifest:
            if d.merged:  # both models stay stored, required and served (the merge)
                return m
            return _only(m, to)

        def close(r: MigrationRecord) -> MigrationRecord:
            cut: dict[str, Any] = {"reason": d.reason, "message": d.message, "at": now}
            if d.merged:
                dim = r.target.dim if r.target else int(self.rt.spec.dims.get(to, 0))
                cut.update(
                    merged=True,
                    merge_vs_native=dict((r.merge or {}).get("merge_vs_native") or {}),
                    merge_vs_served=dict((r.merge or {}).get("merge_vs_served") or {}),
                    cost=merged_cost(prog.live, dim),
                )
            return _closed(r, "Succeeded", now, cutover=cut)

        self.cancel.set()  # a backfill pass still running stops at its next batch
        self._commit(close, f"migration cutover to {to}", "migration.cutover.committed", spec,
                     rec.id)  # fmt: skip
        self.set_job("Succeeded", d.message)
        return {"cut_over": True, "reason": d.reason, "message": d.message}


def _only(m: Manifest, model: str) -> Manifest:
    """``m`` storing, requiring and serving only ``model`` (its own shadow until trained)."""
    s = replace(m.index, models={model: m.index.models[model]}, write_models=(model,))
    return replace(m, index=s, codebooks=(), index_files=(), serving=0)


def _closed(r: MigrationRecord, phase: str, now: float, **fields: Any) -> MigrationRecord:
    out = MigrationRecord.from_json(closed_record(r.to_json(), phase, now, **fields))
    assert out is not None
    return out


def _rest_message(rec: MigrationRecord, reason: str) -> str:
    if rec.paused is not None:
        return f"paused: {rec.paused.message}; resume to continue"
    if reason == "AwaitingBackfill":
        return rec.reason
    return str((rec.cutover or {}).get("message", reason))
