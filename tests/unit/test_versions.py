"""The restore listing (pure): which versions can be restored, given the objects that exist."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from index_runtime.store.manifest import Codebook, IndexSpec, Manifest, SegmentInfo
from index_runtime.store.versions import list_versions, restore_problem

SPEC = IndexSpec.single("i", "m", 4)


def seg(i: int, live: int = 10) -> SegmentInfo:
    return SegmentInfo(i, f"segments/{i}.arrow", 10, live, 0, i * 10, i * 10 + 9, 100)


def manifest(version: int, *segs: SegmentInfo, **kw: Any) -> Manifest:
    return replace(Manifest(version, SPEC, 1, 0, 9, tuple(segs), committed_at=1000.0 + version), **kw)


def test_versions_are_listed_newest_first_with_counts_and_restorability() -> None:
    book = Codebook(1, "m", "codebooks/1.faiss", 4, 2, 8, "flat", 10, 10, 0.0)
    ms = [
        manifest(3, seg(2), seg(3, live=4)),
        manifest(1, seg(1)),
        manifest(2, seg(1, live=6), seg(2), codebooks=(book,)),
    ]
    existing = {"segments/2.arrow", "segments/3.arrow"}  # segment 1 and the codebook are gone
    got = list_versions(ms, existing, ms[0])
    assert [(v.version, v.live, v.rows, v.segments, v.restorable, v.current) for v in got] == [
        (3, 14, 20, 2, True, True),
        (2, 16, 20, 2, False, False),
        (1, 10, 10, 1, False, False),
    ]
    assert got[0].committed_at == 1003.0 and got[0].problem == ""
    # the problem names the first missing object
    assert "2 objects" in got[1].problem and "codebooks/1.faiss" in got[1].problem
    assert "segments/1.arrow" in got[2].problem


def test_another_layout_is_not_restorable() -> None:
    old = replace(manifest(1, seg(1)), index=IndexSpec.single("i", "m", 8))
    assert "different index layout" in restore_problem(old, SPEC, {"segments/1.arrow"})
    assert restore_problem(manifest(1, seg(1)), SPEC, {"segments/1.arrow"}) == ""
