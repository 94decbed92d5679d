"""Raw vectors read on demand from memory-mapped segment files (no I/O of its own).

:class:`MappedVectors` is the disk-resident twin of a block's ``(n, d)`` float32 array: the
rows live in read-only chunks (one per Arrow record batch of a memory-mapped segment file,
zero-copy numpy views of the FixedSizeList's values buffer), and are copied out only when a
search gathers them (the re-rank's candidates, the tail, a chunk of the exact scan). Cosine
indexes store raw vectors and views hold them L2-normalized, so the rows are normalized as
they are read: each row's two divisors (:func:`~index_runtime.index.rows.normalize_factors`,
8 bytes per row in memory) are computed the first time the row is read, kept, and applied to
the rows read, which gives the in-memory block's bits exactly (normalizing each read afresh
cost ~20-80 µs per query for 80 rows, the largest share of the mapped re-rank). They are
*not* computed when a segment is mapped: that read every vector, so every page of the file
became resident in the process (VmRSS as large as in memory, as RssFile). Rows without a
vector (nulls) read as NaN, as in memory.

:func:`take` and :func:`row_range` accept either form, so the view's search code is one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from index_runtime.index.rows import F32, I64, Mask, apply_factors, normalize_factors

DEFAULT_CACHE_BYTES = 8 << 30


@dataclass(frozen=True)
class VectorStorage:
    """Where a reader keeps raw vectors: ``memory`` (numpy, the default) or ``mmap`` (read
    from memory-mapped copies of the segments in ``cache_dir``, at most ``cache_bytes`` of
    them when the serving view does not need more; one subdirectory per index)."""

    mode: Literal["memory", "mmap"] = "memory"
    cache_dir: Path | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.mode not in ("memory", "mmap"):
            raise ValueError(f"vectors must be memory or mmap, not {self.mode!r}")
        if self.mode == "mmap" and self.cache_dir is None:
            raise ValueError("vectors: mmap needs a cache directory")
        if self.cache_bytes < 0:
            raise ValueError("the vector cache budget must be >= 0 bytes")


@dataclass(frozen=True)
class Chunk:
    """Rows of one record batch: ``values`` (n, d) float32, read-only and usually a view of a
    mapped file; ``valid`` False where the row has no vector (None: every row has one);
    ``factors`` the rows' normalization divisors (cosine), where known: a row of zeros is a
    row not computed yet (a real divisor is never 0)."""

    values: F32
    valid: Mask | None = None
    factors: F32 | None = None


def absent_chunk(n: int, dim: int) -> Chunk:
    """``n`` rows without a vector of the model (a segment without its column): no memory."""
    return Chunk(np.broadcast_to(np.zeros(dim, np.float32), (n, dim)), np.zeros(n, bool))


def _absent(c: Chunk) -> bool:
    return c.valid is not None and c.values.strides[0] == 0 and not c.valid.any()


class MappedVectors:
    """Rows ``0..n-1`` over consecutive chunks. ``owners`` are the objects that keep the
    mappings open and in use (the segment cache's handles): held as long as these vectors
    are, so a segment a view serves from is never evicted from under it."""

    def __init__(
        self, chunks: Sequence[Chunk], dim: int, normalized: bool, owners: Sequence[object] = ()
    ) -> None:
        self.chunks = tuple(c for c in chunks if len(c.values))
        self.dim = dim
        self.normalized = normalized  # rows are L2-normalized when read (cosine)
        self.owners = tuple(owners)
        sizes = [len(c.values) for c in self.chunks]
        self.starts: I64 = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), dim)
        # cosine: per row its two divisors once it has been read (zeros: not yet). Never
        # computed here: that would read, and so map in, every page of every segment
        self._factors: F32 | None = None
        if normalized:
            self._factors = np.zeros((len(self), 2), np.float32)
            for c, ch in enumerate(self.chunks):
                if ch.factors is not None:
                    self._factors[self.starts[c] : self.starts[c + 1]] = ch.factors
        # per row, in memory (what a read needs besides the mapped floats): whether it has a
        # vector (only if some row has none) and where it starts in the span (8 bytes a row)
        self._valid: Mask | None = None
        if any(c.valid is not None for c in self.chunks):
            self._valid = np.concatenate(
                [np.ones(len(c.values), bool) if c.valid is None else c.valid for c in self.chunks]
            )
        self._span = _Span.of(self.chunks, dim)
        self._row_at: I64 | None = None
        if self._span is not None:
            first = np.repeat(self._span.offsets - self.starts[:-1] * self._span.strides, sizes)
            self._row_at = first + np.arange(len(self)) * np.repeat(self._span.strides, sizes)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def mapped_bytes(self) -> int:
        return sum(int(c.values.nbytes) for c in self.chunks if not _absent(c))

    def take(self, pos: I64) -> F32:
        """Copies of the rows at ``pos`` (any order, repeats allowed; like numpy, a negative
        position counts from the end and one past the end raises IndexError)."""
        pos = np.asarray(pos, np.int64)
        if self._span is not None and self._row_at is not None:
            # every value of _row_at is a row inside a chunk: no position reads elsewhere
            out = np.asarray(self._span.windows[self._row_at[pos]], np.float32)
        else:  # chunks the span cannot address (not contiguous float32): one gather each
            pos = np.where(pos < 0, pos + len(self), pos)
            if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= len(self)):
                raise IndexError(f"row positions outside 0..{len(self) - 1}")
            ci = np.searchsorted(self.starts, pos, side="right") - 1
            out = np.empty((len(pos), self.dim), np.float32)
            for c in np.unique(ci).tolist():
                at = ci == c
                out[at] = self.chunks[c].values[pos[at] - self.starts[c]]
        return self._finish(out, pos)

    def rows(self, lo: int, hi: int) -> F32:
        """Rows ``lo..hi-1`` as one array (a view when they sit in one chunk and need neither
        normalization nor NaN rows, else a copy)."""
        lo, hi = max(0, lo), min(len(self), hi)
        if hi <= lo:
            return np.empty((0, self.dim), np.float32)
        c0 = int(np.searchsorted(self.starts, lo, side="right") - 1)
        c1 = int(np.searchsorted(self.starts, hi - 1, side="right") - 1)
        parts = []
        for c in range(c0, c1 + 1):
            s, e = int(self.starts[c]), int(self.starts[c + 1])
            parts.append(self.chunks[c].values[max(lo, s) - s : min(hi, e) - s])
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._finish(out, slice(lo, hi))

    def _finish(self, out: F32, at: I64 | slice) -> F32:
        """NaN where a row has no vector; normalized if the view wants it."""
        factors = None
        if self._factors is not None:
            factors = self._factors[at]
            if not factors.all():  # a divisor is never 0: some rows are read the first time
                # their divisors, from the rows themselves (the same per-row arithmetic as
                # normalize(), so the same bits). A row another thread is writing has a 0
                # left and is computed here too; both store the same values
                factors = factors.copy()
                todo = (factors == 0).any(axis=1)
                new = normalize_factors(out[todo])
                factors[todo] = new
                rows = np.arange(at.start, at.stop) if isinstance(at, slice) else at
                self._factors[rows[todo]] = new
        if self._valid is not None:
            bad = ~self._valid[at]
            if bad.any():
                out = np.array(out, np.float32)  # never write into a mapping
                out[bad] = np.nan
        if factors is not None:
            out = apply_factors(out, factors)
        return out

    @property
    def known_factors(self) -> int:
        """Rows whose normalization divisors are computed (cosine; 0 otherwise)."""
        if self._factors is None:
            return 0
        return int((self._factors != 0).all(axis=1).sum())

    def slice(self, lo: int, hi: int) -> MappedVectors:
        """Rows ``lo..hi-1`` as their own :class:`MappedVectors` (no copy)."""
        out = []
        for c, ch in enumerate(self.chunks):
            s, e = int(self.starts[c]), int(self.starts[c + 1])
            a, b = max(lo, s), min(hi, e)
            if a < b:
                valid = None if ch.valid is None else ch.valid[a - s : b - s]
                factors = None if self._factors is None else self._factors[a:b]
                out.append(Chunk(ch.values[a - s : b - s], valid, factors))
        return MappedVectors(out, self.dim, self.normalized, self.owners)

    @staticmethod
    def concat(parts: Sequence[MappedVectors], dim: int, normalized: bool) -> MappedVectors:
        chunks = [c for p in parts for c in p.chunks]
        owners = {id(o): o for p in parts for o in p.owners}
        return MappedVectors(chunks, dim, normalized, tuple(owners.values()))


class _Span:
    """One float32 array spanning every chunk's address range, to gather rows of many
    chunks in one vectorized step: numpy cannot index several arrays at once, and a loop
    over chunks cost ~0.5 ms for 80 rows over 100 chunks (the re-rank of one query), ~10×
    the gather itself. The span is read through ``windows``, an overlapping (floats, d)
    view whose row ``i`` is floats ``i..i+d-1``: a gather of whole rows (numpy copies each
    row at once; indexing every float was 2× slower). The span also covers whatever lies
    between the chunks' mappings, which is never read: offsets come only from a chunk's own
    address and a row inside it (positions are bounds-checked by
    :meth:`MappedVectors.take`). The chunks, and so the mappings, live as long as the
    :class:`MappedVectors` that owns this span."""

    def __init__(self, base: npt.NDArray[np.float32], offsets: I64, strides: I64, dim: int) -> None:
        self.offsets = offsets  # per chunk: the index of its first float in ``base``
        self.strides = strides  # per chunk: floats per row (0: a chunk of absent vectors)
        self.windows = np.lib.stride_tricks.as_strided(
            base, shape=(len(base) - dim + 1, dim), strides=(4, 4), writeable=False
        )

    @classmethod
    def of(cls, chunks: Sequence[Chunk], dim: int) -> _Span | None:
        if not chunks or not dim:
            return None
        real = [not _absent(c) for c in chunks]
        vals = [c.values for c, r in zip(chunks, real, strict=True) if r]
        if not vals or not all(v.dtype == np.float32 and v.flags.c_contiguous for v in vals):
            return None
        addrs = np.array([v.ctypes.data for v in vals], np.int64)
        if np.any(addrs % 4):
            return None
        lo = int(addrs.min())
        hi = max(int(v.ctypes.data) + int(v.nbytes) for v in vals)
        base = np.ctypeslib.as_array(
            ctypes.cast(lo, ctypes.POINTER(ctypes.c_float)), shape=((hi - lo) // 4,)
        )
        # a chunk without vectors reads the first real row (any row: it becomes NaN)
        offsets = np.full(len(chunks), (addrs[0] - lo) // 4, np.int64)
        offsets[np.flatnonzero(real)] = (addrs - lo) // 4
        strides = np.where(real, dim, 0).astype(np.int64)
        return cls(base, offsets, strides, dim)

    def gather(self, ci: I64, rows: I64) -> F32:
        return np.asarray(self.windows[self.offsets[ci] + rows * self.strides[ci]], np.float32)


def take(vecs: F32 | MappedVectors, pos: I64) -> F32:
    """Rows of ``vecs`` at ``pos``: a numpy gather in memory, a read of the mapped rows."""
    if isinstance(vecs, MappedVectors):
        return vecs.take(pos)
    return vecs[pos]


def row_range(vecs: F32 | MappedVectors, lo: int, hi: int) -> F32:
    """Rows ``lo..hi-1`` of ``vecs`` (a view in memory)."""
    if isinstance(vecs, MappedVectors):
        return vecs.rows(lo, hi)
    return vecs[lo:hi]
