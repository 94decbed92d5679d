"""Query traffic as migration data: a bounded, opt-in sample of the text queries an index
answers, which the migration gate encodes with both models to fit adapters on real queries
and to estimate ARR without labels.

Privacy: **off by default**. Query text is user input — it can carry names, addresses, ids —
and nobody expects a search index to retain it unless they turned that on. When on:

* only a share ``sample_rate`` of text queries is kept (vector queries have no text);
* at most ``max_queries`` distinct texts, each at most ``max_text_bytes`` (longer texts are
  skipped, not truncated: a truncated query is another query), so memory is bounded by
  ``max_queries × max_text_bytes`` (plus a fixed per-entry overhead);
* nothing older than ``retention_s`` is kept or handed out: expired texts are dropped when
  the log is read or written and by the runtime's maintenance loop (:meth:`QueryLog.expire`,
  every tick), so an index that stops receiving queries does not hold them past retention;
* texts live in memory only (a restart forgets them); the gate stores the *vectors* of the
  sampled queries (never their texts) in the migration's pairs object, which is deleted with
  the migration's other objects when it ends.

Turning the switch off (or a rate of 0) clears what was kept. Readers forward what they
sample to the writer (:class:`Forwarder`, like the mirror to the shadow, with the same
mirror-scope token); a standalone server or the writer keeps its own sample.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from index_runtime.contract import Env
from index_runtime.queues import take_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryLogSettings:
    enabled: bool = False
    sample_rate: float = 0.1  # share of text queries kept
    max_queries: int = 2000  # distinct texts kept at most (oldest evicted first)
    retention_s: float = 24 * 3600.0  # nothing older is kept or handed out
    max_text_bytes: int = 1024  # longer texts are skipped

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {self.sample_rate}")
        if not 1 <= self.max_queries <= 100_000:
            raise ValueError(f"max_queries must be 1..100000, got {self.max_queries}")
        if self.retention_s <= 0 or self.max_text_bytes < 1:
            raise ValueError("retention and max_text_bytes must be positive")

    @property
    def active(self) -> bool:
        return self.enabled and self.sample_rate > 0

    @property
    def max_bytes(self) -> int:
        """The bound on the texts kept (UTF-8 bytes)."""
        return self.max_queries * self.max_text_bytes

    @staticmethod
    def from_env(env: Mapping[str, str]) -> QueryLogSettings:
        """From the pod's environment (the VectorIndex's ``spec.queryLog``, set by the
        operator). Absent: off."""
        d = QueryLogSettings()
        return QueryLogSettings(
            enabled=env.get(Env.QUERY_LOG, "").strip().lower() in ("1", "true", "on"),
            sample_rate=float(env.get(Env.QUERY_LOG_RATE) or d.sample_rate),
            max_queries=int(env.get(Env.QUERY_LOG_MAX) or d.max_queries),
            retention_s=float(env.get(Env.QUERY_LOG_RETENTION_S) or d.retention_s),
        )


class QueryLog:
    """The sample itself. Thread-safe; ``offer`` is O(1) and never blocks on I/O."""

    def __init__(
        self,
        settings: QueryLogSettings | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        forward: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or QueryLogSettings()
        self.clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._texts: OrderedDict[str, float] = OrderedDict()  # text -> last seen, oldest first
        self._bytes = 0
        self.forward = forward  # a reader hands sampled texts to the writer instead
        self.offered = self.sampled = self.skipped_long = self.evicted = 0

    def offer(self, text: str) -> bool:
        """A text query was answered: keep it with probability ``sample_rate``."""
        s = self.settings
        if not s.active:
            return False
        self.offered += 1
        if self._rng.random() >= s.sample_rate:
            return False
        if len(text.encode()) > s.max_text_bytes:
            self.skipped_long += 1
            return False
        self.sampled += 1
        if self.forward is not None:
            self.forward(text)
        else:
            self.add([text])
        return True

    def add(self, texts: Iterable[str]) -> int:
        """Keep already-sampled texts (forwarded by a reader). Returns how many were kept.
        A log that forwards (a reader's) keeps none: only the writer's sample is ever read
        (by the migration gate), so texts posted to a reader would sit there unused."""
        s = self.settings
        if not s.active or self.forward is not None:
            return 0
        now, kept = self.clock(), 0
        with self._lock:
            for t in texts:
                n = len(t.encode())
                if not t or n > s.max_text_bytes:
                    continue
                if t in self._texts:
                    self._texts.move_to_end(t)
                else:
                    self._bytes += n
                self._texts[t] = now
                kept += 1
            self._prune(now)
        return kept

    def _prune(self, now: float) -> None:
        s = self.settings
        while self._texts:
            text, seen = next(iter(self._texts.items()))
            if len(self._texts) <= s.max_queries and now - seen <= s.retention_s:
                break
            del self._texts[text]
            self._bytes -= len(text.encode())
            self.evicted += 1

    def expire(self) -> int:
        """Drop the texts older than the retention now (the runtime calls it every
        maintenance tick: without it a log nobody writes or reads would keep its texts past
        ``retention_s``). Returns how many were dropped."""
        with self._lock:
            before = len(self._texts)
            self._prune(self.clock())
            return before - len(self._texts)

    def snapshot(self) -> list[str]:
        """The texts kept now (oldest first), after dropping expired ones."""
        with self._lock:
            self._prune(self.clock())
            return list(self._texts)

    def configure(self, settings: QueryLogSettings) -> None:
        """New settings; switched off (or a rate of 0): everything kept is dropped."""
        with self._lock:
            self.settings = settings
            if not settings.active:
                self._texts.clear()
                self._bytes = 0
            else:
                self._prune(self.clock())

    def stats(self) -> dict[str, Any]:
        """Counts (never texts), after dropping expired texts: ``kept`` and ``bytes`` are what
        is held now."""
        with self._lock:
            self._prune(self.clock())
            return {
                "enabled": self.settings.enabled,
                "sample_rate": self.settings.sample_rate,
                "kept": len(self._texts),
                "bytes": self._bytes,
                "max_bytes": self.settings.max_bytes,
                "offered": self.offered,
                "sampled": self.sampled,
                "skipped_long": self.skipped_long,
                "evicted": self.evicted,
            }


class Forwarder:
    """A reader's sampled texts, posted in batches to the writer's
    ``/v1/indexes/{index}/internal/queries`` (mirror scope) by one sender thread; a full
    queue or an unreachable writer drops them (counted): the query path never waits."""

    def __init__(
        self,
        url: str,
        index: str,
        token: str | None = None,
        queue_size: int = 256,
        batch: int = 64,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/v1/indexes/{index}/internal/queries"
        # the reader's mirror-scope token (Env.SHADOW_TOKEN, from a Secret); the writer accepts it
        self.token = token if token is not None else os.environ.get(Env.SHADOW_TOKEN) or None
        self.batch = batch
        self._q: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.sent = self.dropped = self.failed_posts = 0
        self._thread = threading.Thread(target=self._run, name=f"querylog-{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __call__(self, text: str) -> None:
        try:
            self._q.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def post(self, texts: list[str], attempts: int = 3, backoff_s: float = 0.2) -> bool:
        body = json.dumps({"texts": texts}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(attempts):
            req = urllib.request.Request(self.endpoint, body, headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    resp.read()
                self.sent += len(texts)
                return True
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # refused (scope, size): retrying cannot help
                    break
            except (urllib.error.URLError, OSError):
                pass
            if self._stop.wait(backoff_s * 2**attempt):
                break
        self.failed_posts += 1
        self.dropped += len(texts)
        log.warning("forwarding %d sampled queries to the writer failed", len(texts))
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = take_batch(self._q, self.batch, 0.5)
            if batch:
                self.post(batch)
