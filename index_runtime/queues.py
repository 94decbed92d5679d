"""Batching off a queue for the background senders (the oracle, the sample mirror)."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take_batch(q: queue.Queue[T], size: int, wait_s: float) -> list[T]:
    """Wait up to ``wait_s`` for one item, then take whatever else is queued, up to ``size``.
    Returns an empty list if nothing arrived (so the caller can check for a stop)."""
    try:
        batch = [q.get(timeout=wait_s)]
    except queue.Empty:
        return []
    while len(batch) < size:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            break
    return batch
