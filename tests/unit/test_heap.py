"""heap.trim gives freed C-heap pages back to the OS: a reader's RSS after a view rebuild no
longer stays at the load's high-water mark (10M mapped rows: 2,015 -> ~1,200 MiB anonymous,
bench/results/vectors_mmap.md)."""

from __future__ import annotations

import pytest

from index_runtime import heap


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_freed_heap_pages_go_back_to_the_os() -> None:
    if heap._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here")
    # 3,000 blocks of 60 KB (under glibc's mmap threshold: they live in the heap), then one
    # small block above them, so freeing the big ones cannot shrink the heap's top by itself
    blocks = [bytearray(60_000) for _ in range(3000)]
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    pin = bytearray(100)
    before = _rss_anon_mib()
    del blocks
    freed = _rss_anon_mib()
    assert heap.trim()
    after = _rss_anon_mib()
    assert before - freed < 60, (before, freed)  # glibc kept most of it...
    assert freed - after > 100, (before, freed, after)  # ...until trimmed
    del pin
