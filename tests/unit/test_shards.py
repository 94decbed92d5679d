from __future__ import annotations

import collections
import random

import pytest

from index_runtime.shards import (
    check_shards,
    key_bytes,
    merge_hits,
    shard_of,
    shard_prefix,
    split_by_shard,
)


def test_shard_of_is_stable_across_processes() -> None:
    # pinned values: a change of the hash would move every key of every sharded index
    # blake2b-64(b"i:0") = 0x5668443505205b5b; 0x...5b % 4 == 3
    assert [shard_of(k, 4) for k in (0, 1, 2, "a", "b", "7", 7)] == [3, 1, 3, 2, 1, 2, 1]
    import subprocess
    import sys

    code = "from index_runtime.shards import shard_of; print([shard_of(k, 7) for k in (0, 1, 'a', 'é', 2**40)])"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONHASHSEED": str(seed)}, check=True).stdout for seed in (1, 2)}  # fmt: skip
    assert len(out) == 1 and out.pop().strip() == str(
        [shard_of(k, 7) for k in (0, 1, "a", "é", 2**40)]
    )


def test_int_and_str_keys_are_different_keys() -> None:
    assert key_bytes(7) != key_bytes("7")
    with pytest.raises(TypeError):
        key_bytes(True)


def test_keys_spread_evenly() -> None:
    rng = random.Random(0)
    for shards in (2, 4, 7):
        keys = [rng.randrange(10**12) for _ in range(20_000)] + [f"doc-{i}" for i in range(20_000)]
        counts = collections.Counter(shard_of(k, shards) for k in keys)
        assert set(counts) == set(range(shards))
        mean = len(keys) / shards
        assert max(abs(c - mean) for c in counts.values()) < 0.05 * mean, counts


def test_one_shard_is_the_unsharded_index() -> None:
    assert shard_of("x", 1) == 0 and shard_prefix("base/p", 0, 1) == "base/p"
    assert shard_prefix("base/p/", 2, 4) == "base/p/_shards/4/2"
    assert shard_prefix("", 0, 2) == "_shards/2/0"
    for bad in (0, 65, True, 2.0):
        with pytest.raises(ValueError):
            check_shards(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shard_prefix("p", 4, 4)


def test_split_keeps_order_within_a_shard() -> None:
    keys: list[int | str] = ["a", "b", "c", "d", "e", "f", "g", 1, 2, 3]
    items = [(k, i) for i, k in enumerate(keys)]
    groups = split_by_shard(items, lambda t: t[0], 3)
    assert sorted(i for g in groups.values() for _, i in g) == list(range(len(items)))
    for shard, group in groups.items():
        assert all(shard_of(k, 3) == shard for k, _ in group)
        assert [i for _, i in group] == sorted(i for _, i in group)


def test_merge_keeps_the_best_k_of_the_union() -> None:
    a = [{"key": "a1", "score": 0.9}, {"key": "a2", "score": 0.5}]
    b = [{"key": "b1", "score": 0.95}, {"key": "b2", "score": 0.5}, {"key": "b3", "score": 0.1}]
    got = [h["key"] for h in merge_hits([a, b], 4)]
    assert got == ["b1", "a1", "a2", "b2"]  # the 0.5 tie: shard 0 first
    assert merge_hits([[], []], 3) == []
    assert [h["key"] for h in merge_hits([a, b], 10)] == ["b1", "a1", "a2", "b2", "b3"]
