"""Which manifest versions an index can be restored to (the listing is pure; one I/O edge).

A version is restorable if it describes the same index layout (key type, models and their
dimensions) as the current one and every object it references (segments, codebooks, index
files, a migration's adapter) still exists: GC deletes objects once no retained manifest
needs them, so old versions become unrestorable as compaction and GC proceed.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from index_runtime.errors import NotFoundError
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import OBJECT_DIRS, IndexSpec, Manifest, referenced_objects
from index_runtime.store.objects import ObjectStore


@dataclass(frozen=True)
class VersionInfo:
    version: int
    committed_at: float  # seconds since the epoch
    reason: str  # what committed it: flush, compaction, restore-<v>, ...
    rows: int  # stored rows (live, tombstones and dead)
    live: int  # rows a reader sees
    segments: int
    restorable: bool
    problem: str  # why it is not restorable ("" when it is)
    current: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def restore_problem(m: Manifest, current: IndexSpec, existing: Container[str]) -> str:
    """Why ``m`` cannot be restored over an index of spec ``current`` ("" if it can). Names
    the first missing object."""
    if m.index.key_type != current.key_type or m.index.dims != current.dims:
        return (
            f"manifest {m.version} describes a different index layout (key type "
            f"{m.index.key_type}, models {m.index.dims}; now {current.key_type}, {current.dims})"
        )
    missing = sorted(k for k in referenced_objects(m) if k not in existing)
    if missing:
        return (
            f"manifest {m.version} references {len(missing)} objects that were already "
            f"garbage-collected (first: {missing[0]}); pick a newer version"
        )
    return ""


def list_versions(
    manifests: Iterable[Manifest], existing: Container[str], current: Manifest
) -> list[VersionInfo]:
    """Every given version, newest first, with its counts and whether it can be restored."""
    out = []
    for m in sorted(manifests, key=lambda m: m.version, reverse=True):
        problem = restore_problem(m, current.index, existing)
        out.append(
            VersionInfo(
                version=m.version,
                committed_at=m.committed_at,
                reason=m.reason,
                rows=sum(s.rows for s in m.segments),
                live=m.live_rows,
                segments=len(m.segments),
                restorable=not problem,
                problem=problem,
                current=m.version == current.version,
            )
        )
    return out


class StoreObjects:
    """``key in StoreObjects(store)`` asks the store (one request per object referenced)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.store.exists(key)


def read_versions(store: ObjectStore, current: Manifest) -> list[VersionInfo]:
    """The retained versions of the index in ``store`` (I/O: one listing of the manifests and
    of the object directories, one read per manifest)."""
    mlog = ManifestLog(store)
    manifests = []
    for v in mlog.versions():
        try:
            manifests.append(mlog.load(v))
        except NotFoundError:
            continue  # pruned meanwhile
    existing = {o.key for d in OBJECT_DIRS for o in store.list(d + "/")}
    return list_versions(manifests, existing, current)
