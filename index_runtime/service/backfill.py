"""The writer's side of the distributed backfill (``admin/migrations/backfill/rows``).

Workers of an Indexed Job each own one *share* of the rows (``contract.share_of``: crc32 of
the key, modulo the number of shares). A worker asks for the rows of its share still to
re-encode after its cursor (:func:`select_page`, pure over one view's arrays), encodes them
with the target model and sends the vectors back; :func:`apply_rows` rewrites them with the
writer's compare-and-set (``IndexWriter.upsert_unchanged``: one WAL append per batch), so a
row upserted or deleted meanwhile keeps the user's write.

Cursors are seqs: a page holds the share's todo rows in ascending seq, and the cursor is the
last seq sent. A row the backfill rewrote gets a new seq *and* a new-model vector, so it is
never todo again; rows written by users during the migration carry both models (dual writes).
Hence "todo rows with seq > cursor" shrinks monotonically and a share is done when a page
holds all of them. The cursor exists because the view lags the writer: without it a worker
would be handed the rows it just sent again.

Cursors are kept in memory by a :class:`Desk` per runtime; per-share progress goes to the
migration's runner (``Migrator.note_worker``), which checkpoints it into the record's
``backfill.workers`` (at most every 10 s) and cuts over when nothing is left; a worker pod that
restarts asks without a cursor and resumes from the writer's (a restarted writer falls back to
the record's checkpoint, or to 0: re-scanning is safe, the todo set only holds unfinished rows).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from index_runtime.contract import record_id, share_of
from index_runtime.errors import InvalidInputError, MigrationNotActiveError
from index_runtime.index.rows import Block
from index_runtime.index.view import Base

if TYPE_CHECKING:
    from index_runtime.index.view import View
    from index_runtime.service.runtime import IndexRuntime

I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

MAX_ROWS = 1000  # per page and per write (bounded JSON, one WAL append, < the bulk limit)
OPEN_PHASES = ("Bridged", "Backfilling")  # the phases in which workers may rewrite rows


def check_active(rec: dict[str, Any], migration_id: str) -> None:
    """409 MigrationNotActive unless ``migration_id`` names the record and it backfills."""
    if not rec or record_id(rec) != migration_id:
        raise MigrationNotActiveError(
            f"migration {migration_id!r} is not the index's migration "
            f"({record_id(rec) if rec else 'none'!r})"
        )
    if rec.get("phase") not in OPEN_PHASES:
        raise MigrationNotActiveError(
            f"migration {migration_id!r} is in phase {rec.get('phase')!r}, not backfilling"
        )


# pure selection --------------------------------------------------------------------------------


def share_array(keys: list[Any], shares: int) -> npt.NDArray[np.int32]:
    """``share_of`` of every key (python ints or strs)."""
    return np.fromiter((share_of(k, shares) for k in keys), np.int32, len(keys))


@dataclass(frozen=True)
class Page:
    positions: I64  # view positions, ascending seq
    cursor: int  # the last seq on the page (``after`` when the page is empty)
    done: bool  # nothing of the share is left after this page


def select_page(
    seqs: I64, todo: Mask, shares_at: npt.NDArray[np.int32], share: int, after: int, limit: int
) -> Page:
    """The next page of one share: positions whose row is ``todo``, in ``share`` and has a
    seq above ``after``, the ``limit`` lowest seqs. Arrays are over one view's positions.
    When nothing is left above ``after`` but the share still has rows to do (a restore brought
    older rows back, or a cursor ran ahead), the page starts again from the lowest seq: a
    share is done only when none of its rows is left at all."""
    mine = todo & (shares_at == share)
    cand = np.flatnonzero(mine & (seqs > after))
    if not len(cand):
        cand = np.flatnonzero(mine)
    order = np.argsort(seqs[cand], kind="stable")[:limit]
    take = cand[order].astype(np.int64)
    cursor = int(seqs[take[-1]]) if len(take) else after
    return Page(take, cursor, len(cand) <= limit)


class _BaseCache:
    """Per-row facts of a view's base that do not change with the rows of a segment: has-text
    and the share of each key, cached per segment (segments are immutable; a flush adds one,
    so only its rows are hashed) and assembled once per base block."""

    def __init__(self) -> None:
        self.block: Block | None = None
        self.has_text: Mask = np.zeros(0, bool)
        self.shares: dict[int, npt.NDArray[np.int32]] = {}
        self.per_segment: dict[tuple[int, int], npt.NDArray[np.int32]] = {}

    def of(self, base: Base) -> _BaseCache:
        if self.block is not base.block:
            self.block, self.ranges, self.shares = base.block, base.seg_ranges, {}
            self.has_text = _has_text(base.block)
            live = set(base.seg_ranges)
            self.per_segment = {k: v for k, v in self.per_segment.items() if k[0] in live}
        return self

    def share_of(self, shares: int) -> npt.NDArray[np.int32]:
        assert self.block is not None
        if shares not in self.shares:
            out = np.empty(len(self.block), np.int32)
            for seg, (lo, hi) in self.ranges.items():
                part = self.per_segment.get((seg, shares))
                if part is None:
                    part = share_array(self.block.keys[lo:hi].tolist(), shares)
                    self.per_segment[(seg, shares)] = part
                out[lo:hi] = part
            self.shares[shares] = out
        return self.shares[shares]


def _has_text(block: Block) -> Mask:
    texts = block.texts or [None] * len(block)
    return np.fromiter((bool(t) for t in texts), bool, len(block))


# per-runtime state -----------------------------------------------------------------------------


@dataclass
class Desk:
    """The backfill workers' progress on one runtime (in memory; see the module docstring)."""

    migration_id: str = ""
    shares: int = 0
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    rewritten: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)
    checkpointed: float = field(default_factory=time.monotonic)
    base: _BaseCache = field(default_factory=_BaseCache)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset_if_other(self, migration_id: str, shares: int) -> None:
        """Under ``lock``: a new migration, or a new split into shares, starts afresh."""
        if (self.migration_id, self.shares) != (migration_id, shares):
            self.migration_id, self.shares = migration_id, shares
            self.workers, self.rewritten, self.skipped = {}, 0, 0
            self.started = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """What the record's ``backfill`` carries from the workers."""
        with self.lock:
            elapsed = max(1e-9, time.monotonic() - self.started)
            return {
                "workers": {k: dict(v) for k, v in self.workers.items()},
                "shares": self.shares,
                "rewritten": self.rewritten,
                "skipped": self.skipped,
                "rows_per_second": self.rewritten / elapsed,
            }


_DESKS: weakref.WeakKeyDictionary[IndexRuntime, Desk] = weakref.WeakKeyDictionary()
_DESKS_LOCK = threading.Lock()


def desk_of(rt: IndexRuntime) -> Desk:
    with _DESKS_LOCK:
        d = _DESKS.get(rt)
        if d is None:
            d = _DESKS[rt] = Desk()
        return d


def _todo_and_shares(
    desk: Desk, view: View, native: View, shares: int
) -> tuple[Mask, npt.NDArray[np.int32]]:
    """Todo mask (alive, text, no new-model vector) and share of every position of the pair
    (the same rows and positions); the base block's part is cached."""
    with desk.lock:
        base = desk.base.of(native.base)
        base_shares = base.share_of(shares)
        base_text = base.has_text
    delta = native.delta
    has_text = np.concatenate([base_text, _has_text(delta)])
    has_new = np.concatenate([native.base.block.has_vec, delta.has_vec])
    todo = np.asarray(view.alive, bool) & ~has_new & has_text
    # the delta is mostly rows rewritten already: hash only its todo rows (-1: no share)
    nb = len(base_shares)
    delta_shares = np.full(len(delta), -1, np.int32)
    at = np.flatnonzero(todo[nb:])
    delta_shares[at] = share_array(delta.keys[at].tolist(), shares)
    return todo, np.concatenate([base_shares, delta_shares])


def _pair(rt: IndexRuntime, migration_id: str) -> tuple[dict[str, Any], View, View]:
    rec = rt.bridge
    check_active(rec, migration_id)
    pair = rt.native_pair
    if pair is None:  # the record says Bridged but the view pair is not built yet
        rt.refresh(force=True)
        pair = rt.native_pair
    if pair is None:
        raise MigrationNotActiveError("no migration with dual writes is in progress")
    return rec, pair[0], pair[1]


MAX_SHARES = 1024  # a share's key hashes are cached per split: bound the splits a caller picks


def _check_share(share: int, shares: int, rec: dict[str, Any] | None = None) -> None:
    """The share exists in the split, and the split is the migration's own when an external
    backfill has one (``options.backfill_shares``: every split costs a cached hash per row)."""
    if not 1 <= shares <= MAX_SHARES:
        raise InvalidInputError(f"shares must be 1..{MAX_SHARES}, got {shares}")
    if not 0 <= share < shares:
        raise InvalidInputError(f"share must be 0..{shares - 1}, got {share}")
    opts = (rec or {}).get("options") or {}
    split = opts.get("backfill_shares") if opts.get("backfill_mode") == "external" else None
    if split and int(split) != shares:
        raise InvalidInputError(f"this migration's backfill has {split} shares, not {shares}")


def stored_cursor(desk: Desk, rec: dict[str, Any], migration_id: str, share: int, shares: int) -> int:
    """Where a worker that sends no cursor resumes: the writer's in-memory cursor of its share,
    else the record's checkpoint of it (same migration and shares), else 0."""
    with desk.lock:
        if (desk.migration_id, desk.shares) == (migration_id, shares) and str(share) in desk.workers:
            return int(desk.workers[str(share)]["cursor"])
    # the runner checkpoints the cursors of this migration's split (options.backfill_shares)
    w = (rec.get("backfill") or {}).get("workers", {}).get(str(share))
    opts = rec.get("options") or {}
    split = opts.get("backfill_shares") if opts.get("backfill_mode") == "external" else None
    if w and record_id(rec) == migration_id and split == shares:
        return int(w.get("cursor", 0))
    return 0


def rows_page(
    rt: IndexRuntime, migration_id: str, share: int, shares: int, after: int | None, limit: int
) -> dict[str, Any]:
    """GET ``backfill/rows``: the next page of a share (see :func:`select_page`)."""
    _check_share(share, shares)
    if not 1 <= limit <= MAX_ROWS:
        raise InvalidInputError(f"limit must be 1..{MAX_ROWS}, got {limit}")
    desk = desk_of(rt)
    rec, view, native = _pair(rt, migration_id)
    _check_share(share, shares, rec)
    if after is None:
        after = stored_cursor(desk, rec, migration_id, share, shares)
    todo, shares_at = _todo_and_shares(desk, view, native, shares)
    page = select_page(view.seqs, todo, shares_at, share, after, limit)
    rows = []
    for p in page.positions.tolist():
        r = native.row(int(p), payload=True)
        rows.append({"key": r["key"], "seq": r["seq"], "text": r["text"]})
    return {"id": migration_id, "rows": rows, "cursor": page.cursor, "done": page.done}


def apply_rows(
    rt: IndexRuntime,
    migration_id: str,
    share: int,
    shares: int,
    cursor: int,
    keys: list[Any],
    seqs: list[int],
    vectors: npt.NDArray[np.float32],
) -> dict[str, int]:
    """POST ``backfill/rows``: compare-and-set rewrite of the rows the worker encoded. A row
    that is gone, has another seq in the view or already has a new-model vector is skipped
    here; the writer skips the ones rewritten since the view (its winning seq differs)."""
    _check_share(share, shares)
    if len(keys) > MAX_ROWS:
        raise InvalidInputError(f"at most {MAX_ROWS} rows per write, got {len(keys)}")
    if len(set(keys)) != len(keys):
        raise InvalidInputError("rows must have distinct keys")
    rec, view, native = _pair(rt, migration_id)
    _check_share(share, shares, rec)
    other = [k for k in keys if share_of(k, shares) != share]
    if other:  # shares stay disjoint: a cursor and a progress count are per share
        raise InvalidInputError(
            f"{len(other)} keys belong to other shares of {shares} (first: {other[0]!r})"
        )
    # the cursor only moves over rows the worker sent (a cursor past them would hide rows)
    upto: int | None = min(cursor, max(seqs)) if len(seqs) else None
    old, to = str(rec["from"]), str(rec["to"])
    writer = rt.writer
    if writer is None:
        raise MigrationNotActiveError("this replica is not the writer")
    dim = writer.spec.dims.get(to)
    if dim is None:  # the record names a model the spec does not require (yet): not backfilling
        raise MigrationNotActiveError(f"the index does not store {to!r} vectors")
    if len(keys) and vectors.shape != (len(keys), dim):
        raise InvalidInputError(
            f"vectors must be {len(keys)} x {dim} (the dimension of {to!r}), got {vectors.shape}"
        )
    has_new = np.concatenate([native.base.block.has_vec, native.delta.has_vec])
    found = view.positions_of_seqs(np.asarray(seqs, np.int64)).tolist()
    keep: list[int] = []
    pos: list[int] = []
    for i, (k, p) in enumerate(zip(keys, found, strict=True)):
        # the row the worker read: same seq, same key, still alive and not yet rewritten
        if p >= 0 and view.alive[p] and not has_new[p] and native.row(p)["key"] == k:
            keep.append(i)
            pos.append(p)
    written = 0
    skipped = len(keys) - len(keep)
    if keep:
        at = np.asarray(pos, np.int64)
        payload = [native.row(p, payload=True) for p in pos]
        ack, n_skip = writer.upsert_unchanged(
            [keys[i] for i in keep],
            [int(seqs[i]) for i in keep],
            {old: view.vectors_at(at), to: vectors[np.asarray(keep, np.int64)]},
            [r["text"] for r in payload],
            [r["metadata"] for r in payload],
        )
        written, skipped = (ack.rows if ack else 0), skipped + n_skip
        rt._changed.set()  # the refresher builds the next view (as rt.upsert does)
    if upto is None:  # nothing sent: nothing to note
        return {"written": written, "skipped": skipped}
    desk = desk_of(rt)
    with desk.lock:
        desk.reset_if_other(migration_id, shares)
        w = desk.workers.setdefault(str(share), {"cursor": 0, "rows": 0})
        w.update(
            cursor=max(int(w["cursor"]), upto),
            rows=int(w["rows"]) + written,
            at=rt.clock(),
            shares=shares,
            migration=migration_id,
        )
    # the runner commits it at its next checkpoint (and counts it for the metrics)
    rt.migrator.note_worker(share, upto, written, skipped, migration_id)
    return {"written": written, "skipped": skipped}

