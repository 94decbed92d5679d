"""Kill a writer process at every named crash point, on both backends, and check invariants."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest

from index_runtime.crash import POINTS
from tests.recovery import acked_ops, check_recovery, run_worker

# which hit of each point to die at: mid-workload, after earlier hits succeeded
HIT = {
    "wal.appended": 3,
    "wal.fsynced": 3,
    "flush.segment_put": 2,
    "flush.committed": 2,
    "compaction.output_put": 1,
    "compaction.committed": 1,
    "gc.between_deletes": 1,
}


# the migration's: tests/integration/test_migration_crash.py; the router's coordinated
# cutover: tests/integration/test_shards_migration.py (its slow campaign)
STORE_POINTS = tuple(p for p in POINTS if not p.startswith(("migration.", "router.")))


def test_every_point_has_a_test() -> None:
    assert set(HIT) == set(STORE_POINTS)


@pytest.mark.parametrize("point", STORE_POINTS)
def test_crash_point(point: str, backend: dict[str, Any], tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    code, out = run_worker(backend, wal, crash_at=f"{point}:{HIT[point]}")
    assert code == -signal.SIGKILL, f"the worker never reached {point}:{HIT[point]}"
    assert "OPEN" in out
    check_recovery(backend, wal, acked_ops(out))


def test_crash_then_crash_again(backend: dict[str, Any], tmp_path: Path) -> None:
    """Recovery itself is crash-safe: die during the WAL replay's first flush, then recover."""
    wal = tmp_path / "wal"
    code, out = run_worker(backend, wal, crash_at="wal.fsynced:4")
    assert code == -signal.SIGKILL
    first = acked_ops(out)
    from index_runtime.store.writer import IndexWriter
    from tests.crash_worker import CONFIG
    from tests.helpers import open_store

    IndexWriter.open(open_store(backend), wal, CONFIG)  # reopen and abandon without close
    check_recovery(backend, wal, first)


@pytest.mark.slow
def test_random_kill_campaign(backend: dict[str, Any], tmp_path: Path) -> None:
    """50 trials: SIGKILL the worker at a random moment (from outside, no crash point), then
    check the invariants. The kill window is sized to each backend's workload duration, and
    the test insists that most trials really died mid-workload."""
    from tests.helpers import open_store

    rng = random.Random(1234)
    # (kill window in seconds, workload loops): the worker imports in ~0.4 s, then a loop
    # takes ~0.05 s on the local directory and ~0.4 s through moto
    window, loops = ((0.3, 1.3), 24) if backend["kind"] == "local" else ((0.4, 2.4), 6)
    killed = 0
    for trial in range(50):
        trial_backend = dict(backend)
        if backend["kind"] == "local":
            trial_backend["root"] = str(tmp_path / f"data{trial}")
        else:
            trial_backend["prefix"] = f"trial{trial}"
        open_store(trial_backend)  # the bucket exists; the prefix is fresh
        wal = tmp_path / f"wal{trial}"
        code, out = run_worker(trial_backend, wal, loops=loops, kill_after_s=rng.uniform(*window))
        killed += code != 0
        check_recovery(trial_backend, wal, acked_ops(out) if code != 0 else 10**9, loops=loops)
    assert killed >= 30, f"only {killed} of 50 trials were killed before the workload ended"
