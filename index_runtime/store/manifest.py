"""The manifest: the single source of truth of one index's data plane (pure, no I/O).

A manifest version is an immutable JSON object ``manifests/<version:020d>.json``. It lists the
live segments with their row statistics, the objects retired by compaction (kept until their
grace period has passed), the writer epoch that wrote it and the highest flushed seq.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from index_runtime.contract import MigrationRecord
from index_runtime.errors import CorruptObjectError, FormatVersionError, InvalidInputError
from index_runtime.store.rows import KeyType

MANIFEST_FORMAT_VERSION = 3  # 2 added codebooks, index files, serving, settings; 3 migration
MANIFEST_DIR = "manifests/"
LATEST_HINT = "manifests/_latest"
PIN_DIR = "pins/"
SEGMENT_DIR = "segments"
CODEBOOK_DIR = "codebooks"
INDEX_FILE_DIR = "indexfiles"
ADAPTER_DIR = "adapters"
OBJECT_DIRS = (SEGMENT_DIR, CODEBOOK_DIR, INDEX_FILE_DIR, ADAPTER_DIR)
METRICS = ("cosine", "ip", "l2")


def manifest_key(version: int) -> str:
    return f"{MANIFEST_DIR}{version:020d}.json"


def parse_manifest_key(key: str) -> int | None:
    name = key[len(MANIFEST_DIR) :] if key.startswith(MANIFEST_DIR) else ""
    if name.endswith(".json") and name[:-5].isdigit():
        return int(name[:-5])
    return None


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if not 1 <= self.dim <= 65536:
            raise InvalidInputError(f"model dimension must be 1..65536, got {self.dim}")
        if self.metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {METRICS}, got {self.metric!r}")


@dataclass(frozen=True)
class IndexSpec:
    """What an index holds: its key type and the models whose vectors it stores."""

    name: str
    key_type: KeyType
    models: Mapping[str, ModelSpec]
    write_models: tuple[str, ...]  # models every upsert must carry a vector for

    def __post_init__(self) -> None:
        if self.key_type not in ("int", "str"):
            raise InvalidInputError(f"key_type must be 'int' or 'str', got {self.key_type!r}")
        if not self.models:
            raise InvalidInputError("an index needs at least one model")
        for m in self.write_models:
            if m not in self.models:
                raise InvalidInputError(f"write model {m!r} is not among the index's models")

    @property
    def dims(self) -> dict[str, int]:
        return {m: s.dim for m, s in self.models.items()}

    @staticmethod
    def single(
        name: str, model: str, dim: int, key_type: KeyType = "str", metric: str = "cosine"
    ) -> IndexSpec:
        return IndexSpec(name, key_type, {model: ModelSpec(dim, metric)}, (model,))


@dataclass(frozen=True)
class SegmentInfo:
    id: int
    key: str  # object key
    rows: int
    live: int  # rows that are the winning version of their key and not tombstones
    tombstones: int  # tombstone rows still needed (they shadow older rows elsewhere)
    min_seq: int
    max_seq: int
    bytes: int

    @property
    def dead(self) -> int:
        """Rows any compaction of this segment drops: superseded versions and tombstones that
        shadow nothing (see store/keyindex.py)."""
        return self.rows - self.live - self.tombstones

    @property
    def deleted_ratio(self) -> float:
        """Share of rows that are dead (needed tombstones are not: they must be kept)."""
        return self.dead / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Retired:
    key: str
    retired_at: float  # seconds since the epoch


@dataclass(frozen=True)
class Codebook:
    """A trained, empty primary index (FAISS IVF-PQ), stored as one object."""

    version: int
    model: str
    key: str  # object key of the serialized FAISS index
    nlist: int
    m: int
    nbits: int
    coarse: str  # "flat" | "hnsw"
    trained_rows: int  # live rows of the index when it was trained
    sample_rows: int  # vectors the codebook was trained on
    trained_at: float


@dataclass(frozen=True)
class IndexFile:
    """One segment's rows encoded with one codebook (built once, read by every replica)."""

    segment_id: int
    codebook: int
    key: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    version: int
    index: IndexSpec
    writer_epoch: int
    flushed_seq: int  # every seq <= this is in a segment listed here (or was compacted away)
    next_segment_id: int
    segments: tuple[SegmentInfo, ...] = ()
    retired: tuple[Retired, ...] = ()
    committed_at: float = 0.0
    reason: str = ""
    codebooks: tuple[Codebook, ...] = ()  # the serving one and at most one candidate
    index_files: tuple[IndexFile, ...] = ()
    serving: int = 0  # codebook version of the primary that serves; 0 = the shadow serves
    next_codebook: int = 1
    settings: Mapping[str, Any] = field(default_factory=dict)  # index settings (JSON)
    # the model migration's record (JSON): models, phase, strategy table, the selected
    # strategy and its adapter object ("adapter_key"); {} when none ran
    migration: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT_VERSION
    # restores committed so far: a restore brings back rows with old seqs, so state a view
    # derives incrementally by seq (the shadow graph) is rebuilt when this changes
    restores: int = 0

    @property
    def live_rows(self) -> int:
        return sum(s.live for s in self.segments)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def next(self, **changes: Any) -> Manifest:
        """The manifest one version later with ``changes`` applied, in this build's format.
        (``ManifestLog.commit`` does the same for every commit: a manifest read in an older
        format is written back in the current one.)"""
        return replace(
            self, version=self.version + 1, format_version=MANIFEST_FORMAT_VERSION, **changes
        )

    def codebook(self, version: int) -> Codebook | None:
        return next((c for c in self.codebooks if c.version == version), None)

    @property
    def candidate(self) -> Codebook | None:
        """The newest codebook that does not serve (being validated), if any."""
        others = [c for c in self.codebooks if c.version != self.serving]
        return max(others, key=lambda c: c.version) if others else None

    def files_of(self, codebook: int) -> dict[int, IndexFile]:
        return {f.segment_id: f for f in self.index_files if f.codebook == codebook}


def referenced_objects(m: Manifest) -> set[str]:
    """Object keys the manifest needs to exist: segments, codebooks, index files, and every
    object the migration's record names (pairs, fitted adapters, the selected adapter, the
    evaluation queries; a record that ended names none)."""
    rec = MigrationRecord.from_json(m.migration)
    return (
        {s.key for s in m.segments}
        | {c.key for c in m.codebooks}
        | {f.key for f in m.index_files}
        | set(rec.object_keys if rec is not None else ())
    )


def retire_unreferenced(old: Manifest, new: Manifest, now: float) -> Manifest:
    """``new`` with every object ``old`` referenced and ``new`` does not added to ``retired``,
    and index files of segments or codebooks ``new`` no longer lists dropped first."""
    segs = {s.id for s in new.segments}
    books = {c.version for c in new.codebooks}
    files = tuple(f for f in new.index_files if f.segment_id in segs and f.codebook in books)
    new = replace(new, index_files=files)
    keep = referenced_objects(new)
    already = {r.key for r in new.retired}
    gone = sorted(referenced_objects(old) - keep - already)
    return replace(new, retired=new.retired + tuple(Retired(k, now) for k in gone))


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({int, str, float, bool, type(None)})


def _plain(v: Any) -> Any:
    """``v`` as JSON-ready values: dataclasses as dicts of their fields, tuples as lists,
    mappings as dicts (what ``asdict`` gives, without its deep copies: a commit encodes every
    segment's entry, so at thousands of segments ``asdict`` and the indenting encoder were
    most of a bulk write's CPU)."""
    t = type(v)
    if t in _SCALARS:
        return v
    names = _FIELD_NAMES.get(t)
    if names is None and is_dataclass(v) and not isinstance(v, type):
        names = _FIELD_NAMES[t] = tuple(f.name for f in fields(v))
    if names is not None:
        out = {}
        for n in names:
            x = getattr(v, n)
            out[n] = x if type(x) in _SCALARS else _plain(x)
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def encode_manifest(m: Manifest) -> bytes:
    # compact separators: json's C encoder (an indent falls back to the pure-Python one)
    return json.dumps(_plain(m), sort_keys=True, separators=(",", ":")).encode()


def decode_manifest(data: bytes) -> Manifest:
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptObjectError(f"manifest is not valid JSON: {exc}") from None
    version = d.get("format_version")
    if not isinstance(version, int):
        raise CorruptObjectError("manifest has no format_version")
    if version > MANIFEST_FORMAT_VERSION or version < 1:
        raise FormatVersionError(
            f"manifest format_version {version} is not supported by this build "
            f"(it reads versions 1..{MANIFEST_FORMAT_VERSION}); upgrade Driftless"
        )
    try:
        idx = d["index"]
        spec = IndexSpec(
            name=idx["name"],
            key_type=idx["key_type"],
            models={k: ModelSpec(**v) for k, v in idx["models"].items()},
            write_models=tuple(idx["write_models"]),
        )
        return Manifest(
            version=d["version"],
            index=spec,
            writer_epoch=d["writer_epoch"],
            flushed_seq=d["flushed_seq"],
            next_segment_id=d["next_segment_id"],
            segments=tuple(SegmentInfo(**s) for s in d["segments"]),
            retired=tuple(Retired(**r) for r in d["retired"]),
            committed_at=d["committed_at"],
            reason=d["reason"],
            codebooks=tuple(Codebook(**c) for c in d.get("codebooks", ())),
            index_files=tuple(IndexFile(**f) for f in d.get("index_files", ())),
            serving=d.get("serving", 0),
            next_codebook=d.get("next_codebook", 1),
            settings=d.get("settings", {}),
            migration=d.get("migration", {}),
            format_version=version,
            restores=d.get("restores", 0),
        )
    except (KeyError, TypeError) as exc:
        raise CorruptObjectError(f"manifest is missing or has a malformed field: {exc}") from None


@dataclass(frozen=True)
class Pin:
    """A lease that keeps the objects of one manifest version alive (reader, migration...)."""

    holder: str
    manifest_version: int
    expires_at: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def decode(data: bytes) -> Pin:
        try:
            return Pin(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise CorruptObjectError(f"malformed pin: {exc}") from None


@dataclass(frozen=True)
class StoredPin:
    """A pin object as read from the store: the lease (None if unreadable), its mtime and
    its bytes (to delete it only if unchanged)."""

    pin: Pin | None
    mtime: float
    data: bytes = b""


def expired_pins(pins: Mapping[str, StoredPin], now: float, grace_s: float) -> tuple[str, ...]:
    """Pin objects to delete (pure): leases expired for at least ``grace_s``, and unreadable
    pin objects older than ``grace_s`` (they pin nothing: GC ignores them). A lease that has
    not expired is never among them."""
    out = []
    for key, p in pins.items():
        if p.pin is not None:
            if now - p.pin.expires_at >= max(grace_s, 0.0):
                out.append(key)
        elif now - p.mtime >= grace_s:
            out.append(key)
    return tuple(sorted(out))


def pin_key(holder: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in holder)
    return f"{PIN_DIR}{safe}.json"


@dataclass(frozen=True)
class GcPlan:
    delete: tuple[str, ...]  # objects to delete now
    forget: tuple[str, ...] = field(default=())  # retired entries to drop from the manifest


def plan_gc(
    current: Manifest,
    pinned: list[Manifest],
    listed: Mapping[str, float],  # every segment object in the store -> mtime
    inflight: set[str],
    now: float,
    grace_s: float,
) -> GcPlan:
    """Which objects may be deleted (pure).

    An object is deleted only if no current or pinned manifest references it, no write of
    this process is in flight on it, and it has been unreferenced for ``grace_s``: retired
    objects count from their retirement, orphans (written but never committed, e.g. by a
    crash) from their modification time.
    """
    keep = referenced_objects(current) | inflight
    for p in pinned:
        keep |= referenced_objects(p)
    retired = {r.key: r.retired_at for r in current.retired}
    delete: list[str] = []
    forget: list[str] = []
    for key, retired_at in retired.items():
        if key in keep or now - retired_at < grace_s:
            continue
        forget.append(key)
        if key in listed:
            delete.append(key)
    for key, mtime in listed.items():
        if key in keep or key in retired:
            continue
        if now - mtime >= grace_s:
            delete.append(key)
    return GcPlan(tuple(sorted(delete)), tuple(sorted(forget)))
