"""Readers: load the live rows of one manifest version, optionally pinned against GC."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import Manifest, Pin
from index_runtime.store.objects import ObjectStore, segment_source
from index_runtime.store.rows import Key, KeyType, RowBatch, concat_batches
from index_runtime.store.segment import iter_segment


@dataclass
class LiveRows:
    """The winning, non-deleted version of every key, as columns."""

    rows: RowBatch

    def __len__(self) -> int:
        return len(self.rows)

    def as_dict(self) -> dict[Key, tuple[dict[str, tuple[float, ...]], str | None, str | None]]:
        """key -> (vectors by model, text, metadata JSON); for tests and small tools."""
        out = {}
        r = self.rows
        for i, key in enumerate(r.keys.tolist()):
            vecs = {m: tuple(v[i].tolist()) for m, v in r.vectors.items() if not np.isnan(v[i, 0])}
            out[key] = (
                vecs,
                None if r.texts is None else r.texts[i],
                None if r.metadata is None else r.metadata[i],
            )
        return out


def resolve_live(batches: Iterable[RowBatch], key_type: KeyType, dims: dict[str, int]) -> LiveRows:
    """Highest seq per key wins; keys whose winner is a tombstone are left out."""
    allrows = concat_batches(list(batches), key_type, dims)
    best: dict[Key, tuple[int, int]] = {}
    for i, (key, seq) in enumerate(zip(allrows.keys.tolist(), allrows.seqs.tolist(), strict=True)):
        prev = best.get(key)
        if prev is None or seq > prev[0]:
            best[key] = (seq, i)
    idx = np.array(sorted(i for _, i in best.values()), dtype=np.int64)
    winners = allrows.take(idx)
    return LiveRows(winners.take(np.flatnonzero(~winners.tombstone)))


def load_segments(store: ObjectStore, manifest: Manifest) -> list[RowBatch]:
    out: list[RowBatch] = []
    for seg in manifest.segments:
        out.extend(iter_segment(segment_source(store, seg.key), manifest.index.key_type))
    return out


class Snapshot:
    """One manifest version and its live rows. With ``holder``, a pin keeps its objects from GC
    until :meth:`release` (or until the lease expires if the holder dies)."""

    def __init__(
        self, store: ObjectStore, manifest: Manifest, live: LiveRows, holder: str | None
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.live = live
        self.holder = holder

    @classmethod
    def open(
        cls,
        store: ObjectStore,
        version: int | None = None,
        *,
        holder: str | None = None,
        lease_s: float = 600.0,
        extra_rows: Iterable[RowBatch] = (),
    ) -> Snapshot:
        mlog = ManifestLog(store)
        manifest = mlog.load(version) if version is not None else mlog.latest()
        if manifest is None:
            from index_runtime.errors import NotFoundError

            raise NotFoundError(f"no index in {store.describe()}")
        if holder is not None:
            holder = f"{holder}-{uuid.uuid4().hex[:8]}"
            mlog.put_pin(Pin(holder, manifest.version, time.time() + lease_s))
        batches = load_segments(store, manifest) + list(extra_rows)
        live = resolve_live(batches, manifest.index.key_type, manifest.index.dims)
        return cls(store, manifest, live, holder)

    def release(self) -> None:
        if self.holder is not None:
            ManifestLog(self.store).drop_pin(self.holder)
            self.holder = None
