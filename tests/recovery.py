"""Invariant checks after a crash of tests.crash_worker (shared by the crash tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from index_runtime.store.manifest import referenced_objects
from index_runtime.store.reader import Snapshot
from index_runtime.store.writer import IndexWriter
from tests.crash_worker import CONFIG, DIM, SPEC, expected_state, workload
from tests.helpers import open_store, vec

ROOT = Path(__file__).resolve().parent.parent


def run_worker(
    backend: dict[str, Any], wal_dir: Path, crash_at: str | None = None, loops: int = 1,
    kill_after_s: float | None = None,
) -> tuple[int, str]:
    """Run the worker; returns (return code, stdout). ``kill_after_s`` SIGKILLs it from outside."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DRIFTLESS_CRASH_AT", None)
    if crash_at:
        env["DRIFTLESS_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "tests.crash_worker", json.dumps(backend), str(wal_dir), str(loops)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, out


def acked_ops(stdout: str) -> int:
    """How many ops the worker acknowledged (ops are acknowledged in order)."""
    return sum(1 for line in stdout.splitlines() if line.startswith("ACK "))


def live_versions(backend: dict[str, Any]) -> dict[int, np.ndarray]:
    snap = Snapshot.open(open_store(backend))
    rows = snap.live.rows
    return {int(k): rows.vectors["m"][i] for i, k in enumerate(rows.keys.tolist())} if len(rows) else {}


def matches(got: dict[int, np.ndarray], want: dict[int, int]) -> bool:
    return got.keys() == want.keys() and all(np.array_equal(got[k], vec(k, v, DIM)) for k, v in want.items())


def check_recovery(backend: dict[str, Any], wal_dir: Path, acked: int, loops: int = 1) -> None:
    """After a crash: reopen succeeds, every referenced object exists, every acknowledged write
    is present and no deleted key is visible (the one in-flight op may or may not have landed)."""
    ops = workload(loops)
    store = open_store(backend)
    # create=SPEC as the worker does: a kill before the worker created the index is legal
    writer = IndexWriter.open(store, wal_dir, CONFIG, create=SPEC)
    missing = [k for k in referenced_objects(writer.manifest) if not store.exists(k)]
    assert not missing, f"manifest references missing objects: {missing}"
    writer.flush()
    candidates = [expected_state(ops[:acked])]
    if acked < len(ops):
        candidates.append(expected_state(ops[: acked + 1]))
    got = live_versions(backend)
    assert any(matches(got, c) for c in candidates), (
        f"state after recovery matches neither {acked} nor {acked + 1} applied ops; "
        f"keys got={sorted(got)[:20]}... want={sorted(candidates[0])[:20]}..."
    )
    # maintenance still works after the crash and changes nothing visible
    writer.compact(gc=True)
    assert matches(live_versions(backend), {k: v for k, v in _pick(got, candidates).items()})
    assert not [k for k in referenced_objects(writer.manifest) if not store.exists(k)]
    writer.close()


def _pick(got: dict[int, np.ndarray], candidates: list[dict[int, int]]) -> dict[int, int]:
    return next(c for c in candidates if matches(got, c))
