"""An OpenAI-compatible ``POST /v1/embeddings`` on loopback (stdlib HTTP server in a thread):
what pods that encode with a model themselves (the backfill's worker pods, local processes in
the operator tests) reach when the EmbeddingModel points at it."""

from __future__ import annotations

import http.server
import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_request = threading.local()


class ClientGone(Exception):
    """Raised by ``encode`` when ``client_gone()``: the request is dropped unanswered."""


def client_gone() -> bool:
    """Inside ``encode``: the client of the request being served has closed its connection
    (it timed out and gave up): the server need not compute an answer nobody reads. A client
    sends nothing after its request, so a readable socket means end of file (or a reset)."""
    sock = getattr(_request, "connection", None)
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def start_server(
    encode: Callable[[list[str], str, str], Any],
    refuse: Callable[[dict[str, Any]], int | None] = lambda body: None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``encode`` (texts, kind, model -> vectors); a status ``refuse`` returns for a
    request body is answered instead (e.g. 503 for an outage). Returns the server
    (``shutdown()`` it) and the base URL ending in /v1. ``host``/``port``: where it listens
    (the local cluster's encoder host listens on its own address)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            _request.connection = self.connection  # what client_gone() looks at
            status = refuse(body)
            if status is not None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            kind = str(body.get("input_type") or "passage")
            try:
                vecs = encode(list(body["input"]), kind, str(body.get("model") or ""))
            except ClientGone:  # nobody reads the answer
                self.close_connection = True
                return
            data = [{"index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vecs)]
            out = json.dumps({"data": data}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}/v1"


@contextmanager
def embeddings_server(encode: Callable[[list[str], str], Any]) -> Iterator[str]:
    """Serve ``encode`` (texts, kind -> vectors); yields the base URL ending in /v1."""
    server, url = start_server(lambda texts, kind, model: encode(texts, kind))
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
