"""The single writer of one index: WAL, memtable, flush, compaction, GC and restore.

Write path: validate -> assign seqs -> WAL append + fsync -> acknowledge -> memtable ->
flush (by rows or seconds) -> segment objects -> manifest commit recording the flushed seq
-> WAL truncate. Every manifest commit carries this writer's epoch; once a newer writer has
bumped the epoch, our commits fail with :class:`FencedError` and we stop accepting writes.

Locks, outermost first: ``_maint`` (one compaction / GC / restore at a time), ``_flush``
(one flush at a time), ``_commit`` (manifest + key index, held briefly), ``_lock``
(memtable, WAL, seqs, held per write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from index_runtime.crash import crash_point
from index_runtime.errors import (
    BackpressureError,
    ClosedError,
    ConflictError,
    DriftlessError,
    FencedError,
    InsufficientStorageError,
    InvalidInputError,
    NotFoundError,
    RestoreError,
    StorageFaultError,
)
from index_runtime.store.compaction import CompactionPolicy, plan_compaction
from index_runtime.store.keyindex import KeyIndex, SegmentDelta
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import (
    OBJECT_DIRS,
    IndexSpec,
    Manifest,
    SegmentInfo,
    expired_pins,
    manifest_key,
    plan_gc,
    referenced_objects,
    retire_unreferenced,
)
from index_runtime.store.objects import (
    ObjectStore,
    new_object_name,
    prefetch_segment,
    segment_source,
)
from index_runtime.store.passes import BackgroundPasses
from index_runtime.store.puts import BackgroundPuts
from index_runtime.store.rows import (
    Key,
    KeyType,
    Limits,
    RowBatch,
    concat_batches,
    dedupe_keys,
    key_array,
    split_by_tombstone,
    validate_keys,
    validate_upsert,
)
from index_runtime.store.segment import SegmentWriter, encode_segment_view, iter_segment
from index_runtime.store.versions import StoreObjects, restore_problem
from index_runtime.store.wal import Wal
from index_runtime.store.writable import StorageState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterConfig:
    flush_rows: int = 20_000  # flush once this many rows are pending
    flush_interval_s: float = 5.0  # ... or once the oldest pending row is this old
    bulk_rows: int = 4096  # a write this large skips the WAL: acknowledged once committed
    max_pending_rows: int = 200_000  # beyond this, writes get 429 (flushes are failing)
    max_wal_bytes: int = 4 << 30  # ... likewise for the WAL on disk
    retry_after_s: float = 1.0  # the hint given with a 429
    limits: Limits = field(default_factory=Limits)
    compaction: CompactionPolicy = field(default_factory=CompactionPolicy)
    gc_grace_s: float = 3600.0  # unreferenced objects live at least this long
    manifest_retention: int = 100  # old manifest versions kept for restore (pinned ones too)
    commit_attempts: int = 8

    def __post_init__(self) -> None:
        if self.flush_rows < 1 or self.max_pending_rows < self.flush_rows:
            raise ValueError("need 1 <= flush_rows <= max_pending_rows")
        if self.gc_grace_s < 0 or self.manifest_retention < 1:
            raise ValueError("gc_grace_s must be >= 0 and manifest_retention >= 1")


@dataclass(frozen=True)
class WriteAck:
    first_seq: int
    last_seq: int
    rows: int


@dataclass(frozen=True)
class CompactionReport:
    groups: int = 0
    input_segments: int = 0
    output_segments: int = 0
    rows_in: int = 0
    rows_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class GcReport:
    deleted_objects: int = 0
    deleted_manifests: int = 0
    deleted_pins: int = 0  # expired leases


@dataclass
class _Memtable:
    batches: list[RowBatch] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0

    def add(self, batch: RowBatch, now: float) -> None:
        if not self.batches:
            self.since = now
        self.batches.append(batch)
        self.rows += len(batch)


@dataclass
class _Rows:
    """(key, seq) pairs of physical rows, gathered batch by batch as arrays."""

    key_type: KeyType
    keys: list[Any] = field(default_factory=list)
    seqs: list[Any] = field(default_factory=list)

    def add(self, batch: RowBatch, mask: Any) -> None:
        if mask.any():
            self.keys.append(batch.keys[mask])
            self.seqs.append(batch.seqs[mask])

    def arrays(self) -> tuple[Any, Any]:
        if not self.keys:
            return key_array([], self.key_type), np.zeros(0, np.int64)
        keys = np.concatenate(self.keys)
        return keys.astype(object) if self.key_type == "str" else keys, np.concatenate(self.seqs)


@dataclass(frozen=True)
class _Output:
    """A segment written by compaction: its object key, rows and size."""

    key: str
    keys: Any
    seqs: Any
    nbytes: int


@dataclass(eq=False)  # compared by identity: it holds arrays
class _Group:
    """One compaction group in progress: its inputs, the outputs written so far (with their
    puts' futures), the rows it drops and what decides its tombstones."""

    inputs: list[SegmentInfo]
    key_type: KeyType
    outputs: list[_Output] = field(default_factory=list)
    puts: list[Future[None]] = field(default_factory=list)
    rows_in: int = 0
    dropped: _Rows = field(init=False)
    tomb_candidates: _Rows = field(init=False)
    tombstoned_rows: _Rows = field(init=False)  # keys of input rows whose winner was a tombstone

    def __post_init__(self) -> None:
        self.dropped = _Rows(self.key_type)
        self.tomb_candidates = _Rows(self.key_type)
        self.tombstoned_rows = _Rows(self.key_type)


def _apply_deltas(
    segments: Sequence[SegmentInfo], deltas: Mapping[int, SegmentDelta]
) -> list[SegmentInfo]:
    out = []
    for s in segments:
        d = deltas.get(s.id)
        out.append(
            s
            if d is None
            else replace(s, live=s.live + d.live, tombstones=s.tombstones + d.tombstones)
        )
    return out


class IndexWriter:
    """Owns one index's writes. Thread-safe. Use :meth:`open`."""

    def __init__(
        self,
        store: ObjectStore,
        wal_dir: str | Path,
        manifest: Manifest,
        config: WriterConfig,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.log = ManifestLog(store, config.commit_attempts)
        self.manifest = manifest
        self.spec: IndexSpec = manifest.index
        self.epoch = manifest.writer_epoch
        self.wal = Wal(wal_dir, self.spec.key_type, self.spec.dims)
        self._lock = threading.RLock()
        self._commit = threading.RLock()
        self._flush = threading.Lock()
        self._maint = threading.Lock()
        self._mem = _Memtable()
        self._frozen: list[_Memtable] = []
        self._next_seq = manifest.flushed_seq + 1
        self._index = KeyIndex(self.spec.key_type)
        self._index_stale = True
        self._stats_checked = False  # see _correct_stats
        self._inflight: set[str] = set()
        self._closed = False
        self._sealed = False  # set at the end of close(): no commit of any kind after it
        self._fenced: FencedError | None = None
        self.last_flush_error: DriftlessError | None = None
        # local-storage health: why writes are refused, and error counts for the metrics
        self.storage = StorageState()
        # set while the writer epoch could not be taken (full disk at open): no commits, no
        # WAL appends; reads go on; retried on the next write and by maybe_flush
        self._epoch_pending: DriftlessError | None = None
        self._epoch_retry_at = 0.0

    # opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: ObjectStore,
        wal_dir: str | Path,
        config: WriterConfig | None = None,
        *,
        create: IndexSpec | None = None,
        settings: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> IndexWriter:
        """Open (or with ``create``, create if absent) the index in ``store`` as its writer.

        Bumps the writer epoch, rebuilds the key index from the segments and replays the WAL
        entries above the flushed seq. ``settings`` (index settings as JSON) are recorded in the
        first manifest when the index is created.
        """
        config = config or WriterConfig()
        mlog = ManifestLog(store, config.commit_attempts)
        existing = mlog.latest()
        if existing is None:
            if create is None:
                raise NotFoundError(f"no index in {store.describe()}; create it first")
            first = Manifest(
                version=1,
                index=create,
                writer_epoch=0,
                flushed_seq=0,
                next_segment_id=1,
                committed_at=clock(),
                reason="create",
                settings=dict(settings or {}),
            )
            mlog.create(first)  # losing this race is fine: somebody created the same thing
        elif create is not None and (
            create.key_type != existing.index.key_type or create.dims != existing.index.dims
        ):
            raise InvalidInputError(
                f"index {existing.index.name!r} exists with key type {existing.index.key_type} and "
                f"models {existing.index.dims}; asked for {create.key_type} and {create.dims}"
            )
        try:
            manifest = mlog.bump_epoch()
            pending: DriftlessError | None = None
        except (InsufficientStorageError, StorageFaultError) as exc:
            # a full disk must not take reads down: open without the epoch, refuse writes
            # until it can be taken (no commit or WAL append happens before that)
            log.error("cannot take the writer epoch, writes are refused until it can: %s", exc)
            latest = mlog.latest()
            if latest is None:
                raise
            manifest, pending = latest, exc
        writer = cls(store, wal_dir, manifest, config, clock)
        writer._epoch_pending = pending
        if pending is not None:
            writer.storage.failed("epoch", pending)
        writer._rebuild_index()
        writer._replay_wal()
        return writer

    def _take_epoch(self) -> None:
        """Under ``_lock``: if the epoch is still pending, take it now (then the WAL opens).
        Raises the storage error that still prevents it."""
        if self._epoch_pending is None:
            return
        try:
            manifest = self.log.bump_epoch()
            self.wal.rotate(self._next_seq)
        except (InsufficientStorageError, StorageFaultError) as exc:
            self._epoch_pending = exc
            self.storage.failed("epoch", exc)
            raise type(exc)(f"the writer cannot take its epoch: {exc}") from exc
        # (no _commit here: it ranks above _lock; no commit runs while the epoch is pending)
        self.manifest, self.epoch = manifest, manifest.writer_epoch
        self._index_stale = True  # anything committed meanwhile is seen before a commit
        self._epoch_pending = None
        self.storage.recovered("epoch")
        self.storage.recovered("wal")
        log.info("writer epoch %d taken; writes are accepted again", self.epoch)

    def retry_epoch(self) -> bool:
        """Background retry (rate-limited to once a second) of a pending epoch. True if the
        writer can take writes."""
        if self._epoch_pending is None:
            return True
        now = time.monotonic()
        if now < self._epoch_retry_at:
            return False
        self._epoch_retry_at = now + 1.0
        with self._lock:
            try:
                self._take_epoch()
            except DriftlessError:
                return False
        return True

    def _build_index(self, segments: Sequence[SegmentInfo]) -> KeyIndex:
        return KeyIndex.build(
            self.spec.key_type,
            (
                (seg.id, batch)
                for seg in segments
                for batch in iter_segment(
                    segment_source(self.store, seg.key), self.spec.key_type, "keys"
                )
            ),
        )

    def _rebuild_index(self) -> None:
        with self._commit:
            self._index = self._build_index(self.manifest.segments)
            self._index_stale = False

    def _replay_wal(self) -> None:
        top = max([self.manifest.flushed_seq] + [s.max_seq for s in self.manifest.segments])
        replayed = 0
        for batch in self.wal.replay(self.manifest.flushed_seq):
            self._mem.add(batch, self.clock())
            top = max(top, int(batch.seqs.max()))
            replayed += len(batch)
        self._next_seq = top + 1
        if self._epoch_pending is None:
            try:
                self.wal.rotate(self._next_seq)
            except (InsufficientStorageError, StorageFaultError) as exc:
                # the WAL disk is full: serve reads; _take_epoch retries (bump + rotate)
                log.error("cannot open a WAL file, writes are refused until it can: %s", exc)
                self._epoch_pending = exc
                self.storage.failed("wal", exc)
        if replayed:
            log.info("replayed %d rows from the WAL", replayed)

    # writes ----------------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return self._mem.rows + sum(m.rows for m in self._frozen)

    def pending_batches(self) -> list[RowBatch]:
        """Acknowledged rows not yet in a committed segment, oldest first."""
        with self._lock:
            return [b for m in [*self._frozen, self._mem] for b in m.batches]

    def acknowledged_seq(self) -> int:
        """The highest seq acknowledged so far (pending or committed): a view that reaches it
        holds every acknowledged write."""
        with self._lock:
            tops = [int(m.batches[-1].seqs.max()) for m in [*self._frozen, self._mem] if m.batches]
            return max([self.manifest.flushed_seq, *tops])

    def _check_writable(self) -> None:
        if self._fenced is not None:
            raise FencedError(str(self._fenced))
        if self._closed:
            raise ClosedError("the writer is shutting down and accepts no more writes")
        self._take_epoch()
        if (
            self.pending_rows >= self.config.max_pending_rows
            or self.wal.bytes >= self.config.max_wal_bytes
        ):
            cause = (
                f" (last flush failed: {self.last_flush_error})" if self.last_flush_error else ""
            )
            raise BackpressureError(
                f"{self.pending_rows} rows wait for a flush{cause}; retry later",
                self.config.retry_after_s,
            )

    def upsert(
        self,
        keys: Sequence[object],
        vectors: Mapping[str, Any],
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> WriteAck:
        """Insert or replace rows. Returns once the rows are fsynced in the WAL."""
        return self._write(*self._validate(keys, vectors, texts, metadata), tombstone=False)

    def _validate(
        self,
        keys: Sequence[object],
        vectors: Mapping[str, Any],
        texts: Sequence[str | None] | None,
        metadata: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[list[Key], dict[str, np.ndarray], list[str | None] | None, list[str | None] | None]:
        return validate_upsert(
            keys,
            vectors,
            self.spec.dims,
            self.spec.write_models,
            self.spec.key_type,
            self.config.limits,
            texts,
            metadata,
        )

    def delete(self, keys: Sequence[object]) -> WriteAck:
        """Delete rows by key (a tombstone each). Deleting an absent key is not an error."""
        ks = dedupe_keys(validate_keys(keys, self.spec.key_type, self.config.limits))
        return self._write(ks, {}, None, None, tombstone=True)

    def _write(
        self,
        ks: list[Key],
        mats: dict[str, np.ndarray],
        texts: list[str | None] | None,
        meta: list[str | None] | None,
        tombstone: bool,
    ) -> WriteAck:
        n = len(ks)

        def make_batch(first: int) -> RowBatch:
            return RowBatch(
                seqs=np.arange(first, first + n, dtype=np.int64),
                keys=key_array(ks, self.spec.key_type),
                tombstone=np.full(n, tombstone),
                vectors=mats,
                texts=texts,
                metadata=meta,
            )

        if n < self.config.bulk_rows:
            with self._lock:
                ack = self._append_locked(make_batch, n, tombstone)
            self.maybe_flush()
            return ack
        # Bulk path: the batch becomes a segment of its own, committed together with
        # everything pending; it is acknowledged once the manifest commit is durable.
        with self._flush:
            with self._lock:
                self._check_writable()
                if not tombstone:
                    self._check_models(mats)
                first = self._next_seq
                self._next_seq += n
                self._freeze_memtable()
            self._flush_locked(extra=make_batch(first))
        return WriteAck(first, first + n - 1, n)

    def _append_locked(
        self, make_batch: Callable[[int], RowBatch], n: int, tombstone: bool
    ) -> WriteAck:
        """Under ``_lock``: check, log in the WAL (fsync) and add to the memtable ``n`` rows
        built by ``make_batch(first_seq)``."""
        self._check_writable()
        first = self._next_seq
        batch = make_batch(first)
        if not tombstone:
            self._check_models(batch.vectors)
        try:
            self.wal.append(batch)  # raises 507/503: nothing applied, no seq consumed
        except (InsufficientStorageError, StorageFaultError) as exc:
            self.storage.failed("wal", exc)
            raise
        self.storage.recovered("wal")
        self._next_seq += n
        self._mem.add(batch, self.clock())
        return WriteAck(first, first + n - 1, n)

    def _check_models(self, mats: Mapping[str, np.ndarray]) -> None:
        """Under ``_lock``: the rows still carry every required model (the spec may have
        changed since they were validated: a model migration started or ended)."""
        missing = [m for m in self.spec.write_models if m not in mats]
        if missing:
            raise ConflictError(
                f"the index now requires vectors for {list(self.spec.write_models)} "
                f"(a model migration changed it); retry the write"
            )

    def upsert_unchanged(
        self,
        keys: Sequence[object],
        expected_seqs: Sequence[int],
        vectors: Mapping[str, Any],
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> tuple[WriteAck | None, int]:
        """Rewrite rows only where the key's winning seq is still ``expected_seqs[i]`` (the
        backfill's compare-and-set: a row written meanwhile is newer and is left alone).
        Returns the acknowledgement (None if nothing was written) and the rows skipped."""
        ks, mats, txt, meta = self._validate(keys, vectors, texts, metadata)
        if len(ks) != len(keys) or len(expected_seqs) != len(ks):
            raise InvalidInputError("a conditional rewrite needs distinct keys, one seq each")
        if len(ks) >= self.config.bulk_rows:
            raise InvalidInputError(
                f"a conditional rewrite takes under {self.config.bulk_rows} rows"
            )
        with self._commit, self._lock:
            self._check_writable()
            self._ensure_index()
            current = self._winner_seqs(ks)
            keep = [i for i, k in enumerate(ks) if current.get(k) == int(expected_seqs[i])]
            if not keep:
                return None, len(ks)
            idx = np.array(keep, np.int64)
            n = len(keep)

            def make_batch(first: int) -> RowBatch:
                return RowBatch(
                    seqs=np.arange(first, first + n, dtype=np.int64),
                    keys=key_array([ks[i] for i in keep], self.spec.key_type),
                    tombstone=np.zeros(n, bool),
                    vectors={m: v[idx] for m, v in mats.items()},
                    texts=None if txt is None else [txt[i] for i in keep],
                    metadata=None if meta is None else [meta[i] for i in keep],
                )

            ack = self._append_locked(make_batch, n, tombstone=False)
        self.maybe_flush()
        return ack, len(ks) - n

    def _winner_seqs(self, ks: Sequence[Key]) -> dict[Key, int]:
        """Under ``_commit`` and ``_lock``: the winning seq of each key (pending rows first,
        then the committed segments); absent keys are left out."""
        want = set(ks)
        out: dict[Key, int] = {}
        for m in [*self._frozen, self._mem]:
            for b in m.batches:
                for k, s in zip(b.keys.tolist(), b.seqs.tolist(), strict=True):
                    if k in want and s > out.get(k, -1):
                        out[k] = s
        rest = [k for k in want if k not in out]
        committed = self._index.lookup(rest)
        for k, seq, rows in zip(rest, committed.seq.tolist(), committed.rows.tolist(), strict=True):
            if rows:
                out[k] = seq
        return out

    def maybe_flush(self) -> None:
        """Flush if enough rows wait or the oldest waits too long. Store outages are absorbed:
        the rows stay in the WAL and writes get 429 once the bounds are reached. A pending
        writer epoch (full disk at open) is retried here too."""
        if not self.retry_epoch():
            return
        with self._lock:
            due = self.pending_rows >= self.config.flush_rows or (
                self._mem.rows > 0
                and self.clock() - self._mem.since >= self.config.flush_interval_s
            )
        if not due or not self._flush.acquire(blocking=False):
            return
        try:
            self._flush_locked()
        except (DriftlessError, OSError) as exc:
            # the rows are durable in the WAL: a failed flush never fails the write that
            # triggered it; it is retried, and the bounds above turn into 429 meanwhile
            log.warning("flush failed, will retry: %s", exc)
        finally:
            self._flush.release()

    # flush -----------------------------------------------------------------------------------

    def flush(self) -> Manifest | None:
        """Write every pending row into segments and commit them. Returns the new manifest."""
        with self._flush:
            return self._flush_locked()

    def _freeze_memtable(self) -> None:
        """Under ``_lock``: pending rows move to a frozen memtable; the WAL starts a new file."""
        if self._mem.rows:
            self._frozen.append(self._mem)
            self._mem = _Memtable()
            self.wal.rotate(self._next_seq)

    def _flush_locked(self, extra: RowBatch | None = None) -> Manifest | None:
        """Under ``_flush``: write frozen rows (and a bulk batch) as segments and commit."""
        with self._lock:
            self._take_epoch()
            self._freeze_memtable()
            frozen = list(self._frozen)
        pending = [b for m in frozen for b in m.batches]
        if self._index_stale:
            # an earlier commit failed ambiguously (it may have landed): never flush twice
            try:
                with self._commit:
                    self._ensure_index()
                    done = self.manifest.flushed_seq
            except DriftlessError as exc:  # a failing flush too (S3 cut: it fails right here)
                self._flush_failed(exc)
                raise
            pending = [b.take(np.flatnonzero(b.seqs > done)) for b in pending if b.seqs[-1] > done]
        if not pending and extra is None:
            with self._lock:
                del self._frozen[: len(frozen)]
                self.wal.truncate_upto(self.manifest.flushed_seq)
            return None
        parts: list[RowBatch] = []
        if pending:
            parts = split_by_tombstone(concat_batches(pending, self.spec.key_type, self.spec.dims))
        if extra is not None:
            parts += split_by_tombstone(extra)  # its seqs are above every pending one
        upto = max(int(p.seqs.max()) for p in parts)
        written: list[tuple[str, RowBatch, int]] = []
        started: list[str] = []  # every key put, also one whose put failed (may be stored)
        try:
            for part in parts:
                data = encode_segment_view(part, self.spec.key_type, self.spec.dims)
                key = new_object_name("segments", ".arrow")
                self._inflight.add(key)
                started.append(key)
                self.store.put(key, data)
                written.append((key, part, len(data)))
            crash_point("flush.segment_put")
            manifest = self._commit_new_segments(written, upto)
        except DriftlessError as exc:
            self._flush_failed(exc)
            raise
        finally:
            # a failed put is no longer in flight: its object, if stored, is GC's orphan
            self._inflight.difference_update(started)
        self.last_flush_error = None
        self.storage.recovered("flush")
        crash_point("flush.committed")
        with self._lock:
            del self._frozen[: len(frozen)]
            self.wal.truncate_upto(upto)
        return manifest

    def _flush_failed(self, exc: DriftlessError) -> None:
        self.last_flush_error = exc
        self.storage.failed("flush", exc)  # (local disk or object store)

    def _commit_new_segments(self, written: list[tuple[str, RowBatch, int]], upto: int) -> Manifest:
        with self._commit:
            self._ensure_index()
            base = self.manifest
            first_id = base.next_segment_id
            deltas: dict[int, SegmentDelta] = {}
            new: list[SegmentInfo] = []
            for i, (key, part, nbytes) in enumerate(written):
                seg_id = first_id + i
                for sid, d in self._index.add_segment(seg_id, part).items():
                    acc = deltas.setdefault(sid, SegmentDelta())
                    acc.live += d.live
                    acc.tombstones += d.tombstones
                new.append(
                    SegmentInfo(
                        seg_id,
                        key,
                        len(part),
                        0,
                        0,
                        int(part.seqs.min()),
                        int(part.seqs.max()),
                        nbytes,
                    )
                )

            def edit(m: Manifest) -> Manifest:
                if m.next_segment_id != first_id:
                    raise FencedError("the manifest moved under this writer's epoch")
                return replace(
                    m,
                    segments=tuple(_apply_deltas([*m.segments, *new], deltas)),
                    next_segment_id=first_id + len(new),
                    flushed_seq=max(m.flushed_seq, upto),
                )

            return self._commit_edit(base, edit, "flush")

    def _commit_edit(
        self, base: Manifest, edit: Callable[[Manifest], Manifest], reason: str
    ) -> Manifest:
        """Commit under ``_commit``; on any failure the in-memory key index is rebuilt lazily.
        After :meth:`close` nothing commits (a thread that outlived shutdown gets ClosedError)."""
        if self._sealed:
            raise ClosedError(f"the writer is closed; {reason} was not committed")
        if self._epoch_pending is not None:  # never commit under the previous writer's epoch
            raise type(self._epoch_pending)(f"no writer epoch yet: {self._epoch_pending}")
        try:
            manifest = self.log.commit(base, edit, self.epoch, reason)
        except FencedError as exc:
            self._fenced = exc
            self._index_stale = True
            raise
        except BaseException:
            self._index_stale = True
            raise
        self.manifest = manifest
        return manifest

    def _ensure_index(self) -> None:
        if self._index_stale:
            latest = self.log.latest()
            if latest is not None and latest.writer_epoch != self.epoch:
                self._fenced = FencedError(
                    f"writer epoch {self.epoch} was superseded by {latest.writer_epoch}"
                )
                raise self._fenced
            if latest is not None:
                self.manifest = latest
            self._rebuild_index()

    # compaction ------------------------------------------------------------------------------

    def compact(
        self, gc: bool = True, should_stop: Callable[[], bool] | None = None
    ) -> CompactionReport:
        """Merge small segments and rewrite those with many deleted rows, keeping seqs.

        Streams: holds one input record batch and one output segment in memory at a time.
        Writes never wait for it, except for brief key-index checks between batches.

        Groups are pipelined: a group's outputs are put (written and fsynced) on the I/O
        thread while the next group's rows are read and written; the group is committed once
        its own puts have finished, before the next group decides which tombstones it keeps
        (so that decision sees the committed group, as if the groups ran one after another).
        A failure anywhere commits nothing more: a group is published only if every one of its
        puts returned; outputs of an uncommitted group are orphans for GC.

        With ``gc``, a GC pass runs on a background thread after each commit but the last
        (deleting the objects the commits retired, by GC's usual rules, while the next groups
        are built), and one more pass runs once every group is committed; the call returns
        after both. A crash in between leaves retired objects that the next GC deletes.
        """
        with self._maint:
            with self._commit:
                self._ensure_index()
                if not self._stats_checked:
                    self._correct_stats()
                groups = plan_compaction(self.manifest.segments, self.config.compaction)
            report = CompactionReport()
            uncommitted: list[_Group] = []  # at most two: one being read, one being put
            stopped = False
            try:
                with (
                    BackgroundPasses(self._gc_locked, "driftless-compaction-gc") as gc_passes,
                    BackgroundPuts(self.store.put, "driftless-compaction-put") as puts,
                ):
                    pending: _Group | None = None
                    for ids in groups:
                        if should_stop is not None and should_stop():  # shutdown: between groups
                            stopped = True
                            break
                        group = self._read_group(ids, puts, uncommitted)
                        if pending is not None:  # its puts ran while ``group`` was read
                            report = self._commit_group(pending, puts, report, uncommitted)
                            if gc:  # unlink what it retired while the next groups are built
                                gc_passes.request()
                        self._cut_tombstones(group, puts)
                        pending = group
                    if pending is not None:
                        report = self._commit_group(pending, puts, report, uncommitted)
            finally:  # outputs of groups not committed: orphans for GC
                self._inflight.difference_update(o.key for g in uncommitted for o in g.outputs)
            if stopped:
                return report
            if groups:
                crash_point("compaction.committed")
            if gc:
                self._gc_locked()
            return report

    def _correct_stats(self) -> None:
        """Under ``_commit``, once per writer: make the manifest's per-segment statistics agree
        with the key index. Manifests written before needed and dead tombstones were told
        apart count every winning tombstone as needed, so compaction would never drop them."""
        stats = self._index.stats_by_segment()

        def fixed(segments: Sequence[SegmentInfo]) -> tuple[SegmentInfo, ...]:
            zero = SegmentDelta()
            return tuple(
                replace(
                    s,
                    live=stats.get(s.id, zero).live,
                    tombstones=stats.get(s.id, zero).tombstones,
                )
                for s in segments
            )

        if fixed(self.manifest.segments) != self.manifest.segments:
            self._commit_edit(
                self.manifest, lambda m: replace(m, segments=fixed(m.segments)), "stats"
            )
        self._stats_checked = True

    def _read_group(
        self, ids: tuple[int, ...], puts: BackgroundPuts, uncommitted: list[_Group]
    ) -> _Group:
        """Read a group's inputs, write its kept rows as outputs (submitted to ``puts``) and
        gather the rows it drops and its tombstone candidates. The group is added to
        ``uncommitted`` before its first put."""
        idset = set(ids)
        kt = self.spec.key_type
        g = _Group(
            sorted((s for s in self.manifest.segments if s.id in idset), key=lambda s: s.min_seq),
            kt,
        )
        uncommitted.append(g)
        kept = _Rows(kt)
        writer = SegmentWriter(kt, self.spec.dims)
        for i, seg in enumerate(g.inputs):
            if i + 1 < len(g.inputs):  # the disk reads it while this one is worked on
                prefetch_segment(self.store, g.inputs[i + 1].key)
            for batch in iter_segment(segment_source(self.store, seg.key), kt, "all"):
                g.rows_in += len(batch)
                with self._commit:
                    fate = self._index.classify(batch.keys, batch.seqs)
                g.tombstoned_rows.add(batch, fate.key_tombstoned)
                g.dropped.add(batch, fate.drop)
                g.tomb_candidates.add(batch, fate.tomb)
                kept.add(batch, fate.keep)
                if fate.keep.any():
                    writer.write(batch.take(np.flatnonzero(fate.keep)))
                if writer.nbytes >= self.config.compaction.target_bytes:
                    self._cut(g, puts, writer, kept)
                    kept = _Rows(kt)
                    writer = SegmentWriter(kt, self.spec.dims)
        if writer.rows:
            self._cut(g, puts, writer, kept)
        return g

    def _cut(self, g: _Group, puts: BackgroundPuts, w: SegmentWriter, rows: _Rows) -> None:
        data = w.finish()
        key = new_object_name("segments", ".arrow")
        self._inflight.add(key)  # GC keeps it until the group is committed (or abandoned)
        keys, seqs = rows.arrays()
        g.outputs.append(_Output(key, keys, seqs, len(data)))
        g.puts.append(puts.submit(key, data))

    def _cut_tombstones(self, g: _Group, puts: BackgroundPuts) -> None:
        """Decide which of the group's winning tombstones must stay (one may go only if every
        row of its key is among the inputs) and write those as one more output."""
        kt = self.spec.key_type
        cand_keys, cand_seqs = g.tomb_candidates.arrays()
        with self._commit:
            needed = self._index.tombstones_needed(
                cand_keys, cand_seqs, g.tombstoned_rows.arrays()[0]
            )
        g.dropped.keys.append(cand_keys[~needed])
        g.dropped.seqs.append(cand_seqs[~needed])
        if needed.any():
            tombs = SegmentWriter(kt, self.spec.dims)
            tombs.write(
                RowBatch(
                    seqs=cand_seqs[needed],
                    keys=cand_keys[needed],
                    tombstone=np.ones(int(needed.sum()), bool),
                )
            )
            self._cut(g, puts, tombs, _Rows(kt, [cand_keys[needed]], [cand_seqs[needed]]))

    def _commit_group(
        self, g: _Group, puts: BackgroundPuts, report: CompactionReport, uncommitted: list[_Group]
    ) -> CompactionReport:
        # each put fsynced its object's bytes, then (after the rename) its directory: once
        # these waits return, every object the commit references is durable (or this raises
        # and nothing is committed)
        puts.wait_for(g.puts)
        crash_point("compaction.output_put")
        self._commit_compaction(g.inputs, g.outputs, g.dropped)
        # the manifest references the outputs now; the group's row arrays can go
        uncommitted.remove(g)
        self._inflight.difference_update(o.key for o in g.outputs)
        return CompactionReport(
            groups=report.groups + 1,
            input_segments=report.input_segments + len(g.inputs),
            output_segments=report.output_segments + len(g.outputs),
            rows_in=report.rows_in + g.rows_in,
            rows_out=report.rows_out + sum(len(o.seqs) for o in g.outputs),
            bytes_in=report.bytes_in + sum(s.bytes for s in g.inputs),
            bytes_out=report.bytes_out + sum(o.nbytes for o in g.outputs),
        )

    def _commit_compaction(
        self, inputs: list[SegmentInfo], outputs: list[_Output], dropped: _Rows
    ) -> None:
        input_ids = {s.id for s in inputs}
        with self._commit:
            self._ensure_index()
            base = self.manifest
            first_id = base.next_segment_id
            # dropping old rows can leave a tombstone outside the group shadowing nothing: it
            # becomes dead in its segment's statistics (and the next round drops it)
            deltas: dict[int, SegmentDelta] = {}
            self._index.remove_rows(*dropped.arrays(), deltas)
            new: list[SegmentInfo] = []
            for i, out in enumerate(outputs):
                seg_id = first_id + i
                counts = self._index.move_winners(out.keys, out.seqs, seg_id)
                new.append(
                    SegmentInfo(
                        seg_id, out.key, len(out.seqs), counts.live, counts.tombstones,
                        int(out.seqs.min()), int(out.seqs.max()), out.nbytes,
                    )
                )
            now = self.clock()

            def edit(m: Manifest) -> Manifest:
                if m.next_segment_id != first_id or not input_ids <= {s.id for s in m.segments}:
                    raise FencedError("the manifest moved under this writer's epoch")
                rest = _apply_deltas([s for s in m.segments if s.id not in input_ids], deltas)
                out = replace(
                    m,
                    segments=tuple(rest) + tuple(new),
                    next_segment_id=first_id + len(new),
                )
                return retire_unreferenced(m, out, now)  # inputs and their index files

            self._commit_edit(base, edit, "compaction")

    # index state -----------------------------------------------------------------------------

    def commit_edit(self, edit: Callable[[Manifest], Manifest], reason: str) -> Manifest:
        """Commit an edit of the index state (codebooks, index files, serving, settings) with
        this writer's epoch. The edit must not touch segments or seqs; it is re-applied to the
        newest manifest if another commit of ours landed first."""
        with self._commit:
            self._ensure_index()
            return self._commit_edit(self.manifest, edit, reason)

    def change_spec(self, edit: Callable[[Manifest], Manifest], reason: str) -> Manifest:
        """Commit an edit that changes the index spec (which models are stored and required:
        a model migration starting, cutting over or rolling back). Writes wait meanwhile, so
        every row is checked and logged under one spec."""
        with self._commit, self._lock:
            self._ensure_index()
            manifest = self._commit_edit(self.manifest, edit, reason)
            self.spec = manifest.index
            self.wal.dims = dict(self.spec.dims)
            return manifest

    # garbage collection ----------------------------------------------------------------------

    def gc(self) -> GcReport:
        """Delete objects unreferenced for the grace period and not pinned; prune old manifests."""
        with self._maint:
            return self._gc_locked()

    def _gc_locked(self) -> GcReport:
        now = self.clock()
        stored_pins = self.log.read_pins()
        pins = [
            p.pin for p in stored_pins.values() if p.pin is not None and p.pin.expires_at > now
        ]
        pinned: list[Manifest] = []
        for p in pins:
            try:
                pinned.append(self.log.load(p.manifest_version))
            except NotFoundError:
                log.warning(
                    "pin %s holds manifest %d, which no longer exists", p.holder, p.manifest_version
                )
        listed = {o.key: o.mtime for d in OBJECT_DIRS for o in self.store.list(d + "/")}
        with self._commit:  # a flush's object is either in the manifest or in flight here
            # after a commit that failed ambiguously, plan from the manifest that landed: the
            # stale one lacks the objects that commit referenced (its flush's segment left the
            # in-flight set when the commit raised), and GC deleted them (data loss)
            self._ensure_index()
            current = self.manifest
            inflight = set(self._inflight)
        plan = plan_gc(current, pinned, listed, inflight, now, self.config.gc_grace_s)
        for i, key in enumerate(plan.delete):
            if i:
                crash_point("gc.between_deletes")
            self.store.delete(key)
        if plan.forget:
            forget = set(plan.forget)
            with self._commit:
                self._commit_edit(
                    self.manifest,
                    lambda m: replace(
                        m, retired=tuple(r for r in m.retired if r.key not in forget)
                    ),
                    "gc",
                )
        # leases of holders that died (never renewed): expired for the grace period
        deleted_pins = sum(
            self.log.delete_pin_if_unchanged(key, stored_pins[key].data)
            for key in expired_pins(stored_pins, now, self.config.gc_grace_s)
        )
        deleted_manifests = 0
        versions = self.log.versions()
        keep = set(versions[-self.config.manifest_retention :]) | {p.manifest_version for p in pins}
        for v in versions:
            if v not in keep and v < self.manifest.version:
                self.store.delete(manifest_key(v))
                deleted_manifests += 1
        return GcReport(len(plan.delete), deleted_manifests, deleted_pins)

    # restore ---------------------------------------------------------------------------------

    def restore(self, version: int) -> Manifest:
        """Make the index what manifest ``version`` describes, as a new version.

        Pending writes are flushed first (and thereby undone by the restore, as asked). The
        restored rows keep their seqs; later writes get higher ones and win over them.
        Refused (:class:`RestoreError`, 409) if the version's objects were already
        garbage-collected or it describes another index layout.
        """
        with self._maint:
            self.flush()
            old = self.log.load(version)
            problem = restore_problem(old, self.spec, StoreObjects(self.store))
            if problem:
                raise RestoreError(problem)
            with self._commit:
                index = self._build_index(old.segments)
                stats = index.stats_by_segment()
                segs = tuple(
                    replace(
                        s,
                        live=stats.get(s.id, SegmentDelta()).live,
                        tombstones=stats.get(s.id, SegmentDelta()).tombstones,
                    )
                    for s in old.segments
                )
                keep = referenced_objects(old)
                now = self.clock()

                def edit(m: Manifest) -> Manifest:
                    out = replace(
                        m,
                        segments=segs,
                        codebooks=old.codebooks,
                        index_files=old.index_files,
                        serving=old.serving,
                        next_codebook=max(m.next_codebook, old.next_codebook),
                        retired=tuple(r for r in m.retired if r.key not in keep),
                        restores=m.restores + 1,
                    )
                    return retire_unreferenced(m, out, now)

                manifest = self._commit_edit(self.manifest, edit, f"restore-{version}")
                self._index = index
                self._index_stale = False
                return manifest

    # shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting writes, flush what is pending, close the WAL. Idempotent.

        If the flush fails (store down), the rows stay in the WAL for the next writer.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._fenced is None:
                self.flush()
        except DriftlessError as exc:
            log.warning("close: pending rows stay in the WAL: %s", exc)
        finally:
            with self._commit:  # waits for a commit in progress; none starts after this
                self._sealed = True
            with self._lock:
                self.wal.close()
