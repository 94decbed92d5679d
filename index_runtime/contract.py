"""The contract between the runtime and the operator (PURE data, no I/O).

Ports, health paths, the command line of every role and Job, their exit codes and the
environment variable names. The operator's builders read these values; the runtime's CLI
implements them; ``tests/unit/test_contract.py`` checks that both sides agree (every command the
builders emit parses with the runtime's own argument parser, every path answers).
"""

from __future__ import annotations

import dataclasses
import operator
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

HTTP_PORT = 8080  # the API, the admin API and /metrics of every runtime pod
PORT_NAME = "http"
LIVENESS_PATH = "/healthz"  # the process serves HTTP
READINESS_PATH = "/readyz"  # ...and is not shutting down
METRICS_PATH = "/metrics"
STATUS_PATH = "/v1/indexes/{index}/status"
EXECUTABLE = "driftless"

WAL_DIR = "/var/lib/driftless/wal"  # the writer's PersistentVolumeClaim
TMP_DIR = "/tmp"  # an emptyDir: the root filesystem is read-only
VECTOR_CACHE_DIR = "/var/cache/driftless/vectors"  # readers with vectors: mmap (an emptyDir)
LABELLED_DIR = "/etc/driftless/labelled"  # the migration gate's labelled queries (ConfigMap)
LABELLED_FILE = "queries.json"


class Role(StrEnum):
    WRITER = "writer"
    READER = "reader"
    SHADOW = "shadow"


class JobKind(StrEnum):
    """One-off work the operator runs as Kubernetes Jobs (``driftless job <kind>``)."""

    TRAIN = "train"  # train a candidate codebook (the lifecycle validates it)
    COMPACT = "compact"  # merge segments, drop deleted rows, regenerate the shadow graph
    MIGRATE = "migrate"  # the migration gate: sample pairs, fit adapters, measure, decide
    BACKFILL = "backfill"  # re-encode every row with the new model (resumable)
    PURGE = "purge"  # delete an index's stored objects (reclaim policy Delete)


class Scope(StrEnum):
    """What a bearer token may do. ``admin`` covers every scope and ``write`` covers ``read``;
    ``mirror`` (readers sending sampled queries to the shadow) covers nothing else."""

    READ = "read"  # search, fetch, scan, count, status, list/describe indexes
    WRITE = "write"  # upsert, delete, create and delete an index
    ADMIN = "admin"  # train, promote, discard, compact, settings, migrations, restore, reload
    MIRROR = "mirror"  # POST .../internal/samples (reader -> shadow)


TOKENS_DIR = "/etc/driftless/tokens"  # a mounted Secret: the token hashes a pod accepts
TOKENS_FILE = "tokens"  # lines '<scope> sha256:<hex>' (or '<scope> <token>' on a laptop)


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # may heal: the Job's pod is retried (backoffLimit)
    INVALID = 2  # bad configuration or input: retrying cannot help (podFailurePolicy FailJob)
    CONFLICT = 3  # the runtime refused in its current state (e.g. another migration runs)


class Env(StrEnum):
    """Environment variables the runtime reads. Credentials never appear here by value: the
    S3 keys are the standard AWS variables, filled from a Secret by reference."""

    # Tokens (values from Secrets, never argv). The server accepts what TOKENS_FILE lists and
    # any *_TOKEN value below for its scope; clients present ADMIN_TOKEN (Jobs -> writer)
    # or SHADOW_TOKEN (readers -> shadow, a mirror-scope token).
    TOKENS_FILE = "DRIFTLESS_TOKENS_FILE"
    # the router's own pass over coordinated migrations of a sharded index, every this many
    # seconds (default 2; 0: off, cutovers only on request)
    ROUTER_PASS_S = "DRIFTLESS_ROUTER_PASS_S"
    READ_TOKEN = "DRIFTLESS_READ_TOKEN"
    WRITE_TOKEN = "DRIFTLESS_WRITE_TOKEN"
    ADMIN_TOKEN = "DRIFTLESS_ADMIN_TOKEN"
    MIRROR_TOKEN = "DRIFTLESS_MIRROR_TOKEN"
    SHADOW_TOKEN = "DRIFTLESS_SHADOW_TOKEN"
    WRITER_URL = "DRIFTLESS_WRITER_URL"  # Jobs talk to the writer's admin API
    SHADOW_URL = "DRIFTLESS_SHADOW_URL"  # readers mirror sampled queries here
    INDEX = "DRIFTLESS_INDEX"
    JOB_SPEC = "DRIFTLESS_JOB_SPEC"  # JSON options of a Job (e.g. the migration's)
    LABELLED_FILE = "DRIFTLESS_LABELLED_FILE"  # the gate's labelled queries (a mounted file)
    ENCODERS = "DRIFTLESS_ENCODERS"  # JSON {model name: encoder spec}
    S3_BUCKET = "DRIFTLESS_S3_BUCKET"
    S3_PREFIX = "DRIFTLESS_S3_PREFIX"
    S3_ENDPOINT = "DRIFTLESS_S3_ENDPOINT"
    S3_REGION = "DRIFTLESS_S3_REGION"
    OMP_THREADS = "OMP_NUM_THREADS"
    MKL_THREADS = "MKL_NUM_THREADS"
    JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in Indexed Jobs
    # the distributed backfill (an Indexed Job; the share is JOB_COMPLETION_INDEX)
    BACKFILL_SHARES = "DRIFTLESS_BACKFILL_SHARES"  # how many shares the rows are split into
    MIGRATION_ID = "DRIFTLESS_MIGRATION_ID"  # the migration a backfill pod works for
    BACKFILL_STALL_S = (
        "DRIFTLESS_BACKFILL_STALL_S"  # exit non-zero after this long without progress
    )
    # the query log (VectorIndex spec.queryLog; index_runtime.querylog): off unless "1"
    QUERY_LOG = "DRIFTLESS_QUERY_LOG"
    QUERY_LOG_RATE = "DRIFTLESS_QUERY_LOG_RATE"  # share of text queries kept, 0..1
    QUERY_LOG_MAX = "DRIFTLESS_QUERY_LOG_MAX"  # distinct texts kept at most
    QUERY_LOG_RETENTION_S = "DRIFTLESS_QUERY_LOG_RETENTION_S"  # seconds a text is kept at most
    # where readers keep raw vectors (`serve --vectors`): "memory" (default) or "mmap", read
    # from memory-mapped segment copies in VECTOR_CACHE_DIR, at most VECTOR_CACHE_BYTES of them
    VECTORS = "DRIFTLESS_VECTORS"
    VECTOR_CACHE_DIR = "DRIFTLESS_VECTOR_CACHE_DIR"
    VECTOR_CACHE_BYTES = "DRIFTLESS_VECTOR_CACHE_BYTES"
    # a sharded index (index_runtime.shards): the router (`driftless route`) is given every
    # shard's writer and reader URL, comma-separated in shard order; a shard's runtime pods
    # read their storage prefix from S3_PREFIX (shards.shard_prefix) like any pod
    SHARD_WRITERS = "DRIFTLESS_SHARD_WRITERS"
    SHARD_READERS = "DRIFTLESS_SHARD_READERS"


def serve_command(role: Role) -> list[str]:
    """The command line of a runtime pod: storage, tokens and URLs come from the environment
    (``Env``); the maintenance loop is off because the operator decides."""
    args = [EXECUTABLE, "serve", "--from-env", "--role", role.value]
    args += ["--host", "0.0.0.0", "--port", str(HTTP_PORT), "--maintenance", "off"]
    if role is Role.WRITER:
        args += ["--wal-dir", WAL_DIR]
    return args


def route_command() -> list[str]:
    """The command line of a sharded index's router pods: the shards' URLs, the index and
    the tokens come from the environment (``Env.SHARD_WRITERS``, ``Env.SHARD_READERS``,
    ``Env.INDEX``, the token variables)."""
    return [EXECUTABLE, "route", "--from-env", "--host", "0.0.0.0", "--port", str(HTTP_PORT)]


def job_command(kind: JobKind) -> list[str]:
    """The command line of a Job; its options come from ``Env.JOB_SPEC``."""
    return [EXECUTABLE, "job", kind.value]


def thread_count(cpu_limit_millicores: int | None) -> int:
    """OpenMP threads for a container: its CPU limit rounded down, at least 1 (more threads
    than cores made FAISS searches several times slower on 2 cores)."""
    if not cpu_limit_millicores:
        return 1
    return max(1, cpu_limit_millicores // 1000)


# the distributed backfill ----------------------------------------------------------------------


def canonical_key(key: Any) -> bytes:
    """A row key's canonical UTF-8 form: an int as its decimal digits (``7`` and ``np.int64(7)``
    alike), a string as itself. Booleans are not keys."""
    if isinstance(key, str):
        return key.encode("utf-8", "surrogatepass")
    if isinstance(key, bool):
        raise TypeError("a key is an int or a str, not a bool")
    return str(operator.index(key)).encode()  # any integer type (numpy's too) as decimal


def share_of(key: Any, shares: int) -> int:
    """The backfill share (0..shares-1) a row belongs to: crc32 of its canonical key, modulo
    ``shares``. Stable across processes, versions and platforms (workers and the writer agree)."""
    if shares < 1:
        raise ValueError(f"shares must be >= 1, got {shares}")
    return zlib.crc32(canonical_key(key)) % shares


def record_id(rec: Mapping[str, Any]) -> str:
    """A migration record's identity: its ``id``; a record written before ids existed is named
    by its target and start time (stable for that record, distinct from the next one's)."""
    rid = rec.get("id")
    return str(rid) if rid else f"{rec.get('to', '')}@{rec.get('started_at', '')}"


# --- the model migration's record (the manifest's ``migration`` dict) ---------------------------
# Both the runtime (its runner, status, endpoints) and the operator read the record through
# :class:`MigrationRecord`; nobody reads its keys as strings. Pure stdlib: the operator image has
# no pydantic. The phase names are :data:`index_runtime.migration.PHASES` (the same tuple).

MIGRATION_PHASES = (
    "Pending",  # dual writes committed; the gate has not sampled yet
    "SamplingPairs",
    "TrainingAdapter",
    "Evaluating",
    "Bridged",  # the gate's selected strategy serves
    "Backfilling",
    "Backfilled",  # every row re-encoded; the cutover waits (manual, NativeWorse, no text)
    "CuttingOver",
    "Succeeded",
    "Failed",
    "RolledBack",
)
MIGRATION_TERMINAL = ("Succeeded", "Failed", "RolledBack")
# phases in which the index dual-writes (every phase before the migration ends)
MIGRATION_ACTIVE = MIGRATION_PHASES[: MIGRATION_PHASES.index("Succeeded")]
METRICS = ("cosine", "ip", "l2")


@dataclass(frozen=True)
class MigrationTarget:
    """The new model's vector space: its dimension and metric (carried to the cutover)."""

    dim: int
    metric: str = "cosine"

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "metric": self.metric}


@dataclass(frozen=True)
class MigrationPause:
    """Why the migration's runner waits (not a phase: the phase says where it resumes).
    ``permanent``: only an operator's resume request clears it (e.g. the encoder rejects the
    model); otherwise the runner retries by itself."""

    reason: str  # CamelCase, e.g. EncoderFailed
    message: str
    at: float
    permanent: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "at": self.at,
            "permanent": self.permanent,
        }


@dataclass(frozen=True)
class MigrationGuard:
    """The progressive merge's guard across backfill checkpoints (``migration.guard_step``):
    whether the merge served after the last checkpoint, how often what serves changed
    (``flips``, this migration) and how many checkpoints decided. A record without it (an
    earlier release) starts from its ``merge.serves`` with no flips."""

    serves: bool = False
    flips: int = 0
    checkpoints: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"serves": self.serves, "flips": self.flips, "checkpoints": self.checkpoints}

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> MigrationGuard | None:
        if not isinstance(d, Mapping):
            return None
        return MigrationGuard(
            bool(d.get("serves", False)), int(d.get("flips") or 0), int(d.get("checkpoints") or 0)
        )


# keys with a typed field; every other key of a stored record is kept in ``extra`` untouched
_RECORD_KEYS = (
    "id", "from", "to", "target", "phase", "paused", "started_at", "updated_at", "finished_at",
    "options", "labelled_key", "pairs_key", "fitted", "adapter_key", "eval_key", "calibration", "strategies", "selected",
    "metric", "reason", "backfill", "merge", "curve", "cutover", "error",
    "guard",
)  # fmt: skip


@dataclass(frozen=True)
class MigrationRecord:
    """One model migration as the manifest stores it. ``from_json`` accepts records of the
    previous release (no ``id``, no ``target``, no ``paused``); ``to_json`` writes only the
    keys that are set, plus every unknown key it read (``extra``), so a round trip loses
    nothing. Objects it names (``pairs_key``, ``adapter_key``, ``eval_key``) are kept by GC
    while ``active``."""

    id: str = ""
    from_model: str = ""
    to_model: str = ""
    target: MigrationTarget | None = None
    phase: str = "Pending"
    paused: MigrationPause | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    labelled_key: str | None = None  # the request's labelled queries (an object)
    pairs_key: str | None = None
    fitted: Mapping[str, str] = field(default_factory=dict)  # adapter name -> object (gate)
    adapter_key: str | None = None
    eval_key: str | None = None
    calibration: Mapping[str, Any] | None = None
    strategies: tuple[Mapping[str, Any], ...] = ()
    selected: str | None = None
    metric: str | None = None
    reason: str = ""
    backfill: Mapping[str, Any] | None = None
    merge: Mapping[str, Any] | None = None
    curve: tuple[Mapping[str, Any], ...] = ()
    cutover: Mapping[str, Any] | None = None
    error: str | None = None
    guard: MigrationGuard | None = None  # None: a record of an earlier release
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.phase in MIGRATION_ACTIVE

    @property
    def terminal(self) -> bool:
        return self.phase in MIGRATION_TERMINAL

    @property
    def object_keys(self) -> tuple[str, ...]:
        """The stored objects the record names (GC keeps them while the record is active)."""
        named = (
            self.labelled_key,
            self.pairs_key,
            *self.fitted.values(),
            self.adapter_key,
            self.eval_key,
        )
        return tuple(k for k in named if k)

    @property
    def guard_state(self) -> MigrationGuard:
        """The guard's persisted state (an earlier release's record: its ``merge.serves``)."""
        if self.guard is not None:
            return self.guard
        return MigrationGuard(serves=bool((self.merge or {}).get("serves", False)))

    @property
    def kept_merged(self) -> bool:
        """The migration ended keeping both models, serving their merge (cutover policy
        ``keep_merged: if_better``); the index stores and encodes both until a later
        migration or a cutover request drops the old model."""
        return self.phase == "Succeeded" and bool((self.cutover or {}).get("merged"))

    @property
    def backfill_mode(self) -> str:
        return str(self.options.get("backfill_mode", "internal"))

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> MigrationRecord | None:
        """The record, or None for an empty dict (no migration ever ran)."""
        if not d:
            return None
        t = d.get("target")
        p = d.get("paused")
        fin = d.get("finished_at")
        return MigrationRecord(
            id=str(d.get("id") or ""),
            from_model=str(d.get("from") or ""),
            to_model=str(d.get("to") or ""),
            target=(
                MigrationTarget(int(t["dim"]), str(t.get("metric", "cosine")))
                if isinstance(t, Mapping) and "dim" in t
                else None
            ),
            phase=str(d.get("phase") or "Pending"),
            paused=(
                MigrationPause(
                    str(p.get("reason", "Paused")),
                    str(p.get("message", "")),
                    float(p.get("at", 0.0)),
                    bool(p.get("permanent", True)),
                )
                if isinstance(p, Mapping)
                else None
            ),
            started_at=float(d.get("started_at") or 0.0),
            updated_at=float(d.get("updated_at") or d.get("started_at") or 0.0),
            finished_at=None if fin is None else float(fin),
            options=dict(d.get("options") or {}),
            labelled_key=d.get("labelled_key") or None,
            pairs_key=d.get("pairs_key") or None,
            fitted={str(k): str(v) for k, v in (d.get("fitted") or {}).items()},
            adapter_key=d.get("adapter_key") or None,
            eval_key=d.get("eval_key") or None,
            calibration=d.get("calibration") or None,
            strategies=tuple(d.get("strategies") or ()),
            selected=d.get("selected"),
            metric=d.get("metric"),
            reason=str(d.get("reason") or ""),
            backfill=d.get("backfill") or None,
            merge=d.get("merge") or None,
            curve=tuple(d.get("curve") or ()),
            cutover=d.get("cutover") or None,
            error=d.get("error"),
            guard=MigrationGuard.from_json(d.get("guard")),
            extra={k: v for k, v in d.items() if k not in _RECORD_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "id": self.id,
                "from": self.from_model,
                "to": self.to_model,
                "phase": self.phase,
                "started_at": self.started_at,
                "updated_at": self.updated_at,
                "options": dict(self.options),
            }
        )
        optional: dict[str, Any] = {
            "target": self.target.to_json() if self.target else None,
            "paused": self.paused.to_json() if self.paused else None,
            "finished_at": self.finished_at,
            "labelled_key": self.labelled_key,
            "pairs_key": self.pairs_key,
            "fitted": dict(self.fitted) or None,
            "adapter_key": self.adapter_key,
            "eval_key": self.eval_key,
            "calibration": dict(self.calibration) if self.calibration else None,
            "strategies": [dict(s) for s in self.strategies] or None,
            "selected": self.selected,
            "metric": self.metric,
            "reason": self.reason or None,
            "backfill": dict(self.backfill) if self.backfill else None,
            "merge": dict(self.merge) if self.merge else None,
            "curve": [dict(c) for c in self.curve] or None,
            "cutover": dict(self.cutover) if self.cutover else None,
            "error": self.error,
            "guard": self.guard.to_json() if self.guard else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.paused is None:
            out["paused"] = None  # explicit: a resume cleared it
        return out

    def replace(self, **changes: Any) -> MigrationRecord:
        return dataclasses.replace(self, **changes)
