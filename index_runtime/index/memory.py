"""Memory per role (pure): what `driftless plan` prints and the benchmark checks.

Per stored row a reader holds its exact vector (4·d bytes, for re-ranking and the exact tail);
int64 seq and key in the base block and the seq again in the view (24); the primary's
slot -> position map and the live-position list (16); five byte-flags (tombstone, has-vector,
winner, alive, covered); the primary's code (m bytes) with its slot id (8) in the merged IVF
lists plus the slot -> seq list (8). Nothing is sized by the largest seq (rewrites do not add
memory once compacted; the HNSW shadow's seq bitmap, 1 bit per seq, is the exception). Fixed costs: the codebook (coarse centroids and PQ centroids). The writer adds its key index (~190 B per key, measured in
bench/results/store.md) and its memtable bound; the shadow role adds the oracle's windows
(negligible). Texts and metadata are extra and depend on the data.

With ``vectors: mmap`` (index/vectors.py) the exact vectors leave the reader's anonymous
memory: they are read from memory-mapped segment copies on local disk (the cache directory
holds whole segment files: vectors plus seq, key and flags, ~4·d + 17 bytes per row before
texts and metadata); the reader keeps 16 bytes per row of them in memory (the row's place in
the mapping, and its two normalization divisors). The pages a search touches are file-backed page cache: reclaimable, but
counted in a container's memory cgroup while resident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from index_runtime.index.view import View

KEY_INDEX_BYTES_PER_ROW = 190  # measured: bench/results/store.md
SEGMENT_ROW_BYTES = 17  # a segment file's row besides its vector: seq, key (int), flags
MAPPED_ROW_BYTES = 16  # vectors: mmap: each row's place in the mapping, cosine divisors


@dataclass(frozen=True)
class MemoryPlan:
    vectors: int
    dim: int
    nlist: int
    m: int
    nbits: int
    reader_bytes: int
    shadow_bytes: int
    writer_bytes: int
    vector_bytes: int = 0  # the exact vectors inside reader_bytes (4·d per row)
    disk_bytes: int = 0  # vectors: mmap: the cached segment files on local disk

    @property
    def reader_mapped_bytes(self) -> int:
        """A reader's memory with vectors memory-mapped: codes, lists, key columns, and per
        row its place in the mapping and its cosine divisors (index/vectors.py)."""
        return self.reader_bytes - self.vector_bytes + self.vectors * MAPPED_ROW_BYTES


def plan_memory(
    vectors: int, dim: int, nlist: int, m: int, nbits: int = 8, memtable_rows: int = 20_000
) -> MemoryPlan:
    per_row = 4 * dim + 24 + 16 + 5 + (m + 8) + 8
    codebook = 4 * dim * nlist + 4 * dim * (1 << nbits)
    reader = vectors * per_row + codebook
    writer = reader + vectors * KEY_INDEX_BYTES_PER_ROW + memtable_rows * (4 * dim + 64)
    vec = vectors * 4 * dim
    disk = vectors * (4 * dim + SEGMENT_ROW_BYTES)
    return MemoryPlan(vectors, dim, nlist, m, nbits, reader, reader, writer, vec, disk)


def _array_bytes(obj: object, seen: set[int]) -> int:
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_array_bytes(v, seen) for v in obj.values())
    if isinstance(obj, tuple | list):
        return sum(_array_bytes(v, seen) for v in obj if not isinstance(v, str | int | float))
    return 0


def view_structure_bytes(view: View) -> int:
    """Bytes of the numpy arrays a view holds *besides its rows* (the base and delta blocks):
    positions, masks, tails, caches (filter masks, selector bitmaps, the seq index) and each
    primary's slot -> seq / slot -> position maps. The FAISS indexes' own codes and ids (m + 8
    bytes per indexed row) are not numpy arrays and not counted here."""
    seen = {id(view.base.block.seqs), id(view.delta.seqs)}
    skip = {"base", "delta", "primaries", "settings"}
    total = sum(_array_bytes(v, seen) for k, v in vars(view).items() if k not in skip)
    for p in view.primaries.values():
        total += sum(_array_bytes(a, seen) for a in (p.ids, p.pos, p.covered))
    return total
