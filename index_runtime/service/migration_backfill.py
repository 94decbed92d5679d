"""The runner's BACKFILL and CHECKPOINT steps (see :mod:`index_runtime.service.migrator`).

BACKFILL (``backfill_mode: internal``) re-encodes every live row with text that has no
new-model vector, in passes: a pass works through one snapshot's list with compare-and-set
rewrites (a row written meanwhile already carries both vectors and is left alone; a row whose
seq changed, by a client or by an external worker, is skipped), checkpointing as it goes; the
machine starts another pass for the rows that arrived during it. With ``external`` the Indexed
Job's workers rewrite rows through the writer's endpoints and report per-share progress here
(:meth:`Backfill.note_worker`); the runner only checkpoints, at most every ``period_s``.
CHECKPOINT measures one snapshot and commits the progress (and, with labelled queries, the
merge's guard and a point of the quality curve). The guard is stateful
(``migration.guard_step``): it decides from the state the record holds, and its decision is
committed only onto that same state (a checkpoint that raced another one keeps the progress
and drops its guard step, so a flip is never counted twice or from a stale state). Both are idempotent: progress is recounted
from the snapshot, never accumulated in the record.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from index_runtime.contract import MigrationGuard, MigrationRecord
from index_runtime.index.rows import F32, normalize
from index_runtime.migration import STATUS_QUO, BackfillProgress, pace_s
from index_runtime.service.migrate import EvalSet, measure_progress
from index_runtime.service.migration_gate import evalset

if TYPE_CHECKING:
    from index_runtime.service.migrator import Migrator


class Backfill:
    def __init__(self, mig: Migrator) -> None:
        self.mig = mig
        self.period_s = 10.0  # checkpoint at least this often while rows change
        self.written = 0  # rows rewritten by this process (internal) or reported (external)
        self.skipped = 0
        self.started = time.monotonic()
        self.last = 0.0  # monotonic time of the last checkpoint
        self.workers: dict[str, dict[str, Any]] = {}  # share -> cursor, rows, at
        self.mid = ""  # the migration these counts are of
        self._lock = threading.Lock()  # workers, written (endpoint threads report)
        self._ev: tuple[str, EvalSet] | None = None

    def _follow(self, mid: str) -> None:
        """Under ``_lock``: counts and cursors of another migration start afresh (a migration
        after a rolled-back one must not inherit its workers' cursors)."""
        if mid and mid != self.mid:
            self.mid, self.workers, self.written, self.skipped = mid, {}, 0, 0
            self.started = time.monotonic()

    def note_worker(
        self, share: int, cursor: int, rows: int, skipped: int = 0, mid: str = ""
    ) -> None:
        """An external worker of share ``share`` of migration ``mid`` rewrote ``rows`` rows up
        to seq ``cursor`` (called by the backfill endpoint; the next checkpoint commits it)."""
        with self._lock:
            self._follow(mid)
            w = self.workers.setdefault(str(share), {"cursor": 0, "rows": 0, "at": 0.0})
            w["cursor"] = max(int(w["cursor"]), int(cursor))
            w["rows"] = int(w["rows"]) + int(rows)
            w["at"] = self.mig.rt.clock()
            self.written += int(rows)
            self.skipped += int(skipped)
        self.mig.rt.hooks.backfill(self.mig.rt.name, int(rows))

    def checkpoint_due(self, rec: MigrationRecord, prog: BackfillProgress) -> bool:
        """Progress moved since the recorded checkpoint and ``period_s`` passed."""
        b = rec.backfill or {}
        moved = b.get("backfilled") != prog.backfilled or b.get("todo") != prog.todo
        return moved and time.monotonic() - self.last >= self.period_s

    def _evalset(self, rec: MigrationRecord) -> EvalSet | None:
        if not rec.eval_key:
            return None
        if self._ev is None or self._ev[0] != rec.eval_key:
            ev = evalset(self.mig, rec)
            if ev is None:
                return None
            self._ev = (rec.eval_key, ev)
        return self._ev[1]

    def _served_vectors(self, rec: MigrationRecord, ev: EvalSet) -> F32:
        adapter = self.mig.rt.bridge_state[1]
        if (rec.selected or STATUS_QUO) == STATUS_QUO or adapter is None:
            return ev.q_old
        return normalize(np.asarray(adapter.apply(ev.q_new), np.float32))

    def checkpoint(self, rec: MigrationRecord) -> MigrationRecord:
        """CHECKPOINT: measure the current snapshot and commit the progress (phase
        Backfilling while rows remain or the backfill just ran)."""
        rt = self.mig.rt
        rt.refresh(force=True)
        view, native, prog, _ = rt.backfill_snapshot()
        with self._lock:
            self._follow(rec.id)
        elapsed = max(1e-9, time.monotonic() - self.started)
        with self._lock:
            workers = {k: dict(v) for k, v in self.workers.items()}
            written, skipped = self.written, self.skipped
        state = {
            **prog.as_dict(),
            "rewritten": written,
            "skipped": skipped,
            "rows_per_second": written / elapsed,
            "manifest_version": view.version,
            "updated_at": rt.clock(),
            "workers": {**dict((rec.backfill or {}).get("workers", {})), **workers},
        }
        ev = self._evalset(rec)
        point = None
        if ev is not None and rec.calibration:
            k = int(rec.options.get("k", 10))
            point = measure_progress(
                view, native, ev, self._served_vectors(rec, ev), rec.calibration, k,
                prev=rec.guard_state, merge_allowed=not rec.options.get("coordinated", False),
            )  # fmt: skip

        def change(r: MigrationRecord) -> MigrationRecord:
            phase = "Backfilling" if r.phase == "Bridged" or prog.todo else r.phase
            out = r.replace(
                phase=phase, backfill=state, extra={**r.extra, "text_coverage": prog.text_coverage}
            )
            if point is not None and r.guard_state == rec.guard_state:
                merge = {
                    "serves": point["merge_serves"],
                    "share": point["share"],
                    "gain_calibration": point["merge_gain_calibration"],
                    "native_gain": point["native_gain"],
                    "merge_vs_native": point["merge_vs_native"],
                    "merge_vs_served": point["merge_vs_served"],
                    "guard_reason": point["guard"]["reason"],
                }
                guard = MigrationGuard.from_json(point["guard"])
                out = out.replace(merge=merge, guard=guard, curve=(*r.curve[-49:], point))
            return out

        out = self.mig.commit(
            change, f"migration backfill {prog.share:.0%}", "migration.backfill.checkpointed"
        )
        self.last = time.monotonic()
        self.mig.set_job(out.phase, f"{prog.backfilled}/{prog.live} rows", progress=state)
        return out

    def run_pass(self, rec: MigrationRecord) -> None:
        """BACKFILL (internal): one pass over one snapshot's rows to re-encode."""
        mig, rt = self.mig, self.mig.rt
        with self._lock:
            self._follow(rec.id)
        w = rt._writer()
        to, old = rec.to_model, rec.from_model
        batch = min(int(rec.options.get("backfill_batch", 256)), w.config.bulk_rows - 1)
        rate = float(rec.options.get("backfill_rate", 0.0))
        encode_new = mig._encoders()[1]
        rt.refresh(force=True)
        view, _, prog, todo = rt.backfill_snapshot()
        mig.set_job("Backfilling", f"{prog.todo} rows to re-encode", progress=prog.as_dict())
        next_share = min(1.0, np.floor(prog.share * 10 + 1e-9) / 10 + 0.1)
        done = prog.backfilled
        for lo in range(0, len(todo), batch):
            if mig.stopped():
                return
            t_batch = time.monotonic()
            pos = todo[lo : lo + batch]
            rows = [view.row(int(p), payload=True) for p in pos]
            texts = [str(r["text"]) for r in rows]
            new = np.asarray(encode_new(texts, "passage"), np.float32)
            if mig.stopped():  # a cutover or rollback landed while the encoder ran
                return
            ack, n_skip = w.upsert_unchanged(
                [r["key"] for r in rows],
                [r["seq"] for r in rows],
                {old: view.vectors_at(pos), to: new},
                texts,
                [r["metadata"] for r in rows],
            )
            n = ack.rows if ack else 0
            with self._lock:
                self.written += n
                self.skipped += n_skip
            done += n
            rt.changed()
            rt.hooks.backfill(rt.name, n)
            if pause := pace_s(len(pos), rate, time.monotonic() - t_batch):
                mig.sleep(pause)
            share = done / max(1, prog.live)
            if time.monotonic() - self.last >= self.period_s or share >= next_share:
                rec = self.checkpoint(mig.record() or rec)
                next_share = min(1.0, np.floor(share * 10 + 1e-9) / 10 + 0.1)
