"""``driftless job <kind>``: the one-off work the operator runs as Kubernetes Jobs.

Training, compaction, the migration gate and the backfill need the writer (its key index, its
commit lock, its epoch), so these Jobs drive the writer's admin API and wait for the result:
Kubernetes then sees the work (Job status, retries with backoff, a deadline) and the operator
stays non-blocking. Purge works on the object store directly (the index's pods are gone).
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
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Admin:
    """The writer's HTTP API, as a Job sees it (stdlib HTTP: the Job image needs nothing more)."""

    def __init__(self, url: str, index: str, token: str, timeout_s: float = 30.0) -> None:
        self.base = f"{url.rstrip('/')}/v1/indexes/{index}"
        self.token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            invalid = (400, 401, 403, 404)  # a retried pod would get the same answer
            code = {c: ExitCode.INVALID for c in invalid}.get(
                exc.code, ExitCode.CONFLICT if exc.code == 409 else ExitCode.FAILED
            )
            raise JobError(code, f"{method} {path}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise JobError(ExitCode.FAILED, f"{method} {path}: {exc}") from exc

    def status(self) -> dict[str, Any]:
        return dict(self.call("GET", "/status"))


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


def _record(st: Mapping[str, Any]) -> dict[str, Any]:
    return dict((st.get("migration") or {}).get("record") or {})


def run_train(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    before = admin.status()["training"]
    admin.call("POST", "/admin/train")
    st = wait_for(admin, lambda s: not s["training"]["running"], poll_s, timeout_s)
    tr = st["training"]
    if tr["consecutive_failures"] > before["consecutive_failures"]:
        raise JobError(ExitCode.FAILED, f"training failed: {tr['last_failure']}")
    cand = [c for c in st["codebooks"] if c["role"] == "candidate"]
    return f"candidate codebook {cand[-1]['version'] if cand else '?'} trained"


def run_compact(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    r = admin.call("POST", "/admin/compact")
    return f"compacted {r['input_segments']} segments into {r['output_segments']}"


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
    if rec.get("to") == spec.get("to_model") and rec.get("phase") not in (None, *finished):
        log.info("the migration to %s was already started (a retried pod)", rec["to"])
    else:
        admin.call("POST", "/admin/migrations", body)
    st = wait_for(admin, lambda s: _record(s).get("phase") in GATE_DONE, poll_s, timeout_s)
    rec = _record(st)
    return f"gate finished: phase {rec['phase']}, selected {rec.get('selected')}"


def run_backfill(admin: Admin, spec: Mapping[str, Any], poll_s: float, timeout_s: float) -> str:
    rec = _record(admin.status())
    if rec.get("phase") not in BACKFILL_DONE:
        admin.call("POST", "/admin/migrations/backfill")  # starts, or resumes after a restart
    st = wait_for(admin, lambda s: _record(s).get("phase") in BACKFILL_DONE, poll_s, timeout_s)
    rec = _record(st)
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
        print(RUNNERS[kind](Admin(url, index, token), spec, poll_s, timeout_s), flush=True)
        return ExitCode.OK
    except ValueError as exc:
        print(f"job {kind}: invalid {Env.JOB_SPEC}: {exc}", flush=True)
        return ExitCode.INVALID
    except JobError as exc:
        print(f"job {kind} failed: {exc}", flush=True)
        return exc.code
