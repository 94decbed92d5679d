"""Local-storage health of one writer: whether it takes writes, why not, and error counts.

A pure record the writer updates (``failed`` / ``recovered``) and the status document and
metrics read (``condition``). Ops: ``epoch`` (taking the writer epoch at open), ``wal`` (an
append), ``flush`` (segments + manifest commit, after the WAL made the rows durable; object-store
errors count here too). Kinds: ``no_space``, ``io``, else the error's reason
(``StoreUnavailable``, ...).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from index_runtime.errors import DriftlessError
from index_runtime.faults import error_kind

#: ops whose failure means new writes are refused (a failing flush only delays them)
BLOCKING = ("epoch", "wal")
OPS = ("epoch", "wal", "flush")


@dataclass
class StorageState:
    problems: dict[str, DriftlessError] = field(default_factory=dict)  # op -> last error
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, kind) -> count
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, op: str, exc: DriftlessError) -> None:
        with self._lock:
            self.problems[op] = exc
            self.errors[(op, error_kind(exc))] += 1

    def recovered(self, op: str) -> None:
        if op in self.problems:  # (the common case costs no lock)
            with self._lock:
                self.problems.pop(op, None)

    def condition(self) -> dict[str, Any]:
        """``{"writable", "reason", "message", "flush_error", "errors"}`` for the status:
        ``writable`` is False while the epoch is not taken or the last WAL append failed;
        ``reason``/``message`` are the blocking error's (then a failing flush's), else None."""
        with self._lock:
            problems = dict(self.problems)
            errors = dict(self.errors)
        blocking = next((problems[op] for op in BLOCKING if op in problems), None)
        shown = blocking or problems.get("flush")
        return {
            "writable": blocking is None,
            "reason": shown.reason if shown else None,
            "message": str(shown) if shown else None,
            "flush_error": str(problems["flush"]) if "flush" in problems else None,
            "errors": [
                {"op": op, "kind": kind, "count": n} for (op, kind), n in sorted(errors.items())
            ],
        }
