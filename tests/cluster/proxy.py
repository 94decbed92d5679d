"""A userspace kube-proxy for one ClusterIP Service port: TCP on (ip, port), round-robin.

Each `ServiceProxy` runs a small asyncio server on its own daemon thread and event loop, so it
is usable from anywhere, including the kubelet's asyncio loop (no call blocks for long:
`__init__` waits only for the bind, `set_endpoints` swaps a list, `close` joins the thread).

Semantics, as the userspace kube-proxy had them: each new connection goes to the next
endpoint in round-robin order; if connecting to it fails, the next one is tried (each
endpoint once); with no endpoints, or none accepting, the client's connection is reset
(SO_LINGER 0). `set_endpoints` affects new connections only; open ones keep their endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from concurrent.futures import Future

CONNECT_TIMEOUT_S = 2.0


def rotate(endpoints: list[tuple[str, int]], cursor: int) -> list[tuple[str, int]]:
    """The order in which a new connection tries `endpoints`, starting at `cursor`."""
    if not endpoints:
        return []
    i = cursor % len(endpoints)
    return endpoints[i:] + endpoints[:i]


class ServiceProxy:
    """Listen on (ip, port) and forward each connection to one of the endpoints."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self._endpoints: list[tuple[str, int]] = []
        self._cursor = 0
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.Task[None]] = set()
        started: Future[asyncio.Server] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"proxy-{ip}:{port}", daemon=True
        )
        self._thread.start()
        self._server = started.result(timeout=10)  # raises the bind error, if any

    def set_endpoints(self, endpoints: list[tuple[str, int]]) -> None:
        """Ready endpoints for NEW connections (thread-safe: one list assignment)."""
        self._endpoints = list(endpoints)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return list(self._endpoints)

    def close(self) -> None:
        """Stop listening, drop open connections, stop the thread."""
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServiceProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop thread

    def _run(self, started: Future[asyncio.Server]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, self.ip, self.port, reuse_address=True)
            )
        except BaseException as exc:
            started.set_exception(exc)
            self._loop.close()
            return
        started.set_result(server)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        order = rotate(self._endpoints, self._cursor)
        self._cursor += 1
        for ip, port in order:
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(ip, port), CONNECT_TIMEOUT_S
                )
            except (TimeoutError, OSError):
                continue
            try:
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            finally:
                up_w.close()
                writer.close()
            return
        _reset(writer)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close `dst` (HTTP clients may half-close after a request)."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: what a client sees when a Service has no endpoints."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
