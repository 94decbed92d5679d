"""Status conditions in the Kubernetes convention (PURE)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None = Unknown
    reason: str  # CamelCase
    message: str


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None,
    new: Iterable[Condition],
    generation: int,
    now: float,
) -> list[dict[str, Any]]:
    """The new conditions, keeping ``lastTransitionTime`` of those whose status did not
    change; conditions not mentioned are kept as they were."""
    by_type = {str(c["type"]): dict(c) for c in old or ()}
    for c in new:
        status = "Unknown" if c.status is None else ("True" if c.status else "False")
        prev = by_type.get(c.type)
        since = (
            prev["lastTransitionTime"] if prev and prev.get("status") == status else rfc3339(now)
        )
        by_type[c.type] = {
            "type": c.type,
            "status": status,
            "reason": c.reason,
            "message": c.message[:1024],
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }
    return [by_type[t] for t in sorted(by_type)]


def condition(conds: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conds or () if c.get("type") == type_), None)
