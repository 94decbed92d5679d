"""Compaction planning (pure): which segments to rewrite or merge, and in which groups.

Convergence: a planned group either holds dead rows (``SegmentInfo.dead``, rows that any
compaction of them drops: superseded versions and tombstones that shadow nothing) or has more
segments than compacting it can produce. So every round that runs strictly lowers
(stored rows, segment count) in lexicographic order, and repeated compaction without writes
reaches a fixpoint: a plan that is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from index_runtime.store.manifest import SegmentInfo


@dataclass(frozen=True)
class CompactionPolicy:
    deleted_ratio: float = 0.2  # rewrite a segment once this share of its rows is dead
    small_bytes: int = 16 << 20  # segments under this size are merged with neighbours
    target_bytes: int = 64 << 20  # compaction outputs are cut at about this size
    # a group's expected output is at most this many outputs of target_bytes: there is one
    # manifest commit per group, so fewer, larger groups commit less often (an output's put
    # overlaps the next output's build within a group as across groups)
    group_outputs: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.deleted_ratio <= 1.0:
            raise ValueError("deleted_ratio must be in (0, 1]")
        if self.small_bytes <= 0 or self.target_bytes < self.small_bytes:
            raise ValueError("need 0 < small_bytes <= target_bytes")
        if self.group_outputs < 1:
            raise ValueError("group_outputs must be at least 1")


def _share(s: SegmentInfo, rows: int) -> float:
    return s.bytes * (rows / s.rows) if s.rows else 0.0


def expected_outputs(group: Sequence[SegmentInfo], target_bytes: int) -> int:
    """How many segments compacting ``group`` writes at most: its live rows cut at about
    ``target_bytes`` (estimated from the inputs' sizes), plus one for its needed tombstones
    (tombstones are stored apart from rows)."""
    live_bytes = sum(_share(s, s.live) for s in group)
    live = max(1, math.ceil(live_bytes / target_bytes)) if any(s.live for s in group) else 0
    return live + (1 if any(s.tombstones for s in group) else 0)


def worth_compacting(group: Sequence[SegmentInfo], policy: CompactionPolicy) -> bool:
    """A group is worth a rewrite if one of its segments reaches the dead ratio (and so has
    dead rows to drop), or if the rewrite leaves fewer segments than it reads."""
    if any(s.dead > 0 and s.deleted_ratio >= policy.deleted_ratio for s in group):
        return True
    return len(group) > expected_outputs(group, policy.target_bytes)


def plan_compaction(
    segments: Sequence[SegmentInfo], policy: CompactionPolicy
) -> list[tuple[int, ...]]:
    """Groups of segment ids to compact, each group into one or more new segments.

    A segment is a candidate if its dead share (``deleted_ratio``) reaches
    ``policy.deleted_ratio`` or it is smaller than ``policy.small_bytes``. Candidates are
    grouped in seq order while the expected output (bytes × share of rows kept) stays under
    ``policy.group_outputs × policy.target_bytes``. Groups not :func:`worth_compacting` are left alone (e.g. one small
    segment with few dead rows, or a segment of rows next to the tombstones that must stay).
    """
    candidates = [
        s
        for s in sorted(segments, key=lambda s: (s.min_seq, s.id))
        if (s.dead > 0 and s.deleted_ratio >= policy.deleted_ratio) or s.bytes < policy.small_bytes
    ]
    groups: list[list[SegmentInfo]] = []
    size = 0.0
    budget = policy.group_outputs * policy.target_bytes
    for s in candidates:
        out = _share(s, s.live + s.tombstones)
        if groups and size + out <= budget:
            groups[-1].append(s)
            size += out
        else:
            groups.append([s])
            size = out
    return [tuple(s.id for s in g) for g in groups if worth_compacting(g, policy)]
