"""The contract between the runtime and the operator (PURE data, no I/O).

Ports, health paths, the command line of every role and Job, their exit codes and the
environment variable names. The operator's builders read these values; the runtime's CLI
implements them; ``tests/unit/test_contract.py`` checks that both sides agree (every command the
builders emit parses with the runtime's own argument parser, every path answers).
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Mapping
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
    BACKFILL_STALL_S = "DRIFTLESS_BACKFILL_STALL_S"  # exit non-zero after this long without progress


def serve_command(role: Role) -> list[str]:
    """The command line of a runtime pod: storage, tokens and URLs come from the environment
    (``Env``); the maintenance loop is off because the operator decides."""
    args = [EXECUTABLE, "serve", "--from-env", "--role", role.value]
    args += ["--host", "0.0.0.0", "--port", str(HTTP_PORT), "--maintenance", "off"]
    if role is Role.WRITER:
        args += ["--wal-dir", WAL_DIR]
    return args


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
