"""``serve --shards N``: each child's command line and the restart backoff (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from index_runtime.cli import _subparser, build_parser, shard_children
from index_runtime.service.engine import Engine, ServeConfig
from index_runtime.service.supervisor import Backoff
from index_runtime.shards import shard_prefix


def test_children_get_their_shard_location_a_loopback_port_and_every_other_flag() -> None:
    p = build_parser()
    argv = [
        "serve",
        "--data",
        "/d",
        "--shards",
        "3",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "--tick",
        "0.25",
        "--maintenance",
        "off",
        "--insecure",
        "--max-batch-rows",
        "77",
        "--wal-dir",
        "/w",
        "--tokens-file",
        "/t",
    ]
    args = p.parse_args(argv)
    children = shard_children(args, _subparser(p, "serve")._actions)
    assert [c.shard for c in children] == [0, 1, 2]
    assert len({c.port for c in children}) == 3
    for c in children:
        child = p.parse_args(["serve", *c.argv])
        assert child.data == shard_prefix("/d", c.shard, 3) == f"/d/_shards/3/{c.shard}"
        assert child.wal_dir == f"/w/_shards/3/{c.shard}"
        assert (child.host, child.port, child.shards) == ("127.0.0.1", c.port, 1)
        assert (child.tick, child.maintenance, child.insecure) == (0.25, "off", True)
        assert (child.max_batch_rows, child.tokens_file) == (77, "/t")
    s3 = p.parse_args(["serve", "--s3-bucket", "b", "--s3-prefix", "p/", "--shards", "2"])
    kids = shard_children(s3, _subparser(p, "serve")._actions)
    assert [p.parse_args(["serve", *c.argv]).s3_prefix for c in kids] == [
        "p/_shards/2/0",
        "p/_shards/2/1",
    ]


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_life() -> None:
    b = Backoff(first_s=0.5, max_s=3.0, reset_after_s=30.0)
    waits, w = [], None
    for _ in range(5):
        w = b.next(w, lived_s=1.0)
        waits.append(w)
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.next(3.0, lived_s=31.0) == 0.5


@pytest.mark.parametrize("junk", ["_shards", ".wal", "Upper", "a_b"])
def test_the_engine_never_takes_a_shards_directory_for_an_index(tmp_path: Path, junk: str) -> None:
    (tmp_path / junk / "manifests").mkdir(parents=True)
    (tmp_path / "real" / "manifests").mkdir(parents=True)
    engine = Engine(ServeConfig(data=tmp_path))
    assert engine.discover() == ["real"]
