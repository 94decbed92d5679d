"""Named crash points for crash-safety tests.

``DRIFTLESS_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it reaches
``crash_point(<point>)``. Without the variable a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DRIFTLESS_CRASH_AT"

#: Every crash point the store defines, in the order a write meets them.
POINTS = (
    "wal.appended",  # WAL bytes written, not yet fsynced
    "wal.fsynced",  # WAL fsynced, not yet acknowledged
    "flush.segment_put",  # segment object written, manifest not yet committed
    "flush.committed",  # manifest committed, WAL not yet truncated
    "compaction.output_put",  # compaction output written, not yet committed
    "compaction.committed",  # compaction committed, GC not yet run
    "gc.between_deletes",  # GC deleted one object, more to go
    # the model migration's commits (service.migrator), in the order a migration meets them
    "migration.dual_writes.committed",  # record Pending + the spec requiring both models
    "migration.pairs.committed",  # sampled pairs stored and named (TrainingAdapter)
    "migration.adapter.committed",  # fitted adapters stored and named (Evaluating)
    "migration.gate.committed",  # the gate's decision (Bridged)
    "migration.backfill.checkpointed",  # backfill progress (Backfilling)
    "migration.cutover.held",  # the cutover waits, with its reason (Backfilled)
    "migration.cutover.committed",  # Succeeded: the index serves the new model
    "migration.rollback.committed",  # RolledBack: the old model only again
    "migration.failed.committed",  # Failed (a gate that cannot measure)
    "migration.pause.committed",  # paused (an encoder fault)
    "migration.resume.committed",  # the pause cleared / the backfill requested
    # the router's coordinated cutover of a sharded index (service.router)
    "router.cutover.shard",  # one shard cut over, the next not yet asked
)

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, n = spec.rpartition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point; known: {', '.join(POINTS)}")
    return point, int(n)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``DRIFTLESS_CRASH_AT`` names ``name`` and its count is reached."""
    target = _target()
    if target is None or target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
