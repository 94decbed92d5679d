"""Long operations of one index (compaction, training, a migration), as the admin API shows them.

An admin call that starts long work answers 202 at once with an operation id; the work runs in
a runtime thread and ``GET /v1/indexes/{name}/admin/operations/{id}`` reports its state:
``running`` -> ``succeeded`` (with a result) or ``failed`` (with a reason and a message).

Rules (pure: no threads here, only a lock and a clock):
- ids are uuid4 hex; the history is bounded (``keep`` finished operations per index, oldest
  dropped first; running ones are never dropped);
- one running operation per kind: a second start of the same kind does not start anything and
  returns the running operation (``started: false``, still 202), so a retried Job attaches to
  the work it started before instead of failing or doubling it;
- operations live in the process: after a restart an id is unknown (404) and the caller starts
  again (compaction and training are safe to repeat; a migration resumes from its manifest
  record).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from index_runtime.errors import DriftlessError, NotFoundError

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
KINDS = ("compact", "train", "migration")


@dataclass
class Operation:
    id: str
    kind: str
    index: str
    started_at: float  # unix seconds
    state: str = RUNNING
    finished_at: float | None = None
    updated_at: float = 0.0  # last progress report (unix seconds): the caller's liveness signal
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None  # {"reason": CamelCase, "message": ...}

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.id,
            "kind": self.kind,
            "index": self.index,
            "state": self.state,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
            "progress": dict(self.progress),
            "result": self.result,
            "error": self.error,
        }


class WorkFailed(Exception):
    """Work that ended without an exception of its own but failed (a migration's gate)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def error_of(exc: BaseException) -> dict[str, str]:
    """The reason and message an operation failed with (DriftlessError's own reason)."""
    known = (DriftlessError, WorkFailed)
    reason = exc.reason if isinstance(exc, known) else type(exc).__name__
    return {"reason": reason, "message": str(exc) or type(exc).__name__}


class Operations:
    """The operations of one index: begin, report progress, finish or fail, look up."""

    def __init__(self, index: str, keep: int = 32, clock: Callable[[], float] = time.time) -> None:
        if keep < 1:
            raise ValueError("keep at least one finished operation")
        self.index = index
        self.keep = keep
        self.clock = clock
        self._lock = threading.Lock()
        self._ops: OrderedDict[str, Operation] = OrderedDict()  # oldest first

    def begin(self, kind: str) -> tuple[Operation, bool]:
        """A new running operation of ``kind``, or the one already running: (op, started)."""
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        with self._lock:
            for op in self._ops.values():
                if op.kind == kind and op.state == RUNNING:
                    return op, False
            now = self.clock()
            op = Operation(uuid.uuid4().hex, kind, self.index, now, updated_at=now)
            self._ops[op.id] = op
            self._trim()
            return op, True

    def report(self, op: Operation, **progress: Any) -> None:
        """Progress of a running operation (merged into ``progress``; bumps ``updated_at``)."""
        with self._lock:
            op.progress.update(progress)
            op.updated_at = self.clock()

    def finish(self, op: Operation, result: dict[str, Any] | None = None) -> None:
        self._end(op, SUCCEEDED, result=result or {})

    def fail(self, op: Operation, exc: BaseException) -> None:
        self._end(op, FAILED, error=error_of(exc))

    def _end(self, op: Operation, state: str, **fields: Any) -> None:
        with self._lock:
            if op.state != RUNNING:
                return
            op.state = state
            op.finished_at = op.updated_at = self.clock()
            for k, v in fields.items():
                setattr(op, k, v)
            self._trim()

    def _trim(self) -> None:
        """Under ``_lock``: drop the oldest finished operations beyond ``keep``."""
        finished = [i for i, op in self._ops.items() if op.state != RUNNING]
        for op_id in finished[: max(0, len(finished) - self.keep)]:
            del self._ops[op_id]

    def get(self, op_id: str) -> Operation:
        with self._lock:
            op = self._ops.get(op_id)
        if op is None:
            raise NotFoundError(
                f"no operation {op_id!r} on index {self.index!r} (unknown, expired from the "
                f"history, or the server restarted: start it again)"
            )
        return op

    def describe(self, op_id: str) -> dict[str, Any]:
        """The operation's JSON, read under the lock (a consistent copy)."""
        op = self.get(op_id)
        with self._lock:
            return op.to_json()

    def running(self, kind: str) -> Operation | None:
        with self._lock:
            ops = self._ops.values()
            return next((o for o in ops if o.kind == kind and o.state == RUNNING), None)

    def list(self) -> list[Operation]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._ops.values()))
