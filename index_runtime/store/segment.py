"""Segments: immutable Arrow IPC files holding rows of one index.

Columns: ``seq`` int64, ``key`` int64 or utf8, ``tombstone`` bool, ``text`` utf8 (nullable),
``metadata`` utf8 JSON (nullable), and one ``vector.<model>`` FixedSizeList<float32, d> per
model (null where a row has no vector for that model). A segment can carry vectors of more
than one model, which migrations need. The schema metadata carries ``format_version``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from index_runtime.errors import CorruptObjectError, FormatVersionError
from index_runtime.store.rows import KeyType, RowBatch, concat_batches

SEGMENT_FORMAT_VERSION = 1
VECTOR_PREFIX = "vector."


def _vector_array(mat: np.ndarray) -> pa.Array:
    n, d = mat.shape
    missing = np.isnan(mat[:, 0]) if d else np.zeros(n, bool)
    if missing.any():  # null rows: zero their (unused) values, keep a validity mask
        mat = mat.copy()
        mat[missing] = 0.0
        mask = pa.array(missing)
    else:
        mask = None  # the common case: no copy, Arrow wraps the numpy buffer
    values = pa.array(np.ascontiguousarray(mat, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)


def batch_to_record_batch(
    batch: RowBatch, key_type: KeyType, dims: Mapping[str, int], every_model: bool = False
) -> pa.RecordBatch:
    n = len(batch)
    cols: dict[str, pa.Array] = {
        "seq": pa.array(batch.seqs, type=pa.int64()),
        "key": pa.array(batch.keys, type=pa.int64() if key_type == "int" else pa.string()),
        "tombstone": pa.array(batch.tombstone, type=pa.bool_()),
        "text": pa.array(batch.texts if batch.texts is not None else [None] * n, type=pa.string()),
        "metadata": pa.array(
            batch.metadata if batch.metadata is not None else [None] * n, type=pa.string()
        ),
    }
    # a model with no vector in any row gets no column at all (tombstone-only segments),
    # unless ``every_model`` (a stream of batches must share one schema)
    for m in sorted(dims):
        mat = batch.vectors.get(m)
        if every_model and (mat is None or not n):
            mat = np.full((n, dims[m]), np.nan, np.float32)
        if mat is not None and (every_model or (n and not np.isnan(mat[:, 0]).all())):
            cols[VECTOR_PREFIX + m] = _vector_array(mat)
    return pa.RecordBatch.from_pydict(cols)


def segment_schema_metadata(key_type: KeyType, dims: Mapping[str, int]) -> dict[bytes, bytes]:
    return {
        b"driftless.format_version": str(SEGMENT_FORMAT_VERSION).encode(),
        b"driftless.key_type": key_type.encode(),
        b"driftless.models": json.dumps(dict(sorted(dims.items()))).encode(),
    }


def _exact_ipc_file(schema: pa.Schema, batches: list[pa.RecordBatch], size: int) -> memoryview:
    """The Arrow IPC file of ``batches`` written straight into one buffer of ``size`` bytes
    (measured beforehand with a :class:`pyarrow.MockOutputStream`): one copy of the data, no
    growing buffer and no ``bytes`` copy at the end."""
    buf = pa.allocate_buffer(size)
    sink = pa.FixedSizeBufferWriter(buf)
    _write_ipc_file(sink, schema, batches)
    if sink.tell() != size:  # the sizing pass and the write must agree byte for byte
        raise AssertionError(f"segment encoded to {sink.tell()} bytes, sized {size}")
    return memoryview(buf).toreadonly()


def _write_ipc_file(sink: Any, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    with pa.ipc.new_file(sink, schema) as writer:
        for rb in batches:
            writer.write_batch(rb)


def _ipc_size(schema: pa.Schema, batches: list[pa.RecordBatch]) -> int:
    mock = pa.MockOutputStream()
    _write_ipc_file(mock, schema, batches)
    return int(mock.size())


def encode_segment_view(
    batch: RowBatch, key_type: KeyType, dims: Mapping[str, int]
) -> memoryview:
    """The Arrow IPC file of ``batch`` as a read-only view of one exact-size buffer (what
    segment puts take: no copy into ``bytes``)."""
    rb = batch_to_record_batch(batch, key_type, dims)
    schema = rb.schema.with_metadata(segment_schema_metadata(key_type, dims))
    return _exact_ipc_file(schema, [rb], _ipc_size(schema, [rb]))


def encode_segment(batch: RowBatch, key_type: KeyType, dims: Mapping[str, int]) -> bytes:
    """The Arrow IPC file bytes of ``batch``."""
    return bytes(encode_segment_view(batch, key_type, dims))


class SegmentWriter:
    """Collects record batches of one Arrow IPC file (compaction output); :meth:`finish`
    writes them into one exact-size buffer. A sizing stream sees every batch as it comes, so
    :attr:`nbytes` is the file's size so far without holding a second copy of the rows."""

    def __init__(self, key_type: KeyType, dims: Mapping[str, int]) -> None:
        self.key_type = key_type
        self.dims = dict(dims)
        self._mock = pa.MockOutputStream()
        self._sizer: Any = None
        self._schema: pa.Schema | None = None
        self._batches: list[pa.RecordBatch] = []
        self.rows = 0

    def write(self, batch: RowBatch) -> None:
        if len(batch) == 0:
            return
        rb = batch_to_record_batch(batch, self.key_type, self.dims, every_model=True)
        if self._sizer is None:
            schema = rb.schema.with_metadata(segment_schema_metadata(self.key_type, self.dims))
            self._schema = schema
            self._sizer = pa.ipc.new_file(self._mock, schema)
        self._sizer.write_batch(rb)
        self._batches.append(rb)
        self.rows += len(batch)

    @property
    def nbytes(self) -> int:
        return int(self._mock.size())

    def finish(self) -> memoryview:
        assert self._sizer is not None and self._schema is not None, (
            "finish() on an empty SegmentWriter"
        )
        self._sizer.close()
        out = _exact_ipc_file(self._schema, self._batches, int(self._mock.size()))
        self._batches = []
        return out


def _check_schema(schema: pa.Schema, key_type: KeyType) -> None:
    meta = schema.metadata or {}
    raw = meta.get(b"driftless.format_version")
    if raw is None:
        raise CorruptObjectError("segment has no driftless.format_version in its schema")
    version = int(raw)
    if version > SEGMENT_FORMAT_VERSION or version < 1:
        raise FormatVersionError(
            f"segment format_version {version} is not supported by this build "
            f"(it reads versions 1..{SEGMENT_FORMAT_VERSION}); upgrade Driftless"
        )
    if meta.get(b"driftless.key_type", b"").decode() != key_type:
        raise CorruptObjectError("segment key type does not match the index")


def _to_numpy_vectors(col: pa.ChunkedArray | pa.Array, d: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    flat = arr.flatten() if arr.null_count == 0 else arr.fill_null([0.0] * d).flatten()
    mat = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)
    if arr.null_count:
        mat = mat.copy()
        mat[np.asarray(arr.is_null().to_numpy(zero_copy_only=False))] = np.nan
    return mat


def record_batch_to_rows(
    rb: pa.RecordBatch | pa.Table, key_type: KeyType, columns: str = "all"
) -> RowBatch:
    """Arrow -> RowBatch. ``columns="keys"`` reads only seq/key/tombstone (cheap scans);
    ``columns="payload"`` everything but the vectors (read from the mapping instead)."""
    names = rb.schema.names
    keys_col = rb.column(names.index("key"))
    if key_type == "int":
        keys = np.asarray(keys_col.to_numpy(zero_copy_only=False), dtype=np.int64)
    else:
        keys = np.array(keys_col.to_pylist(), dtype=object)
    out = RowBatch(
        seqs=np.asarray(
            rb.column(names.index("seq")).to_numpy(zero_copy_only=False), dtype=np.int64
        ),
        keys=keys,
        tombstone=np.asarray(
            rb.column(names.index("tombstone")).to_numpy(zero_copy_only=False), dtype=bool
        ),
    )
    if columns == "keys":
        return out
    for name in names:
        if name.startswith(VECTOR_PREFIX) and columns != "payload":
            field = rb.schema.field(name)
            out.vectors[name[len(VECTOR_PREFIX) :]] = _to_numpy_vectors(
                rb.column(names.index(name)), field.type.list_size
            )
    texts = rb.column(names.index("text"))
    out.texts = texts.to_pylist() if texts.null_count < len(texts) else None
    meta = rb.column(names.index("metadata"))
    out.metadata = meta.to_pylist() if meta.null_count < len(meta) else None
    return out


def _open(source: bytes | pa.Buffer | str) -> Any:
    try:
        if isinstance(source, str):
            return pa.ipc.open_file(pa.memory_map(source, "r"))
        return pa.ipc.open_file(pa.BufferReader(source))
    except pa.ArrowInvalid as exc:
        raise CorruptObjectError(f"segment is not a readable Arrow IPC file: {exc}") from None


def open_segment(source: bytes | str, key_type: KeyType) -> Any:
    """The segment's Arrow IPC file reader, its schema checked (a path is memory-mapped)."""
    reader = _open(source)
    _check_schema(reader.schema, key_type)
    return reader


def mapped_vectors(
    rb: pa.RecordBatch, model: str
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Zero-copy ``(values (n, d) float32, valid or None)`` of the model's vector column, or
    None if the batch has no column for the model. ``values`` is a read-only view of the
    FixedSizeList's values buffer (of the memory-mapped file when the batch was read from
    one); rows where ``valid`` is False have no vector and hold whatever was written there
    (zeros, by :func:`_vector_array`). A values child with nulls of its own (never written
    by this module) is decoded into memory with NaN in place of its nulls."""
    name = VECTOR_PREFIX + model
    if name not in rb.schema.names:
        return None
    col = rb.column(rb.schema.names.index(name))
    d = col.type.list_size
    n = len(col)
    child = col.values.slice(col.offset * d, n * d)
    if child.null_count:
        flat = np.asarray(child.to_numpy(zero_copy_only=False), np.float32).copy()
        flat[np.asarray(child.is_null().to_numpy(zero_copy_only=False))] = np.nan
    else:
        flat = child.to_numpy(zero_copy_only=True)
    valid = None
    if col.null_count:
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
    return flat.reshape(n, d), valid


def iter_segment(
    source: bytes | str, key_type: KeyType, columns: str = "all"
) -> Iterator[RowBatch]:
    """Yield the segment's record batches as RowBatches (a path is memory-mapped)."""
    reader = _open(source)
    _check_schema(reader.schema, key_type)
    for i in range(reader.num_record_batches):
        rb = reader.get_batch(i)
        if columns == "keys":
            rb = rb.select(["seq", "key", "tombstone"])
        yield record_batch_to_rows(rb, key_type, columns)


def read_segment(source: bytes | str, key_type: KeyType, columns: str = "all") -> RowBatch:
    """The whole segment as one RowBatch."""
    parts = list(iter_segment(source, key_type, columns))
    dims = {m: v.shape[1] for p in parts for m, v in p.vectors.items()}
    return concat_batches(parts, key_type, dims)
