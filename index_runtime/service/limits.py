"""Request limits of the HTTP API: the body size (an ASGI middleware that refuses before the
app reads or parses anything) and the pure checks the routes call before they allocate or
search (rows per upsert, queries per batch, the estimated size of an answer), and after: the
measured size of the rows an answer would carry (:class:`AnswerSize`), before it is encoded.

Every refusal names the limit and how to change it: 413 ``PayloadTooLarge`` for bytes,
413 ``BatchTooLarge`` for counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from json.encoder import encode_basestring
from typing import Any

from index_runtime.errors import BatchTooLargeError, InvalidInputError, PayloadTooLargeError
from index_runtime.store.rows import MAX_METADATA_BYTES

MiB = 1 << 20
# bytes of one float of a vector in a JSON answer: float32 values printed as Python floats
# ("-0.12345678901234568, ") take up to ~22 characters; 20 is the typical width measured
JSON_FLOAT_BYTES = 20
HIT_OVERHEAD_BYTES = 96  # key, seq, score and the JSON punctuation of one hit


@dataclass(frozen=True)
class ApiLimits:
    """Configurable bounds (CLI flag ``--max-...``, env ``DRIFTLESS_MAX_...``)."""

    max_body_bytes: int = 64 * MiB  # request body, checked on Content-Length and as it streams
    max_batch_rows: int = 10_000  # keys per upsert / delete / fetch
    max_batch_queries: int = 256  # queries per search/batch
    max_response_bytes: int = 32 * MiB  # answer of a search, batch, fetch or scan
    payload_estimate_bytes: int = 2048  # assumed text + metadata per hit, up front only

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"limit {f.name} must be a positive integer, got {v!r}")

    @staticmethod
    def from_env(env: Mapping[str, str] = os.environ, **given: int | None) -> ApiLimits:
        """Flags given (not None) win, then ``DRIFTLESS_<FIELD>`` variables, then defaults."""
        values: dict[str, int] = {}
        for f in fields(ApiLimits):
            flag = given.get(f.name)
            raw = env.get(f"DRIFTLESS_{f.name.upper()}")
            if flag is not None:
                values[f.name] = flag
            elif raw:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise InvalidInputError(f"DRIFTLESS_{f.name.upper()}={raw!r} is not an integer") from None
        return ApiLimits(**values)


def check_rows(n: int, limits: ApiLimits) -> None:
    if n > limits.max_batch_rows:
        raise BatchTooLargeError(
            f"{n} keys in one call; the limit max_batch_rows is {limits.max_batch_rows} "
            "(--max-batch-rows / DRIFTLESS_MAX_BATCH_ROWS)"
        )


def check_queries(n: int, limits: ApiLimits) -> None:
    if n > limits.max_batch_queries:
        raise BatchTooLargeError(
            f"{n} queries in one batch; the limit max_batch_queries is "
            f"{limits.max_batch_queries} (--max-batch-queries / DRIFTLESS_MAX_BATCH_QUERIES)"
        )


def hit_bytes(dim: int, include_vector: bool, include_payload: bool, limits: ApiLimits) -> int:
    """Upper estimate of one row/hit in a JSON answer (bytes)."""
    size = HIT_OVERHEAD_BYTES
    if include_vector:
        size += dim * JSON_FLOAT_BYTES
    if include_payload:
        size += limits.payload_estimate_bytes
    return size


def check_response(est: int, limits: ApiLimits, what: str) -> None:
    """Refuse, before any search or fetch, an answer estimated (``hit_bytes`` per row) over
    max_response_bytes. Rows with large texts or metadata pass this estimate: their measured
    size is checked by :class:`AnswerSize` once the rows are known."""
    if est > limits.max_response_bytes:
        raise PayloadTooLargeError(
            f"{what} would answer about {est / MiB:.1f} MiB; "
            f"the limit max_response_bytes is {limits.max_response_bytes / MiB:.1f} MiB "
            "(--max-response-bytes / DRIFTLESS_MAX_RESPONSE_BYTES): lower k, the batch or "
            "include_vector"
        )


# --- the measured size of an answer's rows ---------------------------------------------------
# Answers are JSON encoded as Starlette's JSONResponse does: UTF-8, ensure_ascii=False,
# compact separators. A string then takes its UTF-8 bytes, 2 quotes and one more byte per '"',
# '\\' or \n-like control character (5 more for other control characters, as \u00XX): at most
# 6 bytes per code point.
MAX_JSON_BYTES_PER_CHAR = 6
INT_JSON_BYTES = 20  # an int64 key


def json_str_bytes(s: str) -> int:
    """Exact bytes of ``s`` as a JSON string in an answer (C speed: ~4 ms per MiB)."""
    escaped = encode_basestring(s)  # quotes and escapes; other characters as they are
    if escaped.isascii():
        return len(escaped)
    return len(escaped) + len(s.encode("utf-8", "surrogatepass")) - len(s)


def json_value_bytes(v: Any) -> int:
    """Exact bytes of a JSON value (metadata) in an answer."""
    text = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _str_bound(s: str) -> int:
    return MAX_JSON_BYTES_PER_CHAR * len(s) + 2


def _row_size(
    row: Mapping[str, Any], str_size: Callable[[str], int], meta_size: Callable[[Any], int]
) -> int:
    """One answer row (a fetched or scanned row, or a hit: ``key``, ``seq``, ``score``, maybe
    ``text``, ``metadata`` and ``vector``) with strings and metadata sized by the callers'
    measures; a vector at JSON_FLOAT_BYTES per value (its printed width varies)."""
    size = HIT_OVERHEAD_BYTES
    key = row.get("key")
    size += str_size(key) if isinstance(key, str) else INT_JSON_BYTES
    text = row.get("text")
    if isinstance(text, str):
        size += str_size(text)
    meta = row.get("metadata")
    if meta is not None:
        size += meta_size(meta)
    vector = row.get("vector")
    if vector is not None:
        size += len(vector) * JSON_FLOAT_BYTES
    return size


def row_bound(row: Mapping[str, Any]) -> int:
    """A cheap upper bound (no pass over any text) of one answer row. Metadata is stored as
    JSON of at most MAX_METADATA_BYTES (with spaces after separators); it is answered
    compact, never longer."""
    return _row_size(row, _str_bound, lambda _: MAX_METADATA_BYTES)


def row_bytes(row: Mapping[str, Any]) -> int:
    """The measured size of one answer row: key, text and metadata exactly; a vector at
    JSON_FLOAT_BYTES per value (as the up-front estimate)."""
    return _row_size(row, json_str_bytes, json_value_bytes)


class AnswerSize:
    """Sums the rows an answer will carry (pure), once they are known and before any JSON is
    built, and refuses (413 ``PayloadTooLarge``) once they pass max_response_bytes.

    Cheap first: rows count by :func:`row_bound` (lengths only) while that bound stays within
    the limit, the usual case; past it, every row is measured (:func:`row_bytes`) from the
    first. Measuring stops once the measured sum passes the limit (rows left count by their
    text's length in characters, a lower bound), so a refusal costs O(limit) whatever was
    asked. ``add`` may be called several times (the queries of a batch: all hits together).
    """

    def __init__(self, limits: ApiLimits, what: str) -> None:
        self.limit = limits.max_response_bytes
        self.what = what
        self.bound = 0  # upper bound of the rows added (while not measuring)
        self.measured = 0  # exact sum of the rows added (once measuring)
        self.measuring = False
        self._held: list[Mapping[str, Any]] = []  # rows bounded so far: measured if need be

    @property
    def size(self) -> int:
        """Bytes of the rows added: the measured size, or its upper bound."""
        return self.measured if self.measuring else self.bound

    def add(self, rows: Iterable[Mapping[str, Any]], more: bool = False) -> None:
        """Count ``rows``; ``more``: rows of the same answer are still to come (a batch)."""
        new = list(rows)
        if not self.measuring:
            self.bound += sum(row_bound(r) for r in new)
            self._held.extend(new)
            if self.bound <= self.limit:
                return
            new, self._held, self.measuring = self._held, [], True
        for i, r in enumerate(new):
            self.measured += row_bytes(r)
            if self.measured > self.limit:
                rest = new[i + 1 :]
                self.refuse(self.measured + sum(map(_lower_bound, rest)), more or bool(rest))

    def refuse(self, size: int, at_least: bool) -> None:
        raise PayloadTooLargeError(
            f"{self.what}: the answer would be {'at least ' if at_least else ''}"
            f"{size / MiB:.1f} MiB; the limit max_response_bytes is {self.limit / MiB:.1f} MiB "
            "(--max-response-bytes / DRIFTLESS_MAX_RESPONSE_BYTES): ask for fewer rows, or "
            "leave out the payload (include_payload) or the vectors (include_vector)"
        )


def _lower_bound(row: Mapping[str, Any]) -> int:
    text = row.get("text")
    return HIT_OVERHEAD_BYTES + (len(text) if isinstance(text, str) else 0)


def too_large_body(limit: int, got: int | None) -> dict[str, Any]:
    size = f"{got} bytes" if got is not None else f"more than {limit} bytes"
    return {
        "error": PayloadTooLargeError.reason,
        "message": f"the request body has {size}; the limit max_body_bytes is {limit} "
        "(--max-body-bytes / DRIFTLESS_MAX_BODY_BYTES)",
    }


class BodyLimitMiddleware:
    """Pure ASGI: refuses a body over ``limit`` bytes with 413 before the app sees it.

    A Content-Length over the limit is refused without reading a byte. Otherwise the body is
    read here, chunk by chunk, and refused as soon as it passes the limit (a chunked body
    without a length included), so at most ``limit`` bytes are ever buffered; a body within
    the limit is handed to the app as one message and not kept here.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await _refuse(send, too_large_body(self.limit, length))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _refuse(send, too_large_body(self.limit, length))
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # handed over, not kept: once the app has its copy (Starlette joins what it reads) this
        # one is freed; holding it cost one more body-sized buffer for the whole request
        pending = [chunks[0] if len(chunks) == 1 else b"".join(chunks)]
        chunks.clear()

        async def replay() -> Any:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Any, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": PayloadTooLargeError.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),  # the rest of the body is never read
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
