from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from index_runtime.crash import POINTS, crash_point
from index_runtime.store.rows import Limits, concat_batches, split_by_tombstone, validate_upsert


def test_validate_normalizes() -> None:
    ks, mats, texts, meta = validate_upsert(
        ["a", "b"], {"m": [[1, 2], [3, 4]]}, {"m": 2}, ("m",), "str", Limits(), ["x", None], [{"z": 1, "a": 2}, None]
    )
    assert ks == ["a", "b"] and mats["m"].dtype == np.float32
    assert meta == ['{"a": 2, "z": 1}', None] and texts == ["x", None]


def test_metadata_must_be_json() -> None:
    from index_runtime.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="JSON"):
        validate_upsert(["a"], {"m": [[1.0]]}, {"m": 1}, ("m",), "str", Limits(), None, [{"x": object()}])
    with pytest.raises(InvalidInputError, match="JSON"):
        validate_upsert(["a"], {"m": [[1.0]]}, {"m": 1}, ("m",), "str", Limits(), None, [{"x": float("nan")}])


def test_split_and_concat() -> None:
    from index_runtime.store.rows import RowBatch

    b = RowBatch(np.arange(4), np.array([1, 2, 3, 4]), np.array([False, True, False, True]),
                 {"m": np.ones((4, 2), np.float32)})
    rows, tombs = split_by_tombstone(b)
    assert rows.keys.tolist() == [1, 3] and tombs.keys.tolist() == [2, 4] and tombs.vectors == {}
    back = concat_batches([rows, tombs], "int", {"m": 2})
    assert np.isnan(back.vectors["m"][2:]).all()


def test_crash_point_is_inert_without_env() -> None:
    os.environ.pop("DRIFTLESS_CRASH_AT", None)
    for p in POINTS:
        crash_point(p)


def test_crash_point_kills_on_the_nth_hit() -> None:
    code = "from index_runtime.crash import crash_point\nfor i in range(5):\n    print(i, flush=True)\n    crash_point('wal.fsynced')"
    env = {**os.environ, "DRIFTLESS_CRASH_AT": "wal.fsynced:3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == -9 and out.stdout.split() == ["0", "1", "2"]


def test_unknown_crash_point_is_an_error() -> None:
    env = {**os.environ, "DRIFTLESS_CRASH_AT": "nope:1"}
    out = subprocess.run([sys.executable, "-c", "from index_runtime.crash import crash_point; crash_point('wal.fsynced')"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "unknown crash point" in out.stderr


def test_normalize_keeps_rows_whose_squared_norm_leaves_float32() -> None:
    """[3e38] * 8 is a valid float32 vector whose squared norm overflows float32, [1e-39] * 8
    one whose squared norm underflows: both must come out as unit vectors (before, 0 and a
    tiny vector, so the row scored 0 against its own direction)."""
    import warnings

    from index_runtime.index.rows import normalize

    rows = np.array([[3e38] * 8, [1e-39] * 8, [1.0] * 8, [0.0] * 8, [-3e38, 0, 0, 0, 0, 0, 0, 1]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        out = normalize(rows)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[:3].astype(np.float64), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0], out[2], rtol=1e-6)  # same direction, same unit vector
    np.testing.assert_allclose(out[1], out[2], rtol=1e-6)
    assert not out[3].any()  # zero stays zero
    np.testing.assert_allclose(out[4], [-1, 0, 0, 0, 0, 0, 0, 0], atol=1e-6)
