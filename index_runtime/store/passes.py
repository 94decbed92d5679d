"""A pass (compaction's GC) run on a background thread whenever asked, requests coalesced.

Compaction asks for a GC pass after each group's commit, so the old segments' unlinks run
while the next groups are read and written instead of all at the end. :meth:`request` returns
at once; a request made while a pass runs starts one more pass after it (never two at a
time). :meth:`close` joins the thread (a pass in progress completes first; one asked for but
not started is dropped) and raises the first failure, which also stopped the thread. GC is idempotent: a pass that did not run,
or died half-way, leaves objects that the next GC collects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class BackgroundPasses:
    def __init__(self, run: Callable[[], object], name: str = "driftless-pass") -> None:
        self._run = run
        self._cond = threading.Condition()
        self._wanted = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._wanted = False
            try:
                self._run()
            except BaseException as exc:  # raised by close(); no pass runs after a failure
                with self._cond:
                    self._error = exc
                return

    def request(self) -> None:
        """Ask for a pass to start after the one in progress (if any)."""
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def close(self) -> None:
        """Join the thread once the pass in progress (if any) is over; raise the first failure."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundPasses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:  # the caller's error wins; still join the thread
            try:
                self.close()
            except Exception as failed:  # secondary here, but not silent
                log.warning("%s failed while the caller failed too: %s", self._thread.name, failed)
        else:
            self.close()
