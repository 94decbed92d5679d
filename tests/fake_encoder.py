"""A deterministic OpenAI-compatible embeddings server for tests and campaigns that run
``driftless serve`` as a subprocess (``DRIFTLESS_ENCODERS`` points its models here).

Two "models" over a random vocabulary ``w0 .. w399`` (tokens not in it — version tags such
as ``#17v3`` — are ignored): ``old`` (32-d) sums word vectors; ``new`` (24-d) is a rotation of
``old`` into fewer dimensions, so an adapter can be learned. ``old`` is noisy on queries, so
the gate has something to decide. ``delay_s`` holds every answer (a slow encoder)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import numpy.typing as npt

VOCAB = 400
_rng = np.random.default_rng(0)
W_OLD = _rng.normal(size=(VOCAB, 32))
_ROT, _ = np.linalg.qr(_rng.normal(size=(32, 32)))
WORDS = {"old": W_OLD, "new": W_OLD @ _ROT[:, :24]}
QUERY_NOISE = {"old": 2.5, "new": 0.0}


def encode(model: str, texts: list[str], kind: str) -> npt.NDArray[np.float32]:
    """Unit rows: the sum of the text's word vectors (plus, for queries of a noisy model,
    noise seeded by the text)."""
    words = WORDS[model]
    out = np.zeros((len(texts), words.shape[1]))
    for i, t in enumerate(texts):
        for w in t.split():
            if w.startswith("w") and w[1:].isdigit() and int(w[1:]) < VOCAB:
                out[i] += words[int(w[1:])]
        if kind == "query" and QUERY_NOISE[model]:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big")
            out[i] += QUERY_NOISE[model] * np.random.default_rng(seed).normal(size=words.shape[1])
    norms = np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return (out / norms).astype(np.float32)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        server: EncoderServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if server.delay_s:
            server.stopping.wait(server.delay_s)
        model = str(body.get("model"))
        if model not in WORDS:
            self._send(404, {"error": {"message": f"model {model!r} not found"}})
            return
        with server.lock:
            server.requests += 1
            server.texts += len(body["input"])
        vecs = encode(model, list(body["input"]), str(body.get("input_type", "passage")))
        data = [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        self._send(200, {"data": data, "model": model})

    def _send(self, status: int, answer: dict[str, Any]) -> None:
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class EncoderServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay_s = delay_s
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.texts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def specs(self) -> dict[str, str]:
        """DRIFTLESS_ENCODERS for a ``driftless serve`` using these models."""
        return {m: f"{self.url}#{m}" for m in WORDS}


@contextmanager
def encoder_server(delay_s: float = 0.0) -> Iterator[EncoderServer]:
    srv = EncoderServer(delay_s)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
