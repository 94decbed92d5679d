"""Rows of one model in memory, as searchable blocks (pure numpy, no I/O).

A :class:`Block` holds rows in seq order of arrival with their vectors for one model
(normalized for cosine). :func:`winners` decides, per key, which row is the live one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from index_runtime.index.filters import parse_metadata
from index_runtime.store.rows import KeyType, RowBatch, concat_batches

if TYPE_CHECKING:
    from index_runtime.index.vectors import MappedVectors

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


def normalize(x: F32) -> F32:
    """Rows scaled to unit L2 norm (zero rows stay zero). Each row is first divided by its
    largest magnitude: the squared norm of a valid float32 row can overflow (``[3e38] * 8``)
    or underflow (``[1e-39] * 8``) in float32, which left such rows scoring 0."""
    scale = np.abs(x).max(axis=-1, keepdims=True)
    y = np.asarray(x / np.where(scale == 0, 1, scale), dtype=np.float32)
    y /= np.where((norms := np.linalg.norm(y, axis=-1, keepdims=True)) == 0, 1, norms)
    return y


def normalize_factors(x: F32) -> F32:
    """Per row, the two divisors :func:`normalize` applies, as an (n, 2) array: dividing by
    them (:func:`apply_factors`) gives :func:`normalize`'s bits exactly, row by row (mapped
    vectors keep these 8 bytes per row instead of normalizing each read afresh)."""
    scale = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(scale == 0, 1, scale)
    y = np.asarray(x / s, dtype=np.float32)
    norms = np.linalg.norm(y, axis=-1, keepdims=True)
    return np.concatenate([s, np.where(norms == 0, 1, norms)], axis=1).astype(np.float32)


def apply_factors(x: F32, factors: F32) -> F32:
    """``normalize(x)`` from ``normalize_factors(x)`` (rows may be any subset, in order)."""
    y = np.asarray(x / factors[:, :1], dtype=np.float32)
    y /= factors[:, 1:]
    return y


def score(vecs: F32, q: F32, metric: str) -> F32:
    """Similarity of each row of ``vecs`` to ``q`` (higher is better): dot product for cosine
    and ip, minus the squared L2 distance for l2."""
    s: F32 = vecs @ q
    if metric != "l2":
        return s
    norms: F32 = np.einsum("ij,ij->i", vecs, vecs)
    out: F32 = (2 * s - norms - float(q @ q)).astype(np.float32)
    return out


@dataclass
class Block:
    seqs: I64
    keys: npt.NDArray[Any]
    tomb: Mask
    # (n, d); NaN rows where a row has no vector for the model. In memory, or read on demand
    # from memory-mapped segment files (index/vectors.py: read through ``take``/``row_range``)
    vecs: F32 | MappedVectors
    has_vec: Mask
    texts: list[str | None] | None
    meta: list[str | None] | None
    _parsed: list[dict[str, Any] | None] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.seqs.shape[0])

    def metas(self) -> list[dict[str, Any] | None]:
        """Metadata parsed once per block (filters and payloads read it)."""
        if self._parsed is None:
            raw = self.meta or [None] * len(self)
            self._parsed = [parse_metadata(m) for m in raw]
        return self._parsed


def make_block(
    batches: Sequence[RowBatch], key_type: KeyType, dims: dict[str, int], model: str, metric: str
) -> Block:
    rows = concat_batches(list(batches), key_type, dims)
    vecs = rows.vectors.get(model)
    if vecs is None:
        vecs = np.full((len(rows), dims[model]), np.nan, np.float32)
    has = ~np.isnan(vecs[:, 0]) if len(rows) else np.zeros(0, bool)
    if metric == "cosine" and len(rows):
        vecs = normalize(vecs)
    return Block(
        seqs=rows.seqs,
        keys=rows.keys,
        tomb=rows.tombstone,
        vecs=np.ascontiguousarray(vecs, dtype=np.float32),
        has_vec=has,
        texts=rows.texts,
        meta=rows.metadata,
    )


def key_codes(*key_arrays: npt.NDArray[Any]) -> list[I64]:
    """Integer codes such that equal keys get equal codes, across the given arrays."""
    allk = np.concatenate(key_arrays) if key_arrays else np.zeros(0, np.int64)
    if allk.dtype == object:
        _, inv = np.unique(allk.astype(str), return_inverse=True)
    else:
        inv = allk.astype(np.int64)
    out, start = [], 0
    for a in key_arrays:
        out.append(inv[start : start + len(a)].astype(np.int64))
        start += len(a)
    return out


def winners(codes: I64, seqs: I64) -> Mask:
    """True where the row has the highest seq of its key."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, bool)
    order = np.lexsort((seqs, codes))
    last = np.ones(n, bool)
    last[:-1] = codes[order][1:] != codes[order][:-1]
    out = np.zeros(n, bool)
    out[order[last]] = True
    return out
