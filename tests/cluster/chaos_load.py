"""Client load for the chaos trials: writers with a ledger of acknowledged upserts and
deletes, readers querying, both retrying as the README documents (tests/cluster/chaos_plan.py
``next_wait``: 429 / 503 / 507 and no answer are retried after ``Retry-After`` or a backoff,
within a per-op budget; anything else is final).

Every request opens a new connection (no keep-alive), as a fleet of clients spreads over a
Service's endpoints: a killed or stopped pod is hit by the requests the proxy sends it.
Times are ``time.monotonic()`` seconds. The URL may be a callable, re-resolved for every
attempt (a headless Service's pod address can change when the pod is replaced).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.cluster.chaos_plan import Op, ledger_check, next_wait
from tests.fake_encoder import VOCAB

Url = str | Callable[[], str]
FETCH_BATCH = 500  # keys per fetch of the final read-back (the API takes up to 10,000)


@dataclass(frozen=True)
class Answer:
    """One logical request after its retries: the last status (None: no answer at all)."""

    status: int | None
    body: Any
    attempts: int
    t0: float
    t1: float

    @property
    def ok(self) -> bool:
        return self.status == 200


class RetryClient:
    """An HTTP client that retries as documented. ``budget_s``: how long one logical request
    may take, retries included; ``attempt_timeout_s``: one attempt's connect/read timeout (a
    stopped process accepts connections but never answers)."""

    def __init__(
        self,
        url: Url,
        token: str,
        *,
        budget_s: float = 30.0,
        attempt_timeout_s: float = 3.0,
        seed: int = 0,
    ) -> None:
        self._url, self.budget_s, self.rng = url, budget_s, random.Random(seed)
        self.http = httpx.Client(
            timeout=attempt_timeout_s,
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def base(self) -> str:
        return self._url() if callable(self._url) else self._url

    def call(
        self, method: str, path: str, body: Any = None, stop: threading.Event | None = None
    ) -> Answer:
        t0 = time.monotonic()
        attempt = 0
        while True:
            status: int | None = None
            retry_after: str | None = None
            data: Any = None
            try:
                r = self.http.request(method, self.base() + path, json=body)
                status, retry_after = r.status_code, r.headers.get("retry-after")
                data = r.json() if "json" in r.headers.get("content-type", "") else r.text
            except (httpx.HTTPError, LookupError, OSError, ValueError):
                pass  # no answer (refused, reset, timed out; no ready pod behind the Service)
            attempt += 1
            now = time.monotonic()
            if status == 200:
                return Answer(status, data, attempt, t0, now)
            wait = next_wait(status, retry_after, attempt - 1, now - t0, self.budget_s, self.rng)
            if wait is None or (stop is not None and stop.wait(wait)):
                return Answer(status, data, attempt, t0, time.monotonic())
            if stop is None:
                time.sleep(wait)

    def close(self) -> None:
        self.http.close()


def words(rng: random.Random, n: int = 8) -> str:
    """Text the test encoders understand (tests/fake_encoder.py's vocabulary; real models
    encode it as any text)."""
    return " ".join(f"w{rng.randrange(VOCAB)}" for _ in range(n))


class WriteLoad(threading.Thread):
    """Upserts (texts) and deletes on its own keys ``<prefix>0 ..``, one op at a time, each
    retried within the budget and recorded in the ledger (``ops``, ``acked``). The keys of an
    op that was never acknowledged are left alone afterwards: a request that timed out may
    still land later, and a later acknowledged op on the same key would then look lost."""

    def __init__(
        self, client: RetryClient, index: str, prefix: str, keys: int, seed: int, pause_s: float
    ) -> None:
        super().__init__(daemon=True, name=f"write-{prefix}")
        self.client, self.index, self.pause_s = client, index, pause_s
        self.keys = [f"{prefix}{i}" for i in range(keys)]
        self.rng = random.Random(seed)
        self.ops: list[Op] = []
        self.acked: list[bool] = []
        self.times: list[tuple[float, float, bool]] = []  # (start, end, acknowledged) per op
        self.left_alone: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            free = [k for k in self.keys if k not in self.left_alone]
            if not free:
                return
            chosen = self.rng.sample(free, min(len(free), self.rng.choice([1, 2, 5])))
            op: Op
            if self.rng.random() < 0.7:
                op = ("upsert", {k: f"{words(self.rng)} {k}v{i}" for k in chosen})
                body: dict[str, Any] = {"keys": chosen, "texts": list(op[1].values())}
            else:
                op, body = ("delete", dict.fromkeys(chosen)), {"keys": chosen}
            with self.lock:
                self.ops.append(op)
                self.acked.append(False)
            ans = self.client.call("POST", f"/v1/indexes/{self.index}/{op[0]}", body, self.stop)
            with self.lock:
                self.acked[-1] = ans.ok
                self.times.append((ans.t0, ans.t1, ans.ok))
            if not ans.ok:
                self.left_alone.update(chosen)
            i += 1
            self.stop.wait(self.pause_s)

    def ledger(self) -> tuple[list[Op], list[bool]]:
        with self.lock:
            return list(self.ops), list(self.acked)


class ReadLoad(threading.Thread):
    """Text queries through the readers' Service, each retried within its budget; records
    (start, end, answered) per query."""

    def __init__(self, client: RetryClient, index: str, queries: list[str], pause_s: float) -> None:
        super().__init__(daemon=True, name="read")
        self.client, self.index, self.queries, self.pause_s = client, index, queries, pause_s
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()
        self.inflight: float | None = None  # the start of the query being retried now

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            q = {"text": self.queries[i % len(self.queries)], "k": 5}
            self.inflight = time.monotonic()
            ans = self.client.call("POST", f"/v1/indexes/{self.index}/search", q, self.stop)
            self.inflight = None
            if not self.stop.is_set() or ans.ok:  # a query cut short by the end is no sample
                self.samples.append((ans.t0, ans.t1, ans.ok))
            i += 1
            self.stop.wait(self.pause_s)


class Load:
    """``writers`` WriteLoads (keys ``<prefix><w>-<i>``) on ``write_url`` and ``readers``
    ReadLoads on ``read_url``; ``check()`` reads every ledger key back from the writer and
    ``check_readers()`` through the readers, and applies the ledger."""

    def __init__(
        self,
        index: str,
        *,
        write_url: Url,
        read_url: Url,
        write_token: str,
        read_token: str,
        prefix: str,
        seed: int,
        writers: int = 2,
        readers: int = 2,
        keys: int = 40,
        pause_s: float = 0.05,
        write_budget_s: float = 60.0,
        query_budget_s: float = 10.0,
    ) -> None:
        self.index, self.write_url, self.write_token = index, write_url, write_token
        self.read_url, self.read_token = read_url, read_token
        self.query_budget_s, self.prefix = query_budget_s, prefix
        rng = random.Random(seed)
        self.writes = [
            WriteLoad(
                RetryClient(write_url, write_token, budget_s=write_budget_s, seed=seed * 10 + w),
                index,
                f"{prefix}{w}-",
                keys,
                seed * 10 + w,
                pause_s,
            )
            for w in range(writers)
        ]
        queries = [words(rng, 6) for _ in range(50)]
        self.reads = [
            ReadLoad(
                RetryClient(read_url, read_token, budget_s=query_budget_s, seed=seed * 10 + 5 + r),
                index,
                queries,
                pause_s,
            )
            for r in range(readers)
        ]

    def start(self) -> Load:
        for t in (*self.writes, *self.reads):
            t.start()
        return self

    def stop(self) -> None:
        threads: list[WriteLoad | ReadLoad] = [*self.writes, *self.reads]
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(90)
            t.client.close()

    def write_samples(self) -> list[tuple[float, float, bool]]:
        return [s for w in self.writes for s in list(w.times)]

    def read_samples(self) -> list[tuple[float, float, bool]]:
        return [s for r in self.reads for s in list(r.samples)]

    def reads_settled(self, t: float) -> bool:
        """No query started before ``t`` is still being retried (its outcome is recorded)."""
        return all(r.inflight is None or r.inflight > t for r in self.reads)

    def check(self, budget_s: float = 120.0) -> tuple[list[str], list[str], int, int]:
        """(lost, resurrected, acknowledged ops, failed ops) after ``stop()``, read back from
        the writer (its fresh view: every acknowledged write, flushed or in its WAL)."""
        return self._check(self.write_url, self.write_token, budget_s)

    def check_readers(self, converge_s: float = 60.0) -> tuple[list[str], list[str]]:
        """(lost, resurrected) read back through the readers' Service, which serve what the
        writer flushed to S3: polled until the ledger holds there too or ``converge_s``
        passed (a write in the writer's WAL reaches the readers after a flush and a refresh)."""
        deadline = time.monotonic() + converge_s
        while True:
            lost, back, _, _ = self._check(self.read_url, self.read_token, 30.0)
            if not (lost or back) or time.monotonic() > deadline:
                return lost, back
            time.sleep(2.0)

    def retire(self, budget_s: float = 120.0) -> int:
        """Deletes every key of this load's writers (after its checks): the next trials'
        loads start on keys of their own, so the index does not grow by a load per trial (a
        migration re-encodes every row: at ~1,160 rows after three cutovers on 240 docs, one
        took 4-7 min). Returns the keys deleted; raises if the writer never acknowledges."""
        client = RetryClient(self.write_url, self.write_token, budget_s=budget_s)
        try:
            n = 0
            for w in self.writes:
                ans = client.call("POST", f"/v1/indexes/{self.index}/delete", {"keys": w.keys})
                if not ans.ok:
                    raise RuntimeError(f"retiring {self.prefix}: delete {ans.status} {ans.body!r}")
                n += len(w.keys)
            return n
        finally:
            client.close()

    def _check(self, url: Url, token: str, budget_s: float) -> tuple[list[str], list[str], int, int]:
        client = RetryClient(url, token, budget_s=budget_s)
        lost: list[str] = []
        back: list[str] = []
        acked_n = failed_n = 0
        try:
            for w in self.writes:
                ops, acked = w.ledger()
                acked_n += sum(acked)
                failed_n += len(acked) - sum(acked)
                shown = read_back(client, self.index, w.keys)
                lo, ba = ledger_check(ops, acked, shown)
                lost += lo
                back += ba
        finally:
            client.close()
        return lost, back, acked_n, failed_n


def read_back(client: RetryClient, index: str, keys: list[str]) -> dict[str, str]:
    """key -> text of every present key (fetch, retried); raises if the writer never answers."""
    shown: dict[str, str] = {}
    for lo in range(0, len(keys), FETCH_BATCH):
        ans = client.call("POST", f"/v1/indexes/{index}/fetch", {"keys": keys[lo : lo + FETCH_BATCH]})
        if not ans.ok:
            raise RuntimeError(f"fetch for the ledger check: {ans.status} {ans.body!r}")
        shown.update({str(row["key"]): str(row.get("text")) for row in ans.body["rows"]})
    return shown
