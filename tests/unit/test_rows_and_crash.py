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
