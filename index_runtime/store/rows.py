"""Rows in memory and their validation (pure: no I/O).

A :class:`RowBatch` is columnar: seqs, keys, a tombstone flag, one float32 matrix per model
(NaN rows where a row has no vector for that model, e.g. tombstones or rows written before a
migration started), optional texts and JSON metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from index_runtime.errors import BatchTooLargeError, InvalidInputError

KeyType = Literal["int", "str"]
Key = int | str

MAX_KEY_CHARS = 512
MAX_TEXT_CHARS = 1 << 20
MAX_METADATA_BYTES = 64 << 10  # one row's metadata as JSON (UTF-8)


def valid_unicode(s: str) -> bool:
    """False for a string with a lone surrogate (it could be stored but never answered)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class RowBatch:
    seqs: npt.NDArray[np.int64]
    keys: npt.NDArray[Any]  # int64, or object array of str
    tombstone: npt.NDArray[np.bool_]
    vectors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    texts: list[str | None] | None = None
    metadata: list[str | None] | None = None  # JSON text

    def __len__(self) -> int:
        return int(self.seqs.shape[0])

    def take(self, idx: npt.NDArray[np.int64]) -> RowBatch:
        """The rows at positions ``idx``, in that order."""
        return RowBatch(
            seqs=self.seqs[idx],
            keys=self.keys[idx],
            tombstone=self.tombstone[idx],
            vectors={m: v[idx] for m, v in self.vectors.items()},
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
            metadata=None if self.metadata is None else [self.metadata[i] for i in idx.tolist()],
        )


def key_array(keys: Sequence[Key], key_type: KeyType) -> npt.NDArray[Any]:
    """Keys as the column type of the index: int64, or an object array of str."""
    return np.array(keys, dtype=np.int64 if key_type == "int" else object)


def concat_batches(
    batches: Sequence[RowBatch], key_type: KeyType, dims: Mapping[str, int]
) -> RowBatch:
    """Concatenate batches; models missing from a batch get NaN rows, models not in ``dims``
    (dropped from the index by a model migration) are left out."""
    if not batches:
        return RowBatch(
            np.zeros(0, np.int64),
            key_array([], key_type),
            np.zeros(0, bool),
            {m: np.zeros((0, d), np.float32) for m, d in dims.items()},
        )
    models = sorted({m for b in batches for m in b.vectors if m in dims})
    vectors = {}
    for m in models:
        parts = []
        for b in batches:
            if m in b.vectors:
                parts.append(b.vectors[m])
            else:
                parts.append(np.full((len(b), dims[m]), np.nan, np.float32))
        vectors[m] = np.concatenate(parts)
    any_text = any(b.texts is not None for b in batches)
    any_meta = any(b.metadata is not None for b in batches)
    texts = [t for b in batches for t in (b.texts or [None] * len(b))] if any_text else None
    meta = [t for b in batches for t in (b.metadata or [None] * len(b))] if any_meta else None
    keys = np.concatenate([b.keys for b in batches])
    if key_type == "str":
        keys = keys.astype(object)
    return RowBatch(
        seqs=np.concatenate([b.seqs for b in batches]),
        keys=keys,
        tombstone=np.concatenate([b.tombstone for b in batches]),
        vectors=vectors,
        texts=texts,
        metadata=meta,
    )


@dataclass(frozen=True)
class Limits:
    max_batch_rows: int = 10_000


def _check_key(key: object, key_type: KeyType, i: int) -> Key:
    if key_type == "int":
        if isinstance(key, bool) or not isinstance(key, int | np.integer):
            raise InvalidInputError(f"keys[{i}]: expected an integer key, got {type(key).__name__}")
        k = int(key)
        if not -(2**63) <= k < 2**63:
            raise InvalidInputError(f"keys[{i}]: integer key out of the int64 range")
        return k
    if not isinstance(key, str):
        raise InvalidInputError(f"keys[{i}]: expected a string key, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidInputError(f"keys[{i}]: string keys must have 1 to {MAX_KEY_CHARS} characters")
    if not valid_unicode(key):
        raise InvalidInputError(f"keys[{i}]: invalid Unicode (a lone surrogate)")
    return key


def validate_keys(keys: Sequence[object], key_type: KeyType, limits: Limits) -> list[Key]:
    if len(keys) == 0:
        raise InvalidInputError("the batch is empty")
    if len(keys) > limits.max_batch_rows:
        raise BatchTooLargeError(
            f"the batch has {len(keys)} rows; at most {limits.max_batch_rows} are accepted per call"
        )
    if key_type == "int":
        arr = np.asarray(keys)
        if (
            arr.ndim == 1
            and arr.dtype.kind in "iu"
            and (arr.dtype.kind == "i" or arr.max() < 2**63)
        ):
            ints: list[Key] = arr.astype(np.int64).tolist()
            return ints  # vectorized: already a clean integer array
    return [_check_key(k, key_type, i) for i, k in enumerate(keys)]


def validate_upsert(
    keys: Sequence[object],
    vectors: Mapping[str, Any],
    dims: Mapping[str, int],
    required_models: Sequence[str],
    key_type: KeyType,
    limits: Limits,
    texts: Sequence[str | None] | None = None,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
) -> tuple[
    list[Key], dict[str, npt.NDArray[np.float32]], list[str | None] | None, list[str | None] | None
]:
    """Check an upsert and return it normalized: keys, float32 matrices, texts, JSON metadata.

    Refuses: empty or oversize batches, keys of the wrong type, unknown models, missing
    required models, wrong dimensions, NaN or Inf, texts/metadata of the wrong length, and a
    key given twice with different content (the same row given twice is collapsed).
    """
    ks = validate_keys(keys, key_type, limits)
    n = len(ks)
    for m in required_models:
        if m not in vectors:
            raise InvalidInputError(
                f"vectors for model {m!r} are required (the index writes {list(required_models)})"
            )
    mats: dict[str, npt.NDArray[np.float32]] = {}
    for m, raw in vectors.items():
        if m not in dims:
            raise InvalidInputError(f"unknown model {m!r}; this index knows {sorted(dims)}")
        try:
            arr = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"vectors[{m!r}] is not a numeric matrix: {exc}") from None
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InvalidInputError(
                f"vectors[{m!r}] must have shape ({n}, {dims[m]}), got {arr.shape}"
            )
        if arr.shape[1] != dims[m]:
            raise InvalidInputError(
                f"vectors[{m!r}] has dimension {arr.shape[1]}; model {m!r} has dimension {dims[m]}"
            )
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise InvalidInputError(f"vectors[{m!r}][{bad}] contains NaN or Inf")
        mats[m] = np.ascontiguousarray(arr)
    text_list: list[str | None] | None = None
    if texts is not None:
        if len(texts) != n:
            raise InvalidInputError(f"texts has {len(texts)} entries for {n} keys")
        for i, t in enumerate(texts):
            if t is not None and (not isinstance(t, str) or len(t) > MAX_TEXT_CHARS):
                raise InvalidInputError(
                    f"texts[{i}] must be a string of at most {MAX_TEXT_CHARS} characters"
                )
            if t is not None and not valid_unicode(t):
                raise InvalidInputError(f"texts[{i}]: invalid Unicode (a lone surrogate)")
        text_list = list(texts)
    meta_list: list[str | None] | None = None
    if metadata is not None:
        if len(metadata) != n:
            raise InvalidInputError(f"metadata has {len(metadata)} entries for {n} keys")
        meta_list = []
        for i, md in enumerate(metadata):
            if md is None:
                meta_list.append(None)
                continue
            if not isinstance(md, Mapping):
                raise InvalidInputError(f"metadata[{i}] must be an object")
            try:
                # ensure_ascii=False: a lone surrogate anywhere (keys or values, any depth)
                # then fails the UTF-8 encode below instead of being stored as an escape
                text = json.dumps(md, sort_keys=True, allow_nan=False, ensure_ascii=False)
                size = len(text) if text.isascii() else len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidInputError(f"metadata[{i}]: invalid Unicode (a lone surrogate)") from None
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"metadata[{i}] is not JSON-serializable: {exc}") from None
            if size > MAX_METADATA_BYTES:
                raise InvalidInputError(
                    f"metadata[{i}] has {size} bytes as JSON; at most {MAX_METADATA_BYTES}"
                )
            meta_list.append(text)
    ks, mats, text_list, meta_list = _collapse_duplicates(ks, mats, text_list, meta_list)
    return ks, mats, text_list, meta_list


def _collapse_duplicates(
    ks: list[Key],
    mats: dict[str, npt.NDArray[np.float32]],
    texts: list[str | None] | None,
    meta: list[str | None] | None,
) -> tuple[
    list[Key], dict[str, npt.NDArray[np.float32]], list[str | None] | None, list[str | None] | None
]:
    if len(set(ks)) == len(ks):
        return ks, mats, texts, meta
    first: dict[Key, int] = {}
    dup_rows: list[int] = []
    for i, k in enumerate(ks):
        j = first.setdefault(k, i)
        if j == i:
            continue
        same = all(np.array_equal(v[i], v[j]) for v in mats.values())
        same = same and (texts is None or texts[i] == texts[j])
        same = same and (meta is None or meta[i] == meta[j])
        if not same:
            raise InvalidInputError(f"key {k!r} appears twice in the batch with different content")
        dup_rows.append(i)
    if not dup_rows:
        return ks, mats, texts, meta
    keep = np.array(sorted(first.values()), dtype=np.int64)
    return (
        [ks[i] for i in keep],
        {m: v[keep] for m, v in mats.items()},
        None if texts is None else [texts[i] for i in keep],
        None if meta is None else [meta[i] for i in keep],
    )


def dedupe_keys(ks: list[Key]) -> list[Key]:
    seen: set[Key] = set()
    out = []
    for k in ks:
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def split_by_tombstone(batch: RowBatch) -> list[RowBatch]:
    """Rows and tombstones apart (tombstones carry no vectors, so they are stored without
    vector columns instead of as null-padded ones). Empty parts are left out."""
    if not batch.tombstone.any():
        return [batch] if len(batch) else []
    if batch.tombstone.all():
        return [RowBatch(batch.seqs, batch.keys, batch.tombstone)]
    rows = batch.take(np.flatnonzero(~batch.tombstone))
    tombs = batch.take(np.flatnonzero(batch.tombstone))
    return [rows, RowBatch(tombs.seqs, tombs.keys, tombs.tombstone)]
