"""Readers mirror a share of their queries to the shadow service, which holds the exact oracle
and the index's single overlap window. Non-blocking for the query path: a bounded queue, one
sender thread posting batches; a full queue or an unreachable shadow drops samples (counted).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import urllib.error
import urllib.request
from typing import Any

from index_runtime.contract import Env
from index_runtime.queues import take_batch

log = logging.getLogger(__name__)


class Mirror:
    def __init__(
        self,
        url: str,
        index: str,
        queue_size: int = 256,
        batch: int = 32,
        token: str | None = None,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/v1/indexes/{index}/internal/samples"
        # a mirror-scope token the shadow accepts (Env.SHADOW_TOKEN, from a Secret)
        self.token = token if token is not None else os.environ.get(Env.SHADOW_TOKEN) or None
        self.batch = batch
        self._q: queue.Queue[tuple[int, list[float], Any]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.sent = 0
        self.dropped = 0
        self.failed_posts = 0
        self._thread = threading.Thread(target=self._run, name=f"mirror-{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def offer(self, manifest_version: int, vector: list[float], flt: Any) -> None:
        try:
            self._q.put_nowait((manifest_version, vector, flt))
        except queue.Full:
            self.dropped += 1

    def _post(self, version: int, items: list[tuple[list[float], Any]]) -> None:
        body = json.dumps(
            {"manifest_version": version, "queries": [{"vector": v, "filter": f} for v, f in items]}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.endpoint, body, headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                resp.read()
            self.sent += len(items)
        except (urllib.error.URLError, OSError) as exc:
            self.failed_posts += 1
            self.dropped += len(items)
            log.warning("mirroring %d samples to the shadow failed: %s", len(items), exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = take_batch(self._q, self.batch, 0.2)
            if not batch:
                continue
            by_version: dict[int, list[tuple[list[float], Any]]] = {}
            for version, vec, flt in batch:
                by_version.setdefault(version, []).append((vec, flt))
            for version, items in by_version.items():
                self._post(version, items)
