"""Seeded fault trials and the acknowledged-writes check (shared by the tests and
bench/faults.py).

A trial runs a random workload (upserts of small and bulk batches, deletes, flushes) against
a writer whose storage misbehaves: a disk fault armed at a named point, or S3 behind the fault
proxy. Every op is either acknowledged or answered with an error. Then the writer is abandoned
without closing (as a SIGKILL leaves it), a new writer opens on clean storage, and the state
is compared key by key with the model:

* a key whose last acknowledged op is an upsert must show that version, or that of a later
  unacknowledged op (an error may hide a write that landed: S3 answered 500 after storing);
  anything else is **lost**;
* a key whose last acknowledged op is a delete must be absent, unless a later unacknowledged
  upsert landed; a visible older version is **resurrected**.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index_runtime import faults
from index_runtime.errors import DriftlessError
from index_runtime.store.objects import LocalDirStore, ObjectStore, S3Config, S3Store
from index_runtime.store.reader import Snapshot
from index_runtime.store.writer import IndexWriter, WriterConfig
from tests.crash_worker import DIM, SPEC
from tests.helpers import vec

CONFIG = WriterConfig(flush_rows=24, bulk_rows=16, flush_interval_s=3600, gc_grace_s=0.0)
KEYS = 60

DISK_FAULTS: dict[str, tuple[str, str]] = {
    # name: (point, errno); "wal.fsync+truncate" also fails the cut, forcing a fence
    "disk: ENOSPC at WAL write": ("wal.write", "ENOSPC"),
    "disk: EIO at WAL fsync": ("wal.fsync", "EIO"),
    "disk: EIO at WAL fsync, cut fails too": ("wal.fsync", "EIO"),
    "disk: ENOSPC at segment put": ("segment.put", "ENOSPC"),
    "disk: ENOSPC at manifest put": ("manifest.put", "ENOSPC"),
    "disk: EIO at manifest put": ("manifest.put", "EIO"),
}

S3_FAULTS: dict[str, dict[str, float]] = {
    "s3: 500 InternalError": {"500": 0.25},
    "s3: 503 SlowDown": {"503": 0.25},
    "s3: 500 after the write landed": {"500_after": 0.2},
    "s3: connection reset": {"reset": 0.15},
    "s3: latency 50 ms": {"latency": 0.3},
    "s3: truncated GET body": {"truncate": 0.3, "short": 0.2},
    "s3: heavy mix (retries run out)": {"500": 0.15, "503": 0.1, "500_after": 0.1, "reset": 0.1},
    "s3: all of the above": {
        "500": 0.05,
        "503": 0.05,
        "500_after": 0.05,
        "reset": 0.05,
        "latency": 0.05,
        "truncate": 0.05,
        "short": 0.05,
    },
}


@dataclass
class Outcome:
    acked_ops: int = 0
    failed_ops: int = 0
    acked_rows: int = 0  # rows of acknowledged upserts and deletes
    lost: list[int] = field(default_factory=list)
    resurrected: list[int] = field(default_factory=list)
    reader_errors: int = 0  # snapshots read through the faults that raised (allowed)
    reader_wrong: int = 0  # ... that returned other rows than the clean read (never allowed)
    injected: int = 0  # faults injected (disk: OSErrors raised; S3: requests the proxy broke)


Op = tuple[str, list[int]]


def workload(rng: random.Random, n_ops: int = 16) -> list[Op]:
    ops: list[Op] = []
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.55:
            size = rng.choice([1, 3, 8, 12, 20])  # 20 >= bulk_rows: the bulk path
            ops.append(("upsert", rng.sample(range(KEYS), size)))
        elif r < 0.8:
            ops.append(("delete", rng.sample(range(KEYS), rng.choice([1, 4, 10]))))
        else:
            ops.append(("flush", []))
    return ops


def apply(w: IndexWriter, i: int, op: Op) -> None:
    kind, keys = op
    if kind == "upsert":
        w.upsert(keys, {"m": np.stack([vec(k, i, DIM) for k in keys])})
    elif kind == "delete":
        w.delete(keys)
    else:
        w.flush()


def allowed_states(ops: list[Op], acked: list[bool], key: int) -> tuple[set[int | None], str]:
    """The versions (op index, None = absent) ``key`` may show, and what its last
    acknowledged op was ("upsert", "delete" or "none")."""
    touching = [i for i, (kind, keys) in enumerate(ops) if kind != "flush" and key in keys]
    last = max((i for i in touching if acked[i]), default=None)
    allowed: set[int | None] = set()
    if last is None:
        allowed.add(None)
        what = "none"
    else:
        what = ops[last][0]
        allowed.add(last if what == "upsert" else None)
    for i in touching:
        if not acked[i] and (last is None or i > last):
            allowed.add(i if ops[i][0] == "upsert" else None)
    return allowed, what


def check(ops: list[Op], acked: list[bool], got: dict[int, np.ndarray], out: Outcome) -> None:
    for key in range(KEYS):
        allowed, what = allowed_states(ops, acked, key)
        if key in got:
            shown = next(
                (i for i in allowed if i is not None and np.array_equal(got[key], vec(key, i, DIM))),
                "other",
            )
        else:
            shown = None
        if shown not in allowed:
            (out.resurrected if what == "delete" else out.lost).append(key)


def state(store: ObjectStore, w: IndexWriter | None = None) -> dict[int, np.ndarray]:
    extra = w.pending_batches() if w is not None else []
    return rows_of(Snapshot.open(store, extra_rows=extra))


def run_ops(w: IndexWriter, ops: list[Op], out: Outcome) -> list[bool]:
    acked: list[bool] = []
    for i, op in enumerate(ops):
        try:
            apply(w, i, op)
            ok = True
        except DriftlessError:
            ok = False
        acked.append(ok)
        if op[0] != "flush":
            out.acked_ops += ok
            out.failed_ops += not ok
            out.acked_rows += len(op[1]) if ok else 0
    return acked


@contextmanager
def _tmpdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dl-fault-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def disk_trial(name: str, seed: int) -> Outcome:
    """One trial of disk fault ``name``: armed at a random hit, failing 1..3 hits."""
    point, err = DISK_FAULTS[name]
    rng = random.Random(seed)
    ops = workload(rng)
    out = Outcome()
    with _tmpdir() as tmp:
        store = LocalDirStore(tmp / "data")
        w = IndexWriter.open(store, tmp / "wal", CONFIG, create=SPEC)
        faults.clear()
        faults.arm(point, err, n=rng.randint(1, 6), count=rng.randint(1, 3))
        if "cut fails" in name:
            faults.arm("wal.truncate", err, n=1, count=rng.randint(1, 3))
        try:
            acked = run_ops(w, ops, out)
        finally:
            out.injected = faults.injected()
            faults.clear()
        # "SIGKILL": abandon w; a new writer replays the WAL over what was committed
        w2 = IndexWriter.open(store, tmp / "wal", CONFIG)
        check(ops, acked, state(store, w2), out)
    return out


def s3_trial(name: str, seed: int, moto: str, bucket: str, n_ops: int = 12) -> Outcome:
    """One trial of S3 fault ``name``: writer and a reader through the fault proxy."""
    from tests.s3_faults import FaultProxy, Schedule

    rng = random.Random(seed)
    ops = workload(rng, n_ops)
    out = Outcome()
    prefix = f"trial-{seed}-{rng.getrandbits(32):08x}"
    schedule = Schedule(seed, S3_FAULTS[name], latency_s=0.05)
    with FaultProxy(moto, schedule) as proxy, _tmpdir() as tmp:
        cfg = S3Config(bucket=bucket, prefix=prefix, region="us-east-1", read_timeout_s=5.0)
        schedule.enabled = False  # create the index cleanly: the trial is about writes
        faulty = S3Store(S3Config(**{**cfg.__dict__, "endpoint_url": proxy.url}))
        w = IndexWriter.open(faulty, tmp / "wal", CONFIG, create=SPEC)
        schedule.enabled = True
        acked = run_ops(w, ops, out)
        clean = S3Store(S3Config(**{**cfg.__dict__, "endpoint_url": moto}))
        try:  # a reader through the same faults: it may fail, never return wrong rows
            snap = Snapshot.open(faulty)
            seen = rows_of(snap)
            schedule.enabled = False
            if not same(seen, rows_of(Snapshot.open(clean, snap.manifest.version))):
                out.reader_wrong += 1
        except DriftlessError:
            out.reader_errors += 1
        schedule.enabled = False
        out.injected = sum(schedule.injected.values())
        w2 = IndexWriter.open(clean, tmp / "wal", CONFIG)
        check(ops, acked, state(clean, w2), out)
    return out


def rows_of(snap: Snapshot) -> dict[int, np.ndarray]:
    rows = snap.live.rows
    if not len(rows):
        return {}
    return {int(k): rows.vectors["m"][i] for i, k in enumerate(rows.keys.tolist())}


def same(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@dataclass
class Row:
    """One line of the fault table."""

    fault: str
    trials: int = 0
    acked_ops: int = 0
    failed_ops: int = 0
    acked_rows: int = 0
    lost: int = 0
    resurrected: int = 0
    reader_errors: int = 0
    reader_wrong: int = 0
    injected: int = 0
    seconds: float = 0.0

    def add(self, o: Outcome) -> None:
        self.trials += 1
        self.acked_ops += o.acked_ops
        self.failed_ops += o.failed_ops
        self.acked_rows += o.acked_rows
        self.lost += len(o.lost)
        self.resurrected += len(o.resurrected)
        self.reader_errors += o.reader_errors
        self.reader_wrong += o.reader_wrong
        self.injected += o.injected


def campaign(
    disk_trials: int,
    s3_trials: int,
    moto: str | None,
    bucket: str | None,
    workers: int = 8,
    s3_ops: int = 12,
) -> list[Row]:
    """Every disk fault ``disk_trials`` times (seeds 0..n-1, one at a time: faults are armed
    process-wide), every S3 fault ``s3_trials`` times (in ``workers`` threads: each trial has
    its own proxy, prefix and WAL; most of its time is botocore's retry backoff)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    rows: list[Row] = []
    for name in DISK_FAULTS:
        row, t0 = Row(name), time.perf_counter()
        for seed in range(disk_trials):
            row.add(disk_trial(name, seed))
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    if moto is None or bucket is None or not s3_trials:
        return rows
    with ThreadPoolExecutor(workers) as pool:
        for name in S3_FAULTS:
            row, t0 = Row(name), time.perf_counter()
            for out in pool.map(
                lambda s, n=name: s3_trial(n, s, moto, bucket, s3_ops), range(s3_trials)
            ):
                row.add(out)
            row.seconds = time.perf_counter() - t0
            rows.append(row)
    return rows
