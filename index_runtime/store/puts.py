"""Object puts on one background I/O thread, one in flight at a time (compaction output).

Compaction builds its next output segment in memory while the previous one is written and
fsynced: :meth:`BackgroundPuts.submit` hands a put to the thread after the put before it has
finished (so at most one output waits in memory besides the one being built), and raises that
earlier put's error if it failed. :meth:`BackgroundPuts.wait` returns once every put has
finished and raises the first failure; :meth:`BackgroundPuts.wait_for` does the same for some
of them (one compaction group's outputs, while the next group's are being put). The caller
commits nothing that references an object unless a wait covering its put returned. The thread
is always joined by :meth:`close` (a context manager exit), so no put outlives the caller's
error handling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

PutFn = Callable[[str, bytes | memoryview], None]


class BackgroundPuts:
    def __init__(self, put: PutFn, name: str = "driftless-put") -> None:
        self._put = put
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._last: Future[None] | None = None

    def _settle(self) -> None:
        """Wait for the put in flight; raise its error."""
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def submit(self, key: str, data: bytes | memoryview) -> Future[None]:
        """Start putting ``data`` at ``key`` once the previous put has finished; returns the
        put's future (for :meth:`wait_for`)."""
        self._settle()
        self._last = self._pool.submit(self._put, key, data)
        return self._last

    def wait(self) -> None:
        """Every submitted put has finished; raises the first failure."""
        self._settle()

    def wait_for(self, puts: Iterable[Future[None]]) -> None:
        """These puts (futures :meth:`submit` returned) have finished; raises the first failure
        among them. Later puts may still be in flight."""
        for put in puts:
            put.result()

    def close(self) -> None:
        """Join the thread (a put in flight completes or fails first; its error is dropped:
        the caller is already handling one, or called :meth:`wait`)."""
        self._pool.shutdown(wait=True)
        self._last = None

    def __enter__(self) -> BackgroundPuts:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
