"""Pods of one VectorIndex open only that index (``Env.INDEX``), so two indexes under one
bucket/prefix never fence each other's writer and readers load only their own index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index_runtime.cli import build_parser, serve_config
from index_runtime.contract import Env
from index_runtime.errors import NotFoundError
from index_runtime.service.auth import TokenSet
from index_runtime.service.engine import Engine
from index_runtime.service.limits import ApiLimits
from index_runtime.service.runtime import Roles
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore

DIM = 4


def pod_engine(data: Path, index: str, role: str = "writer") -> Engine:
    """An engine configured exactly as ``driftless serve --from-env`` in the index's pod."""
    args = build_parser().parse_args(
        ["serve", "--from-env", "--role", role, "--maintenance", "off", "--data", str(data)]
    )
    roles = Roles(True, False, False) if role == "writer" else Roles(False, True, False)
    config = serve_config(args, {Env.INDEX: index}, roles, TokenSet(), None, ApiLimits())
    engine = Engine(config)
    engine.open_existing()
    return engine


def write(engine: Engine, index: str, first: int) -> None:
    """Upsert two rows and commit them (a FencedError here is the bug)."""
    rt = engine.get(index)
    vecs = np.random.default_rng(first).random((2, DIM), dtype=np.float32)
    rt.upsert([f"k{first}", f"k{first + 1}"], {"m": vecs}, None, None)
    assert rt.writer is not None
    rt.writer.flush()


def epoch(data: Path, index: str) -> int:
    m = ManifestLog(LocalDirStore(data / index)).latest()
    assert m is not None
    return m.writer_epoch


def test_writers_of_two_indexes_in_one_location_do_not_fence_each_other(tmp_path: Path) -> None:
    a = pod_engine(tmp_path, "a")
    a.create("a", "m", DIM)
    write(a, "a", 0)
    b = pod_engine(tmp_path, "b")  # the old runtime opened "a" here too: a new epoch for "a"
    b.create("b", "m", DIM)
    a_epoch, b_epoch = epoch(tmp_path, "a"), epoch(tmp_path, "b")
    write(a, "a", 2)  # ...and a's own writer was fenced
    a.close()
    a = pod_engine(tmp_path, "a")  # a restart of a's writer must leave b's alone
    write(b, "b", 0)
    write(a, "a", 4)
    assert sorted(a.runtimes) == ["a"] and sorted(b.runtimes) == ["b"]
    assert epoch(tmp_path, "b") == b_epoch  # never opened by a's pods
    assert epoch(tmp_path, "a") == a_epoch + 1  # only its own restart
    for e in (a, b):
        e.close()


def test_a_reader_loads_only_its_index_and_answers_404_for_others(tmp_path: Path) -> None:
    w = pod_engine(tmp_path, "a")
    w.create("a", "m", DIM)
    write(w, "a", 0)
    other = pod_engine(tmp_path, "b")
    other.create("b", "m", DIM)
    write(other, "b", 0)
    reader = pod_engine(tmp_path, "a", role="reader")
    try:
        assert sorted(reader.runtimes) == ["a"]  # "b" is not loaded into memory
        with pytest.raises(NotFoundError, match="serves only 'a'"):
            reader.get("b")
        with pytest.raises(NotFoundError):
            w.create("c", "m", DIM)  # nor created by a's writer
        assert not (tmp_path / "c").exists()
    finally:
        for e in (reader, w, other):
            e.close()
