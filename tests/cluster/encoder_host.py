"""An embeddings service for the local cluster: the two bundled models (all-MiniLM-L6-v2 and
multilingual-e5-small, the examples' ``encoder.local`` packages) served once over HTTP
(OpenAI-compatible ``POST /v1/embeddings``, ``tests/encoder_server.py``) from a host of its
own, so the pods of the default-suite story encode through ``encoder.http`` instead of each
loading torch and a model (measured: ~12 s of CPU per MiniLM load on this machine).

How it shares two cores, as an inference server in front of bulk and online traffic would:

* **two lanes per model**, each its own model instance: ``query`` (a reader's search, the
  gate's test queries) and ``passage`` (upserts, the gate's pairs, the backfill). A search
  never queues behind a backfill's batch (measured: 64 E5 passages take ~12 s here).
* **first come, first served** within a lane (a ticket queue, not a bare lock, which lets a
  late request overtake and starve an early one past its client's read timeout).
* **abandoned requests are dropped**: when its turn comes, a request whose client closed the
  connection (its read timeout passed, it will retry) is not encoded. Without this a queue
  longer than the client's timeout never drains: every retry queues behind answers nobody
  reads (the story's first runs stalled at Bridged that way).

Run as a process: ``python -m tests.cluster.encoder_host --port 8000``; the request's
``model`` picks the model (loaded on first use) and ``input_type`` the lane.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import threading
from typing import Any

from tests.encoder_server import ClientGone, client_gone

PORT = 8000
MODELS = ("all-MiniLM-L6-v2", "multilingual-e5-small")
LANES = ("query", "passage")


class Lane:
    """One model instance; requests encoded one at a time in arrival order."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._encoder: Any = None
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._serving = 0  # the ticket whose turn it is
        self.dropped = 0  # requests whose client had gone at their turn

    def encode(self, texts: list[str], kind: str) -> Any:
        with self._cond:
            ticket = next(self._tickets)
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            if client_gone():
                self.dropped += 1
                raise ClientGone
            if self._encoder is None:
                from index_runtime.encoders import open_encoder

                self._encoder = open_encoder(self.model)
            return self._encoder.encode(texts, "query" if kind == "query" else "passage")
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class Models:
    """A query lane and a passage lane for each bundled model."""

    def __init__(self) -> None:
        self._lanes = {(m, lane): Lane(m) for m in MODELS for lane in LANES}

    def encode(self, texts: list[str], kind: str, model: str) -> Any:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}: one of {MODELS}")
        return self._lanes[(model, "query" if kind == "query" else "passage")].encode(texts, kind)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--preload", action="store_true", help="load every lane's model before serving")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.encoder_server import start_server

    models = Models()
    if args.preload:
        for m in MODELS:
            for kind in LANES:
                models.encode(["warm up"], kind, m)
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
