"""Request limits of the HTTP API: the body size (an ASGI middleware that refuses before the
app reads or parses anything) and the pure checks the routes call before they allocate or
search (rows per upsert, queries per batch, the estimated size of an answer).

Every refusal names the limit and how to change it: 413 ``PayloadTooLarge`` for bytes,
413 ``BatchTooLarge`` for counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from index_runtime.errors import BatchTooLargeError, InvalidInputError, PayloadTooLargeError

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
    max_response_bytes: int = 32 * MiB  # estimated answer of a search, batch, fetch or scan
    payload_estimate_bytes: int = 2048  # assumed text + metadata per hit with include_payload

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
    max_response_bytes."""
    if est > limits.max_response_bytes:
        raise PayloadTooLargeError(
            f"{what} would answer about {est / MiB:.1f} MiB; "
            f"the limit max_response_bytes is {limits.max_response_bytes / MiB:.1f} MiB "
            "(--max-response-bytes / DRIFTLESS_MAX_RESPONSE_BYTES): lower k, the batch or "
            "include_vector"
        )


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
