"""An S3 fault proxy: a threaded HTTP proxy in front of moto's server that injects faults.

Each request draws one outcome from a seeded schedule (:class:`Schedule`):

* ``ok``: forwarded unchanged;
* ``500`` / ``503``: an S3 XML error (``InternalError`` / ``SlowDown``), *without* forwarding;
* ``500_after``: forwarded (the write lands!) and then answered 500: the ambiguous case;
* ``reset``: the connection is closed without an answer (half the time after forwarding);
* ``latency``: forwarded after a delay;
* ``truncate``: GETs only: the body is cut in half and the connection closed, with the
  original Content-Length (the client sees a short read);
* ``short``: GETs only: the body is cut in half *and* Content-Length is rewritten to match
  (a lying middlebox: only a checksum can tell).

Usage: ``with FaultProxy(moto_endpoint, Schedule(seed, {"503": 0.2})) as url: ...``.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import SplitResult, urlsplit

KINDS = ("500", "503", "500_after", "reset", "latency", "truncate", "short")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class Schedule:
    """Seeded per-request outcomes: ``rates`` maps a kind to its probability (the rest: ok).
    ``enabled`` turns all faults off (for the clean read after a trial)."""

    def __init__(self, seed: int, rates: Mapping[str, float], latency_s: float = 0.05) -> None:
        unknown = set(rates) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}")
        self.rng = random.Random(seed)
        self.rates = dict(rates)
        self.latency_s = latency_s
        self.enabled = True
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def draw(self, method: str) -> str:
        with self._lock:
            x = self.rng.random()
            if not self.enabled:
                return "ok"
            for kind, p in self.rates.items():
                if x < p:
                    if kind in ("truncate", "short") and method != "GET":
                        return "ok"
                    self.injected[kind] += 1
                    return kind
                x -= p
            return "ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    break
                out += chunk
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            hdrs = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            return resp.status, hdrs, data
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        sched = self.server.schedule
        body = self._body()
        kind = sched.draw(self.command)
        if kind in ("500", "503"):
            code, msg = ("InternalError", "injected") if kind == "500" else ("SlowDown", "slow")
            err = s3_error(code, msg)
            self._send(int(kind), [("Content-Type", "application/xml")], err, len(err))
            return
        if kind == "reset":
            if sched.rng.random() < 0.5:
                self._forward(body)  # the request may have landed
            self._reset()
            return
        if kind == "latency":
            time.sleep(sched.latency_s)
        status, headers, data = self._forward(body)
        if kind == "500_after":
            err = s3_error("InternalError", "injected after forwarding")
            self._send(500, [("Content-Type", "application/xml")], err, len(err))
        elif kind in ("truncate", "short") and status == 200 and len(data) > 1:
            cut = data[: len(data) // 2]
            self._send(status, headers, cut, len(data) if kind == "truncate" else len(cut))
            self.wfile.flush()
            self._reset()
        else:
            self._send(status, headers, data, len(data))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: SplitResult
    schedule: Schedule


class FaultProxy:
    """A proxy on 127.0.0.1:<free port> in front of ``upstream``; ``url`` is its endpoint."""

    def __init__(self, upstream: str, schedule: Schedule) -> None:
        self.schedule = schedule
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.upstream = urlsplit(upstream)
        self.server.schedule = schedule
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
