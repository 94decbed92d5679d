"""Mapped vectors (index/vectors.py) against numpy, and the cache's eviction plan (pure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index_runtime.index.rows import normalize
from index_runtime.index.vectors import Chunk, MappedVectors, VectorStorage, absent_chunk
from index_runtime.store.segcache import CacheEntry, plan_eviction

D = 8


def _chunks(rng: np.random.Generator) -> tuple[list[Chunk], np.ndarray]:
    """Four chunks: plain, absent (no column), with nulls, plain; and the in-memory twin
    (NaN rows where there is no vector), as make_block would hold it."""
    a = rng.normal(size=(5, D)).astype(np.float32)
    c = rng.normal(size=(6, D)).astype(np.float32)
    valid = np.array([True, False, True, True, False, True])
    c[~valid] = 0.0  # what the segment writer stores under a null
    e = rng.normal(size=(7, D)).astype(np.float32)
    chunks = [Chunk(a), absent_chunk(3, D), Chunk(c, valid), Chunk(e)]
    twin = np.concatenate([a, np.full((3, D), np.nan, np.float32), c, e])
    twin[5 + 3 : 5 + 3 + 6][~valid] = np.nan
    return chunks, twin


@pytest.mark.parametrize("normalized", [False, True])
def test_take_and_rows_match_the_in_memory_array(normalized: bool) -> None:
    rng = np.random.default_rng(0)
    chunks, twin = _chunks(rng)
    if normalized:
        twin = normalize(twin)
    mv = MappedVectors(chunks, D, normalized)
    assert mv.shape == twin.shape and mv.mapped_bytes == (5 + 6 + 7) * D * 4
    for _ in range(50):
        pos = rng.integers(0, len(twin), rng.integers(1, 40))
        np.testing.assert_array_equal(mv.take(pos), twin[pos])  # NaN == NaN here
    for lo, hi in [(0, 21), (2, 4), (4, 12), (8, 14), (13, 21), (20, 25), (5, 5)]:
        np.testing.assert_array_equal(mv.rows(lo, hi), twin[lo:hi])
    part = mv.slice(4, 15)
    np.testing.assert_array_equal(part.take(np.arange(11)), twin[4:15])
    both = MappedVectors.concat([mv.slice(0, 10), mv.slice(10, 21)], D, normalized)
    np.testing.assert_array_equal(both.take(np.arange(21)[::-1]), twin[::-1])
    with pytest.raises(IndexError):
        mv.take(np.array([21]))
    np.testing.assert_array_equal(mv.take(np.array([-1, -21])), twin[[-1, -21]])  # as numpy


def test_reads_never_write_into_the_chunks() -> None:
    rng = np.random.default_rng(1)
    chunks, _ = _chunks(rng)
    for c in chunks:
        c.values.flags.writeable = False  # as a read-only mapping is
    mv = MappedVectors(chunks, D, True)
    mv.take(np.arange(21))
    mv.rows(0, 21)


def test_divisors_are_computed_for_the_rows_read_and_carried_by_slices() -> None:
    """Cosine: nothing is read when mapped; a read computes its rows' divisors only (the
    in-memory bits), a slice and a concat keep what was computed, a row half written by
    another thread (one divisor still 0) is computed again."""
    rng = np.random.default_rng(3)
    chunks, twin = _chunks(rng)
    twin = normalize(twin)
    mv = MappedVectors(chunks, D, True)
    assert mv.known_factors == 0
    np.testing.assert_array_equal(mv.take(np.array([1, 6, 1, -1])), twin[[1, 6, 1, -1]])
    assert mv.known_factors == 3
    np.testing.assert_array_equal(mv.rows(9, 12), twin[9:12])
    assert mv.known_factors == 6
    both = MappedVectors.concat([mv.slice(0, 10), mv.slice(10, 21)], D, True)
    assert both.known_factors == 6
    mv._factors[6, 1] = 0  # type: ignore[index]
    assert mv.known_factors == 5
    np.testing.assert_array_equal(mv.take(np.array([6])), twin[[6]])
    assert mv.known_factors == 6
    np.testing.assert_array_equal(both.rows(0, 21), twin)
    assert both.known_factors == 21 and MappedVectors(chunks, D, False).known_factors == 0


def test_single_chunk_and_unaddressable_chunks_take_the_slow_paths() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, D)).astype(np.float32)
    one = MappedVectors([Chunk(x)], D, False)
    np.testing.assert_array_equal(one.take(np.array([3, 1, 29])), x[[3, 1, 29]])
    strided = [Chunk(x[::2]), Chunk(x[1::2])]  # not contiguous: no span
    mv = MappedVectors(strided, D, False)
    assert mv._span is None
    twin = np.concatenate([x[::2], x[1::2]])
    pos = rng.integers(0, 30, 20)
    np.testing.assert_array_equal(mv.take(pos), twin[pos])
    np.testing.assert_array_equal(mv.take(np.array([-1])), twin[[-1]])
    with pytest.raises(IndexError):
        mv.take(np.array([30]))


def test_vector_storage_is_validated() -> None:
    assert VectorStorage().mode == "memory"
    with pytest.raises(ValueError, match="cache directory"):
        VectorStorage("mmap")
    with pytest.raises(ValueError):
        VectorStorage("disk")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entries", "budget", "in_use", "evicted"),
    [
        ([("a", 10, 1), ("b", 10, 2)], 20, set(), []),  # fits
        ([("a", 10, 1), ("b", 10, 2), ("c", 10, 3)], 20, set(), ["a"]),  # oldest first
        ([("a", 10, 3), ("b", 10, 1), ("c", 10, 2)], 10, set(), ["b", "c"]),
        ([("a", 10, 1), ("b", 10, 2), ("c", 10, 3)], 20, {"a"}, ["b"]),  # in use: kept
        ([("a", 10, 1), ("b", 10, 2)], 0, {"a", "b"}, []),  # all in use: over budget
        ([("a", 30, 1), ("b", 5, 2)], 10, set(), ["a"]),  # one big file
    ],
)
def test_plan_eviction(
    entries: list[tuple[str, int, int]], budget: int, in_use: set[str], evicted: list[str]
) -> None:
    got = plan_eviction([CacheEntry(*e) for e in entries], budget, in_use)
    assert got == evicted


def test_plan_reports_memory_and_mapped_readers(capsys: pytest.CaptureFixture[str]) -> None:
    from index_runtime.cli import main
    from index_runtime.index.memory import plan_memory

    p = plan_memory(1_000_000, 128, 2048, 16)
    assert p.vector_bytes == 512_000_000
    assert p.reader_mapped_bytes == p.reader_bytes - p.vector_bytes + 16 * 1_000_000
    assert p.disk_bytes > p.vector_bytes
    assert main(["plan", "--vectors", "1000000", "--dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "562.8 MiB" in out and "89.8 MiB  with --vectors mmap" in out and "488.3 MiB" in out


def test_serve_flags_and_env_choose_the_vector_storage(tmp_path: Path) -> None:
    from index_runtime.cli import build_parser, serve_config
    from index_runtime.contract import Env
    from index_runtime.errors import InvalidInputError
    from index_runtime.service.auth import TokenSet
    from index_runtime.service.limits import ApiLimits
    from index_runtime.service.runtime import Roles

    def config(argv: list[str], env: dict[str, str]) -> VectorStorage:
        args = build_parser().parse_args(["serve", "--data", str(tmp_path), *argv])
        return serve_config(args, env, Roles(), TokenSet(), None, ApiLimits()).options.vectors

    assert config([], {}) == VectorStorage()  # the default stays in memory
    assert config(["--vectors", "mmap"], {}) == VectorStorage(
        "mmap", tmp_path / ".vector-cache", 8 << 30
    )
    assert config(
        ["--vectors", "mmap", "--vector-cache-dir", "/c", "--vector-cache-bytes", "1000"], {}
    ) == VectorStorage("mmap", Path("/c"), 1000)
    env = {Env.VECTORS: "mmap", Env.VECTOR_CACHE_DIR: "/v", Env.VECTOR_CACHE_BYTES: "42"}
    assert config(["--from-env"], env) == VectorStorage("mmap", Path("/v"), 42)
    assert config(["--from-env", "--vectors", "memory"], env).mode == "memory"  # flags win
    with pytest.raises(InvalidInputError):
        config(["--from-env"], {Env.VECTORS: "disk"})
    with pytest.raises(InvalidInputError):
        config(["--from-env"], {Env.VECTOR_CACHE_BYTES: "lots"})
