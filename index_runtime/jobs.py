"""``driftless job <kind>``: the one-off work the operator runs as Kubernetes Jobs.

Training, compaction, the migration gate and the backfill need the writer (its key index, its
commit lock, its epoch), so these Jobs drive the writer's admin API: each starts an operation
(202 with an id at once) and polls it until it ends, with short, retried HTTP calls; the work
itself has no HTTP timeout. Kubernetes then sees the work (Job status, retries with backoff, a
deadline) and the operator stays non-blocking. Purge works on the object store directly (the index's pods are gone).
Exit codes follow :class:`index_runtime.contract.ExitCode`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from index_runtime.contract import Env, ExitCode, JobKind

if TYPE_CHECKING:
    from index_runtime.store.objects import ObjectStore

log = logging.getLogger(__name__)

GATE_DONE = ("Bridged", "Backfilling", "Backfilled", "Succeeded", "Failed", "RolledBack")
BACKFILL_DONE = ("Backfilled", "CuttingOver", "Succeeded", "Failed", "RolledBack")


class JobError(Exception):
    def __init__(self, code: ExitCode, message: str, http_status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status  # the writer's answer, when it gave one


class Admin:
    """The writer's HTTP API, as a Job sees it (stdlib HTTP: the Job image needs nothing more).

    Each call has a short timeout (``timeout_s``): long work never runs inside one HTTP call,
    it is started as an operation and polled. Calls are retried with exponential backoff
    (``retries`` times, from ``backoff_s``, honouring ``Retry-After``) when the writer is
    unreachable or answers 429/502/503/504; other answers are final."""

    RETRY_STATUS = (429, 502, 503, 504)

    def __init__(
        self,
        url: str,
        index: str,
        token: str,
        timeout_s: float = 10.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = f"{url.rstrip('/')}/v1/indexes/{index}"
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, path, body)
            except _Retry as exc:
                if attempt == self.retries:
                    raise JobError(ExitCode.FAILED, str(exc)) from exc
                wait = max(delay, exc.retry_after_s)
                log.info("%s; retrying in %.1f s", exc, wait)
                self.sleep(wait)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            what = f"{method} {path}: HTTP {exc.code} {detail}"
            if exc.code in self.RETRY_STATUS:
                raise _Retry(what, float(exc.headers.get("Retry-After") or 0)) from exc
            invalid = (400, 401, 403, 404)  # a retried pod would get the same answer
            code = {c: ExitCode.INVALID for c in invalid}.get(
                exc.code, ExitCode.CONFLICT if exc.code == 409 else ExitCode.FAILED
            )
            raise JobError(code, what, exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:  # unreachable, reset, timed out
            raise _Retry(f"{method} {path}: {exc}", 0.0) from exc

    def status(self) -> dict[str, Any]:
        return dict(self.call("GET", "/status"))

    def operation(self, op_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/admin/operations/{op_id}"))


class _Retry(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def wait_for(
    admin: Admin, done: Callable[[dict[str, Any]], bool], poll_s: float, timeout_s: float
) -> dict[str, Any]:
    """Poll the writer's status until ``done`` (a Job's own deadline bounds it in a cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = admin.status()
        if done(st):
            return st
        if time.monotonic() > deadline:
            raise JobError(ExitCode.FAILED, f"timed out after {timeout_s:.0f} s")
        time.sleep(poll_s)


def wait_operation(
    poll: Callable[[], dict[str, Any]],
    poll_s: float,
    timeout_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll an operation until it leaves ``running``; returns it when it succeeded.

    Liveness is the writer answering that the operation still runs (each poll is a short
    call with its own retries), not the length of the work: a compaction may take hours. A
    failed operation raises with its reason; an unknown one (404: the writer restarted and
    lost it) raises FAILED so the Job is retried and starts it again; ``timeout_s`` bounds
    the whole wait (the Job's deadline in a cluster)."""
    deadline = clock() + timeout_s
    while True:
        op = poll()
        if op["state"] == "succeeded":
            return op
        if op["state"] == "failed":
            err = op.get("error") or {}
            raise JobError(
                ExitCode.FAILED,
                f"{op['kind']} failed: {err.get('reason', '?')}: {err.get('message', '')}",
            )
        if clock() > deadline:
            raise JobError(
                ExitCode.FAILED,
                f"{op['kind']} still running after {timeout_s:.0f} s (progress {op['progress']})",
            )
        sleep(poll_s)


def _start_and_wait(
    admin: Admin, path: str, body: Mapping[str, Any] | None, poll_s: float, timeout_s: float
) -> dict[str, Any]:
    """Start a long operation (202 with its id; a running one of the same kind is joined)
    and wait for it."""
    return _wait_started(
        admin, admin.call("POST", path, body if body is not None else {}), poll_s, timeout_s
    )


def _wait_started(
    admin: Admin, started: Mapping[str, Any], poll_s: float, timeout_s: float
) -> dict[str, Any]:
    op_id = str(started["operation"])
    if not started.get("started", True):
        log.info("joined the running %s operation %s", started.get("kind"), op_id)
    try:
        return wait_operation(lambda: admin.operation(op_id), poll_s, timeout_s)
    except JobError as exc:
        if exc.http_status == 404:  # the writer restarted: the Job's retry starts it again
            raise JobError(ExitCode.FAILED, f"operation {op_id} was lost: {exc}") from exc
        raise


def _record(st: Mapping[str, Any]) -> dict[str, Any]:
    return dict((st.get("migration") or {}).get("record") or {})


def _reached(rec: Mapping[str, Any], done: tuple[str, ...]) -> bool:
    """Whether the migration reached one of ``done``. A sharded index's record (merged by
    its router from the shards') lists every shard: each must be this migration's and have
    reached it (the merged phase is the least advanced shard's, and ``Mixed`` once a shard
    failed: then the others' gates must still end)."""
    shards = rec.get("shards")
    if isinstance(shards, list) and shards:
        return all(
            isinstance(s, Mapping) and s.get("id") == rec.get("id") and s.get("phase") in done
            for s in shards
        )
    return rec.get("phase") in done


def _per_shard(started: Any) -> bool:
    """A sharded index's router answered the start: one answer per shard (each shard's own
    operation, which the router does not poll), no operation of its own."""
    return isinstance(started, Mapping) and "shards" in started and "operation" not in started


def run_train(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    op = _start_and_wait(admin, "/admin/train", None, poll_s, timeout_s)
    return f"candidate codebook {op['result'].get('codebook', '?')} trained"


def run_compact(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    r = _start_and_wait(admin, "/admin/compact", None, poll_s, timeout_s)["result"]
    return f"compacted {r['input_segments']} segments into {r['output_segments']}"


def _migration_ended(admin: Admin, op_error: JobError | None, done: tuple[str, ...]) -> dict[str, Any]:
    """After the migration's operation ended: its record, if it reached one of ``done`` (a
    gate that failed is a finished gate: the record says why); else the operation's error."""
    rec = _record(admin.status())
    if rec.get("phase") in done:
        return rec
    raise op_error or JobError(ExitCode.FAILED, f"the migration stopped in phase {rec.get('phase')}")


def run_migrate(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    body = {**spec, "backfill": False, "cutover": "manual"}  # the operator drives the rest
    path = os.environ.get(Env.LABELLED_FILE)
    labelled = Path(path) if path else None
    if labelled is not None:
        try:
            body["labelled"] = json.loads(labelled.read_text())
        except (OSError, ValueError) as exc:
            raise JobError(ExitCode.INVALID, f"{labelled}: unreadable labelled queries ({exc})") from exc
    rec = _record(admin.status())
    finished = ("Succeeded", "Failed", "RolledBack")  # an earlier migration's record
    # a sharded index (its router merges the shards' records) is always asked again: the
    # same id is idempotent on every shard, and completes a start that reached only some
    running = rec.get("phase") not in (None, *finished) and not rec.get("shards")
    if running and rec.get("to") == spec.get("to_model"):
        log.info("the migration to %s was already started (a retried pod)", rec["to"])
        st = wait_for(admin, lambda s: _reached(_record(s), GATE_DONE), poll_s, timeout_s)
        rec = _record(st)
    else:
        rec = _migration_step(admin, "/admin/migrations", body, GATE_DONE, poll_s, timeout_s)
    return f"gate finished: phase {rec['phase']}, selected {rec.get('selected')}"


def _migration_step(
    admin: Admin,
    path: str,
    body: Mapping[str, Any] | None,
    done: tuple[str, ...],
    poll_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Run one migration operation to its end; a failure that may heal still reads the
    record (the migration's own phase says how it ended)."""
    error = None
    try:
        started = admin.call("POST", path, body if body is not None else {})
        if _per_shard(started):  # a sharded index's router: the shards' merged record says
            log.info(
                "started on %d shards (migration %s)", len(started["shards"]), started.get("id")
            )
            st = wait_for(admin, lambda s: _reached(_record(s), done), poll_s, timeout_s)
            return _record(st)
        _wait_started(admin, started, poll_s, timeout_s)
    except JobError as exc:
        if exc.code is not ExitCode.FAILED:
            raise
        error = exc
    return _migration_ended(admin, error, done)


def run_backfill(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    rec = _record(admin.status())
    if rec.get("phase") not in BACKFILL_DONE:  # starts, or resumes after a restart
        path = "/admin/migrations/backfill"
        rec = _migration_step(admin, path, None, BACKFILL_DONE, poll_s, timeout_s)
    bf = rec.get("backfill") or {}
    return (
        f"backfill finished: phase {rec['phase']}, {bf.get('backfilled')} of {bf.get('live')} rows"
    )


def run_purge(index: str) -> str:
    from index_runtime.store.objects import S3Config, S3Store

    bucket = os.environ.get(Env.S3_BUCKET)
    if not bucket or not index:
        raise JobError(ExitCode.INVALID, f"purge needs {Env.S3_BUCKET} and {Env.INDEX}")
    base = os.environ.get(Env.S3_PREFIX, "").strip("/")
    prefix = f"{base}/{index}" if base else index
    store = S3Store(
        S3Config(
            bucket,
            prefix,
            os.environ.get(Env.S3_ENDPOINT) or None,
            os.environ.get(Env.S3_REGION) or None,
        )
    )
    return f"deleted {purge_store(store)} objects under s3://{bucket}/{prefix}/"


def purge_store(store: ObjectStore) -> int:
    """Delete every object of one index (the purge Job and ``DELETE /v1/indexes/{name}``).
    Manifests go first, newest first, so an interrupted purge leaves no index that opens on
    missing segments: it is simply gone, and a purge retried finishes the rest."""
    from index_runtime.store.manifest import MANIFEST_DIR

    objects = store.list("")
    order = sorted(objects, key=lambda o: (not o.key.startswith(MANIFEST_DIR), _neg(o.key)))
    for o in order:
        store.delete(o.key)
    return len(objects)


def _neg(key: str) -> tuple[int, ...]:
    return tuple(-b for b in key.encode())


RUNNERS = {
    JobKind.TRAIN: run_train,
    JobKind.COMPACT: run_compact,
    JobKind.MIGRATE: run_migrate,
    JobKind.BACKFILL: run_backfill,
}


def run_job(kind: JobKind, env: Mapping[str, str], poll_s: float = 1.0) -> int:
    """Run one Job from its environment; returns the exit code (and prints one line)."""
    index = env.get(Env.INDEX, "")
    try:
        spec = json.loads(env.get(Env.JOB_SPEC) or "{}")
        if not isinstance(spec, dict):
            raise JobError(ExitCode.INVALID, f"{Env.JOB_SPEC} must be a JSON object")
        if kind is JobKind.PURGE:
            print(run_purge(index), flush=True)
            return ExitCode.OK
        url, token = env.get(Env.WRITER_URL), env.get(Env.ADMIN_TOKEN)
        if not (url and token and index):
            need = f"{Env.WRITER_URL}, {Env.ADMIN_TOKEN} and {Env.INDEX}"
            raise JobError(ExitCode.INVALID, f"job {kind} needs {need}")
        timeout_s = float(spec.pop("timeout_s", 86_400))
        admin = Admin(url, index, token, retries=int(spec.pop("retries", 5)))
        if kind is JobKind.BACKFILL and env.get(Env.BACKFILL_SHARES):
            # a pod of the Indexed backfill Job: re-encode one share (backfill_worker)
            from index_runtime.backfill_worker import run_from_env

            print(run_from_env(admin, env, spec), flush=True)
            return ExitCode.OK
        print(RUNNERS[kind](admin, spec, poll_s, timeout_s), flush=True)
        return ExitCode.OK
    except ValueError as exc:
        print(f"job {kind}: invalid {Env.JOB_SPEC}: {exc}", flush=True)
        return ExitCode.INVALID
    except JobError as exc:
        print(f"job {kind} failed: {exc}", flush=True)
        return exc.code
