"""The shards' router, its decisions (PURE: no I/O). ``service/router.py`` only sends what
these functions plan and answers what they combine.

* Writes (upsert, delete) split by ``shards.shard_of`` into one group per shard, in input
  order. The whole batch is validated first (:func:`check_upsert`), so a bad row is refused
  before any shard applies anything: a shard's 4xx can then only be index-wide (every shard
  refuses alike), never a silent partial write.
* Reads: fetch splits and answers in request order; count sums; scan walks the shards in
  order with one integer cursor (:func:`encode_cursor`); search asks every shard and keeps the
  best k of the union (``shards.merge_hits``).
* Status: the shards' documents, the least ready phase, summed counts and the overlap windows
  pooled by their sample counts (:func:`pool_windows`).
* Errors: every shard must answer. The first shard that did not is named in the router's
  answer: its own 4xx (status, reason, message) when it refused, else 503 ShardUnavailable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from index_runtime.errors import (
    DriftlessError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from index_runtime.lifecycle import Phase
from index_runtime.shards import MAX_SHARDS, merge_hits, split_by_shard

OWN_MODEL = "(the index's model)"  # how check_upsert's messages name ``vectors``
RETRY_AFTER_S = 1.0  # a shard that did not answer: the client may retry this soon


@dataclass(frozen=True)
class ShardUrls:
    """Every shard's writer and reader base URL, in shard order (reader i serves what writer
    i writes). Readers default to the writers (one process per shard on a laptop)."""

    writers: tuple[str, ...]
    readers: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.writers)
        if not 1 <= n <= MAX_SHARDS:
            raise InvalidInputError(f"give 1..{MAX_SHARDS} shard writers, got {n}")
        if len(self.readers) != n:
            raise InvalidInputError(
                f"{n} shard writers but {len(self.readers)} shard readers: one of each per shard"
            )
        for url in (*self.writers, *self.readers):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InvalidInputError(f"a shard URL must be http(s)://host[:port], got {url!r}")

    @property
    def n(self) -> int:
        return len(self.writers)

    @staticmethod
    def of(writers: Sequence[str], readers: Sequence[str] = ()) -> ShardUrls:
        w = tuple(u.rstrip("/") for u in writers)
        return ShardUrls(w, tuple(u.rstrip("/") for u in readers) if readers else w)


def parse_url_list(raw: str | None) -> list[str]:
    """A comma-separated list of URLs (``Env.SHARD_WRITERS``), blanks ignored."""
    return [u.strip() for u in (raw or "").split(",") if u.strip()]


def admin_path(name: str, rest: str) -> str:
    """The shards' path of an admin call (``rest``: what follows ``admin/``, as decoded),
    percent-encoded so that a ``?`` or ``#`` in it stays in the path. A ``.`` or ``..``
    segment is refused (404): an HTTP client normalizes it away, and
    ``docs/admin/../../other/...`` would reach another index's admin API."""
    segments = rest.split("/")
    if any(s in (".", "..") for s in segments):
        raise NotFoundError(f"no admin route {rest!r}: '.' and '..' segments are not routed")
    return f"/v1/indexes/{quote(name, safe='')}/admin/" + "/".join(
        quote(s, safe="") for s in segments
    )


# --- answers and errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShardAnswer:
    """What one shard answered: an HTTP status and its JSON body, or ``status`` 0 and the
    transport ``error`` (refused connection, timeout) when it did not answer at all."""

    shard: int
    status: int
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ShardError(DriftlessError):
    """A shard's refusal or absence as the router's answer (status and reason per instance)."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


def _described(a: ShardAnswer) -> tuple[str, str]:
    body = a.body if isinstance(a.body, Mapping) else {}
    reason = str(body.get("error") or "HttpError")
    message = str(body.get("message") or a.error or f"HTTP {a.status}")
    return reason, message


def shard_failure(
    answers: Sequence[ShardAnswer], what: str, wrote: bool = False
) -> ShardError | None:
    """The router's error when a shard did not answer 2xx (None: every shard did). A shard's
    4xx comes back as that 4xx with its reason (the client's input or the index's state); a
    5xx, a transport error or a timeout is 503 ShardUnavailable with Retry-After. The message
    names the shard; for a write (``wrote``) it also names the shards that applied their rows,
    and says the batch may be retried (upserts and deletes are idempotent)."""
    failed = [a for a in answers if not a.ok]
    if not failed:
        return None
    refused = [a for a in failed if 400 <= a.status < 500]
    first = refused[0] if refused else failed[0]
    reason, message = _described(first)
    names = ", ".join(str(a.shard) for a in failed)
    if first.status:
        text = f"{what}: shard {first.shard} answered {first.status} {reason}: {message}"
    else:
        text = f"{what}: shard {first.shard} did not answer: {first.error}"
    if len(failed) > 1:
        text += f" (shards not answering 2xx: {names})"
    if wrote:
        applied = [str(a.shard) for a in answers if a.ok]
        text += (
            f"; shards {', '.join(applied)} applied their rows" if applied else "; nothing applied"
        ) + "; retrying the whole batch is safe (writes are idempotent)"
    if refused:
        retry = RETRY_AFTER_S if first.status == 429 else None
        return ShardError(first.status, reason, text, retry)
    return ShardError(503, "ShardUnavailable", text, RETRY_AFTER_S)


def require_all(answers: Sequence[ShardAnswer], what: str, wrote: bool = False) -> list[Any]:
    """Every shard's body, in shard order, or raise :func:`shard_failure`'s error."""
    err = shard_failure(answers, what, wrote)
    if err is not None:
        raise err
    return [a.body for a in sorted(answers, key=lambda a: a.shard)]


# --- writes ---------------------------------------------------------------------------------


def check_upsert(body: Mapping[str, Any], key_type: str, max_rows: int) -> None:
    """Validate a whole upsert before any shard sees it, with the runtime's own validator
    (``store.rows.validate_upsert``): keys of the index's type, column lengths, finite
    vectors of one width per model, texts and metadata, duplicate keys. What it cannot know
    here (the index's dimensions and the models it writes) is the same for every shard, so
    every shard refuses it alike. Raises InvalidInputError (400) / BatchTooLargeError (413)."""
    from index_runtime.store.rows import Limits, validate_upsert

    keys = body.get("keys") or []
    given: dict[str, Any] = dict(body.get("vectors_by_model") or {})
    if body.get("vectors") is not None:
        given[OWN_MODEL] = body["vectors"]  # the index's own model (its name is the shards')
    dims: dict[str, int] = {}
    for model, rows in given.items():
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], list):
            continue  # validate_upsert names the shape problem
        dims[model] = len(rows[0])
    validate_upsert(
        keys,
        given,
        dims,
        (),
        key_type,  # type: ignore[arg-type]  # "int" | "str", from the index's description
        Limits(max_rows),
        body.get("texts"),
        body.get("metadata"),
    )


def check_keys(keys: Sequence[Any], key_type: str, max_rows: int) -> None:
    """A delete's or fetch's keys, checked whole before any shard sees them (a key of the
    wrong type would otherwise be refused by its shard only, after the others deleted)."""
    from index_runtime.store.rows import Limits, validate_keys

    validate_keys(keys, key_type, Limits(max_rows))  # type: ignore[arg-type]


ROW_COLUMNS = ("vectors", "texts", "metadata")


def split_upsert(body: Mapping[str, Any], shards: int) -> dict[int, dict[str, Any]]:
    """One upsert body per shard that owns some of the keys, every column cut alike, rows in
    input order. Fields that are not per-row are copied."""
    keys = body["keys"]
    groups = split_by_shard(range(len(keys)), lambda i: keys[i], shards)
    out: dict[int, dict[str, Any]] = {}
    for shard, idx in groups.items():
        part = dict(body)
        part["keys"] = [keys[i] for i in idx]
        for col in ROW_COLUMNS:
            if body.get(col) is not None:
                part[col] = [body[col][i] for i in idx]
        if body.get("vectors_by_model"):
            part["vectors_by_model"] = {
                m: [rows[i] for i in idx] for m, rows in body["vectors_by_model"].items()
            }
        out[shard] = part
    return out


def split_keys(body: Mapping[str, Any], shards: int) -> dict[int, dict[str, Any]]:
    """A delete or fetch body per shard (its other fields copied)."""
    return {
        shard: {**body, "keys": keys}
        for shard, keys in split_by_shard(body["keys"], lambda k: k, shards).items()
    }


def encode_body(body: Any) -> bytes:
    """A body for a shard, as compact as JSON allows: UTF-8 as is (``\\uXXXX`` escapes made
    a CJK text twice its bytes, an emoji three times) and no spaces (``[0, 0]`` is half as
    long again as ``[0,0]``), so a shard's part of a batch is hardly ever longer than the
    client's bytes of it."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def encode_parts(parts: Mapping[int, Any], limit: int) -> dict[int, bytes]:
    """Every shard's part of a write, encoded, or PayloadTooLargeError (413) when one is over
    the shards' body limit (a number the client wrote as ``9E15`` is ``9000000000000000.0``
    once parsed): refused here, before any shard applies its rows, rather than a shard's
    413 after the others applied theirs, which no retry of the same batch could fix."""
    out = {shard: encode_body(part) for shard, part in parts.items()}
    over = {shard: len(b) for shard, b in out.items() if len(b) > limit}
    if over:
        shard, size = next(iter(sorted(over.items())))
        raise PayloadTooLargeError(
            f"shard {shard}'s part of this batch encodes to {size} bytes; the shards' limit "
            f"max_body_bytes is {limit} (--max-body-bytes / DRIFTLESS_MAX_BODY_BYTES): nothing "
            "was applied; send fewer rows per batch"
        )
    return out


def merge_acks(acks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The answer of a split write: rows summed; each shard's seq range (seqs are per shard)."""
    return {
        "rows": sum(int(a.get("rows", 0)) for a in acks),
        "shards": [dict(a) for a in acks],
    }


# --- reads ----------------------------------------------------------------------------------


def merge_fetch(
    keys: Sequence[Any], rows_by_shard: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, Any]:
    """``{"rows", "missing"}`` in request order, as one unsharded index answers (a key asked
    twice appears twice). ``rows_by_shard``: every shard's found rows."""
    found: dict[tuple[type, Any], Mapping[str, Any]] = {}
    for rows in rows_by_shard:
        for row in rows:
            found[(type(row["key"]), row["key"])] = row
    out_rows: list[Mapping[str, Any]] = []
    missing: list[Any] = []
    for key in keys:
        hit = found.get((type(key), key))
        if hit is None:
            missing.append(key)
        else:
            out_rows.append(hit)
    return {"rows": out_rows, "missing": missing}


def encode_cursor(shard: int, seq: int, shards: int) -> int:
    """One integer for (the shard a scan is in, that shard's own cursor): ``seq * n + shard``.
    0 is the start (shard 0, from the beginning), as for an unsharded index."""
    return seq * shards + shard


def decode_cursor(cursor: int, shards: int) -> tuple[int, int]:
    """(shard, the shard's cursor) of :func:`encode_cursor`'s integer."""
    if cursor < 0:
        raise InvalidInputError("cursor must be >= 0")
    return cursor % shards, cursor // shards


PATH_ORDER = ("primary", "shadow")  # the merged answer reports the least exact path


def merge_search(answers: Sequence[Mapping[str, Any]], k: int) -> dict[str, Any]:
    """One query's answer from every shard's (each its exact re-ranked top-k): the best k of
    the union, and how each shard answered. ``path``: shadow if any shard answered from its
    shadow; ``manifest_version``: the oldest view; ``strategy``: the shards' when they agree,
    else ``mixed``."""
    strategies = {str(a.get("strategy")) for a in answers}
    paths = [str(a.get("path", "primary")) for a in answers]
    models = {a.get("model") for a in answers}
    out = {
        "results": merge_hits([a.get("results", []) for a in answers], k),
        "path": max(paths, key=lambda p: PATH_ORDER.index(p) if p in PATH_ORDER else 1),
        "manifest_version": min(int(a.get("manifest_version", 0)) for a in answers),
        "strategy": strategies.pop() if len(strategies) == 1 else "mixed",
        "shards": [
            {
                "path": a.get("path"),
                "manifest_version": a.get("manifest_version"),
                "strategy": a.get("strategy"),
                "model": a.get("model"),
            }
            for a in answers
        ],
    }
    if len(models) == 1 and None not in models:  # the scoring space (the router made it one)
        out["model"] = models.pop()
    return out


def merge_batch(answers: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """A search/batch answer: query j merged from every shard's j-th answer."""
    per_shard = [a["answers"] for a in answers]
    for i, got in enumerate(per_shard):
        if len(got) != len(ks):
            raise ShardError(
                502, "ShardAnswerMismatch", f"shard {i} answered {len(got)} of {len(ks)} queries"
            )
    return {"answers": [merge_search([p[j] for p in per_shard], k) for j, k in enumerate(ks)]}


# --- index descriptions and status ----------------------------------------------------------

# least ready first: an index is as ready as its least ready shard
PHASE_ORDER = (
    Phase.COLD_START,
    Phase.TRAINING,
    Phase.VALIDATING,
    Phase.DEGRADED,
    Phase.RETRAINING,
    Phase.SERVING,
)


def least_ready(phases: Sequence[str]) -> str:
    """The index-level phase: the least ready of the shards' (an unknown one counts as the
    least ready of all, so it is never hidden)."""
    order = [p.value for p in PHASE_ORDER]
    return min(phases, key=lambda p: order.index(p) if p in order else -1)


def merge_describe(descs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An index's description from every shard's: shard 0's spec, counts summed, the least
    ready phase, and the shard count."""
    out = dict(descs[0])
    out["count"] = sum(int(d.get("count", 0)) for d in descs)
    out["phase"] = least_ready([str(d.get("phase")) for d in descs])
    out["shards"] = len(descs)
    return out


def merge_listing(listings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``GET /v1/indexes``: the indexes every shard has (one missing on a shard is not whole:
    not listed), each merged by :func:`merge_describe`."""
    by_name: list[dict[str, Mapping[str, Any]]] = [
        {str(d["name"]): d for d in lst.get("indexes", [])} for lst in listings
    ]
    names = sorted(set.intersection(*(set(m) for m in by_name))) if by_name else []
    return {"indexes": [merge_describe([m[n] for m in by_name]) for n in names]}


WINDOW_KEYS = ("serving", "candidate")


def pool_windows(windows: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The shards' overlap windows of one kind pooled into an index-level estimate: the mean
    weighted by each shard's sample count, and bounds that are the count-weighted means of the
    shards' 95% bounds. That is conservative: each shard's interval is at least as wide as
    one over all N samples would be (widths shrink as 1/sqrt(n)). A shard without samples
    (no window, or an empty one) leaves the index unmeasured there: ``complete`` false and the
    bounds [0, 1], so an unmeasured shard can never make the index look good. None when no
    shard has a window. (The overlap of the merged top-k is not exactly this pool: a shard
    contributes its share of the k; the pool is the estimate the shards' samples support.)"""
    present = [w for w in windows if w is not None]
    if not present:
        return None
    measured = [w for w in present if int(w.get("count") or 0) > 0 and w.get("mean") is not None]
    total = sum(int(w["count"]) for w in measured)
    complete = len(measured) == len(windows)
    out: dict[str, Any] = {
        "count": total,
        "shards_measured": len(measured),
        "shards": len(windows),
        "complete": complete,
        "mean": None,
        "lower": 0.0,
        "upper": 1.0,
    }
    if total:
        out["mean"] = sum(int(w["count"]) * float(w["mean"]) for w in measured) / total
        if complete:
            out["lower"] = sum(int(w["count"]) * float(w["lower"]) for w in measured) / total
            out["upper"] = sum(int(w["count"]) * float(w["upper"]) for w in measured) / total
    return out


def merge_status(statuses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The index-level status of a sharded index: the least ready phase, live/pending rows
    summed, the overlap windows pooled, and every shard's own document (``shards``)."""
    phases = [str(s.get("phase")) for s in statuses]
    counts = [s.get("counts") or {} for s in statuses]
    windows = [s.get("windows") or {} for s in statuses]
    return {
        "index": statuses[0].get("index"),
        "model": statuses[0].get("model"),
        "sharded": True,
        "phase": least_ready(phases),
        "phases": phases,
        "counts": {
            "live": sum(int(c.get("live", 0)) for c in counts),
            "pending": sum(int(c.get("pending", 0)) for c in counts),
        },
        "overlap": {kind: pool_windows([w.get(kind) for w in windows]) for kind in WINDOW_KEYS},
        "shards": [dict(s) for s in statuses],
    }


def merge_per_shard(answers: Sequence[ShardAnswer]) -> tuple[int, dict[str, Any]]:
    """An admin call forwarded to every shard: (status, body) answering per shard. The status
    is the shards' common status when they all succeeded (200 when their 2xx differ); when one
    failed, the error of :func:`shard_failure` with every shard's answer attached."""
    per = [
        {
            "shard": a.shard,
            "status": a.status,
            "body": a.body,
            **({"error": a.error} if a.error else {}),
        }
        for a in sorted(answers, key=lambda a: a.shard)
    ]
    err = shard_failure(answers, "admin call")
    if err is None:
        codes = {a.status for a in answers}
        return (codes.pop() if len(codes) == 1 else 200), {"shards": per}
    return err.status, {"error": err.reason, "message": str(err), "shards": per}
