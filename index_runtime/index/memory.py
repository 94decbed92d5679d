"""Memory per role (pure): what `driftless plan` prints and the benchmark checks.

Per stored row a reader holds its exact vector (4·d bytes, for re-ranking and the exact tail);
int64 seq and key in the base block and the seq again in the view (24); the seq -> position
map, the live-position list (16); five byte-flags (tombstone, has-vector, winner, alive,
covered); the primary's code (m bytes) with its id (8) in the merged IVF lists plus a copy of
the id list (8). Fixed costs: the codebook (coarse centroids and PQ centroids). The writer adds its key index (~190 B per key, measured in
bench/results/store.md) and its memtable bound; the shadow role adds the oracle's windows
(negligible). Texts and metadata are extra and depend on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY_INDEX_BYTES_PER_ROW = 190  # measured: bench/results/store.md


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


def plan_memory(
    vectors: int, dim: int, nlist: int, m: int, nbits: int = 8, memtable_rows: int = 20_000
) -> MemoryPlan:
    per_row = 4 * dim + 24 + 16 + 5 + (m + 8) + 8
    codebook = 4 * dim * nlist + 4 * dim * (1 << nbits)
    reader = vectors * per_row + codebook
    writer = reader + vectors * KEY_INDEX_BYTES_PER_ROW + memtable_rows * (4 * dim + 64)
    return MemoryPlan(vectors, dim, nlist, m, nbits, reader, reader, writer)
