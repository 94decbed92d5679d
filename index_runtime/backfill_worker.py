"""``driftless job backfill`` as one pod of an Indexed Job: re-encode one share of the rows.

The pod's share is ``JOB_COMPLETION_INDEX`` of ``DRIFTLESS_BACKFILL_SHARES``. It loops: ask
the writer for the next page of its share (``GET .../backfill/rows``; without a cursor at
first, so a restarted pod resumes from the writer's), encode the texts with the target model
locally, send the vectors (``POST .../backfill/rows``: the writer's compare-and-set rewrite),
move its cursor. It talks to the writer through :class:`BackfillClient` (HTTP in a cluster,
:class:`LocalClient` in-process).

Exit codes (``contract.ExitCode``): OK when its share has nothing left, or when the writer
answers 409 MigrationNotActive (rolled back, cut over, another migration: nothing to retry);
FAILED when it made no progress (no batch written) for ``DRIFTLESS_BACKFILL_STALL_S``
seconds, whatever the cause (writer down, encoder failing): liveness by progress, so
Kubernetes restarts the pod and a slow but progressing backfill is never cut short; INVALID
for configuration errors (unknown model, bad token). Transient errors (5xx, connection,
encoder) are retried with exponential backoff until then; an encoded batch whose write failed
is sent again rather than encoded again.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from index_runtime.contract import Env, ExitCode, record_id
from index_runtime.errors import MigrationNotActiveError
from index_runtime.jobs import Admin, JobError
from index_runtime.migration import pace_s

if TYPE_CHECKING:
    from index_runtime.service.runtime import IndexRuntime

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]  # texts -> (n, dim) passages of the target model
OPEN_PHASES = ("Bridged", "Backfilling")


class NotActive(Exception):
    """The writer said MigrationNotActive: the worker is done."""


class BackfillClient(Protocol):
    def record(self) -> dict[str, Any]:
        """The index's migration record ({} when none)."""

    def rows(
        self, migration_id: str, share: int, shares: int, after: int | None, limit: int
    ) -> dict[str, Any]: ...

    def write(self, body: Mapping[str, Any]) -> dict[str, Any]: ...


class HttpClient:
    """The writer's admin API (``jobs.Admin``: short timeouts, retries with backoff)."""

    PATH = "/admin/migrations/backfill/rows"

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            return self.admin.call(method, path, body)
        except JobError as exc:
            if exc.http_status == 409 and "MigrationNotActive" in str(exc):
                raise NotActive(str(exc)) from exc
            raise

    def record(self) -> dict[str, Any]:
        st = self._call("GET", "/status")
        return dict((st.get("migration") or {}).get("record") or {})

    def rows(
        self, migration_id: str, share: int, shares: int, after: int | None, limit: int
    ) -> dict[str, Any]:
        q: dict[str, Any] = {"id": migration_id, "share": share, "shares": shares, "limit": limit}
        if after is not None:
            q["after"] = after
        return dict(self._call("GET", f"{self.PATH}?{urllib.parse.urlencode(q)}"))

    def write(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", self.PATH, body))


class LocalClient:
    """The same calls on an in-process runtime (tests, a standalone writer's own workers)."""

    def __init__(self, rt: IndexRuntime) -> None:
        self.rt = rt

    def record(self) -> dict[str, Any]:
        return dict(self.rt.bridge)

    def rows(
        self, migration_id: str, share: int, shares: int, after: int | None, limit: int
    ) -> dict[str, Any]:
        from index_runtime.service import backfill

        try:
            return backfill.rows_page(self.rt, migration_id, share, shares, after, limit)
        except MigrationNotActiveError as exc:
            raise NotActive(str(exc)) from exc

    def write(self, body: Mapping[str, Any]) -> dict[str, Any]:
        from index_runtime.service import backfill

        rows = body["rows"]
        vecs = np.asarray([r["vector"] for r in rows], np.float32)
        try:
            return backfill.apply_rows(
                self.rt,
                str(body["id"]),
                int(body["share"]),
                int(body["shares"]),
                int(body["cursor"]),
                [r["key"] for r in rows],
                [int(r["seq"]) for r in rows],
                vecs,
            )
        except MigrationNotActiveError as exc:
            raise NotActive(str(exc)) from exc


@dataclass(frozen=True)
class WorkerConfig:
    share: int
    shares: int
    migration_id: str | None = None  # None: the index's current migration
    batch: int = 256  # rows per page (<= 1,000)
    stall_s: float = 600.0  # no batch written for this long: exit FAILED (restarted)
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    rate: float = 0.0  # spec.backfill.rate: rows/s of this pod, a cap (0 = none)


@dataclass(frozen=True)
class WorkerResult:
    code: ExitCode
    message: str
    written: int = 0
    skipped: int = 0


def run_worker(
    client: BackfillClient,
    encoder_for: Callable[[str], Encode],
    cfg: WorkerConfig,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WorkerResult:
    """Re-encode share ``cfg.share`` until it is done (see the module docstring)."""
    mid, encode = cfg.migration_id, None
    cursor: int | None = None  # None: the writer's stored cursor of the share
    pending: dict[str, Any] | None = None  # an encoded batch whose write has not succeeded
    written = skipped = 0
    last_progress, delay = clock(), cfg.backoff_s
    where = f"share {cfg.share}/{cfg.shares}"
    while True:
        try:
            if encode is None:
                rec = client.record()
                if not rec or rec.get("phase") not in OPEN_PHASES:
                    raise NotActive(f"no migration is backfilling (phase {rec.get('phase')!r})")
                if mid is None:
                    mid = record_id(rec)
                elif mid != record_id(rec):
                    raise NotActive(f"migration {mid} is not the index's ({record_id(rec)})")
                encode = encoder_for(str(rec["to"]))
            assert mid is not None
            if pending is None:
                t_page = clock()
                page = client.rows(mid, cfg.share, cfg.shares, cursor, cfg.batch)
                rows = page["rows"]
                if rows:
                    vecs = np.asarray(encode([str(r["text"]) for r in rows]), np.float32)
                    if vecs.shape[0] != len(rows) or not np.isfinite(vecs).all():
                        raise ValueError(f"the encoder returned {vecs.shape} for {len(rows)} texts")
                    pending = {
                        "id": mid,
                        "share": cfg.share,
                        "shares": cfg.shares,
                        "cursor": int(page["cursor"]),
                        "rows": [
                            {"key": r["key"], "seq": r["seq"], "vector": v.tolist()}
                            for r, v in zip(rows, vecs, strict=True)
                        ],
                        "done": bool(page["done"]),
                    }
                elif page["done"]:
                    return WorkerResult(ExitCode.OK, f"{where}: done", written, skipped)
                else:  # not reachable with the writer's rule; no progress: wait, count it
                    cursor = int(page["cursor"])
                    raise LookupError(f"no rows after {cursor} but the share is not done")
            body = {k: v for k, v in pending.items() if k != "done"}
            res = client.write(body)
            written += int(res["written"])
            skipped += int(res["skipped"])
            cursor, done, pending = int(body["cursor"]), bool(pending["done"]), None
            last_progress, delay = clock(), cfg.backoff_s
            if done:
                return WorkerResult(ExitCode.OK, f"{where}: done", written, skipped)
            if pause := pace_s(len(body["rows"]), cfg.rate, clock() - t_page):
                sleep(pause)  # spec.backfill.rate; no other pause after progress
            continue
        except NotActive as exc:
            return WorkerResult(ExitCode.OK, f"{where}: the migration moved on ({exc})", written, skipped)
        except JobError as exc:
            if exc.code is ExitCode.INVALID:
                return WorkerResult(ExitCode.INVALID, f"{where}: {exc}", written, skipped)
            log.warning("%s: %s; retrying in %.1f s", where, exc, delay)
        except Exception as exc:  # the encoder, a 5xx past the client's retries
            log.warning("%s: %s: %s; retrying in %.1f s", where, type(exc).__name__, exc, delay)
        if clock() - last_progress > cfg.stall_s:
            return WorkerResult(
                ExitCode.FAILED,
                f"{where}: no progress for {cfg.stall_s:.0f} s; exiting to be restarted",
                written,
                skipped,
            )
        sleep(delay)
        delay = min(delay * 2, cfg.backoff_max_s)


def encoder_from_env(env: Mapping[str, str]) -> Callable[[str], Encode]:
    """The target model's encoder as the jobs image has it: ``Env.ENCODERS`` maps model names to
    encoder specs (``encoders.open_encoder``), the bundled local models by their own names."""
    from index_runtime.encoders import LOCAL_MODELS, open_encoder

    names = {m: m for m in LOCAL_MODELS}
    raw = env.get(Env.ENCODERS)
    if raw:
        extra = json.loads(raw)
        if not isinstance(extra, dict):
            raise JobError(ExitCode.INVALID, f"{Env.ENCODERS} must be a JSON object")
        names.update({str(k): str(v) for k, v in extra.items()})

    def load(model: str) -> Encode:
        if model not in names:
            raise JobError(ExitCode.INVALID, f"no encoder for the target model {model!r}")
        try:
            enc = open_encoder(names[model])
        except (ValueError, RuntimeError) as exc:
            raise JobError(ExitCode.INVALID, f"cannot load {model!r}: {exc}") from exc
        return lambda texts: enc.encode(texts, "passage")

    return load


def config_from_env(env: Mapping[str, str], spec: Mapping[str, Any]) -> WorkerConfig:
    try:
        share = int(env.get(Env.JOB_COMPLETION_INDEX) or 0)
        shares = int(env[Env.BACKFILL_SHARES])
        stall = float(env.get(Env.BACKFILL_STALL_S) or 600)
        batch = int(spec.get("batch", 256))
        rate = float(spec.get("rate", 0.0))
    except (KeyError, ValueError, TypeError) as exc:
        raise JobError(ExitCode.INVALID, f"backfill worker: bad environment ({exc})") from exc
    if not (shares >= 1 and 0 <= share < shares and 1 <= batch <= 1000 and stall > 0
            and math.isfinite(rate) and rate >= 0):  # fmt: skip
        raise JobError(
            ExitCode.INVALID,
            f"backfill worker: need 0 <= share ({share}) < shares ({shares}), "
            f"batch 1..1000 ({batch}), stall > 0 ({stall}), rate >= 0 ({rate})",
        )
    return WorkerConfig(share, shares, env.get(Env.MIGRATION_ID) or None, batch, stall, rate=rate)


def run_from_env(admin: Admin, env: Mapping[str, str], spec: Mapping[str, Any]) -> str:
    """The Job's entry point (``jobs.run_job``): raises JobError on a non-zero exit."""
    result = run_worker(HttpClient(admin), encoder_from_env(env), config_from_env(env, spec))
    line = f"{result.message}: {result.written} rows rewritten, {result.skipped} skipped"
    if result.code is not ExitCode.OK:
        raise JobError(result.code, line)
    return line
