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


def test_every_point_has_a_test() -> None:
    assert set(HIT) == set(POINTS)


@pytest.mark.parametrize("point", POINTS)
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
@pytest.mark.parametrize("trial", range(50))
def test_random_kill_campaign(trial: int, backend: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(trial)
    wal = tmp_path / "wal"
    code, out = run_worker(backend, wal, loops=4, kill_after_s=rng.uniform(0.3, 2.5))
    check_recovery(backend, wal, acked_ops(out) if code != 0 else 10**9, loops=4)
