"""Compaction planning (pure): which segments to rewrite or merge, and in which groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from index_runtime.store.manifest import SegmentInfo


@dataclass(frozen=True)
class CompactionPolicy:
    deleted_ratio: float = 0.2  # rewrite a segment once this share of its rows serves nothing
    small_bytes: int = 16 << 20  # segments under this size are merged with neighbours
    target_bytes: int = 64 << 20  # compaction outputs are cut at about this size

    def __post_init__(self) -> None:
        if not 0.0 < self.deleted_ratio <= 1.0:
            raise ValueError("deleted_ratio must be in (0, 1]")
        if self.small_bytes <= 0 or self.target_bytes < self.small_bytes:
            raise ValueError("need 0 < small_bytes <= target_bytes")


def _expected_output(s: SegmentInfo) -> float:
    return s.bytes * ((s.live + s.tombstones) / s.rows if s.rows else 0.0)


def plan_compaction(
    segments: Sequence[SegmentInfo], policy: CompactionPolicy
) -> list[tuple[int, ...]]:
    """Groups of segment ids to compact, each group into one or more new segments.

    A segment is a candidate if its deleted ratio reaches ``policy.deleted_ratio`` or it is
    smaller than ``policy.small_bytes``. Candidates are grouped in seq order while the expected
    output (bytes × share of rows kept) stays under ``policy.target_bytes``. A group of one
    small segment with few deletes is left alone: rewriting it alone gains nothing.
    """
    candidates = [
        s
        for s in sorted(segments, key=lambda s: (s.min_seq, s.id))
        if s.deleted_ratio >= policy.deleted_ratio or s.bytes < policy.small_bytes
    ]
    groups: list[list[SegmentInfo]] = []
    size = 0.0
    for s in candidates:
        out = _expected_output(s)
        if groups and size + out <= policy.target_bytes:
            groups[-1].append(s)
            size += out
        else:
            groups.append([s])
            size = out
    return [
        tuple(s.id for s in g)
        for g in groups
        if len(g) > 1 or g[0].deleted_ratio >= policy.deleted_ratio
    ]
