"""Shards of one index (PURE): which shard owns a key, where a shard's objects live, and how
the shards' answers merge.

An index with ``shards = n`` is n independent runtime indexes of the same name, each with its
own writer, prefix, manifest, WAL, codebook, oracle and compaction. A key belongs to exactly
one shard, ``shard_of(key, n)``, decided by a hash of the key's canonical bytes, so the count
is fixed when the index is created (resharding would move keys between prefixes: out of
scope). A query fans out to every shard; each answers its exact re-ranked top-k, and
``merge_hits`` keeps the best k of the union.

``shards = 1`` is the unsharded index: the same prefix and the same names as before shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

MAX_SHARDS = 64
SHARDS_DIR = "_shards"  # "_" is not allowed in an index name: no index can be called this

T = TypeVar("T")


def check_shards(shards: int) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
    return shards


def key_bytes(key: int | str) -> bytes:
    """The canonical bytes of a key: its type and value (int 7 and str "7" differ)."""
    if isinstance(key, bool):
        raise TypeError("a key is an int or a str, not a bool")
    if isinstance(key, int):
        return b"i:" + str(key).encode()
    if isinstance(key, str):
        return b"s:" + key.encode("utf-8", "surrogatepass")
    raise TypeError(f"a key is an int or a str, not {type(key).__name__}")


def shard_of(key: int | str, shards: int) -> int:
    """The shard that owns ``key``: blake2b-64 of its canonical bytes modulo ``shards``
    (stable across processes, versions and platforms, unlike ``hash()``)."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def split_by_shard(items: Iterable[T], key_of: Any, shards: int) -> dict[int, list[T]]:
    """Items grouped by the shard of ``key_of(item)``, each group in the input order; only
    shards that get something appear."""
    out: dict[int, list[T]] = {}
    for item in items:
        out.setdefault(shard_of(key_of(item), shards), []).append(item)
    return out


def shard_prefix(prefix: str, shard: int, shards: int) -> str:
    """Where shard ``shard`` of ``shards`` keeps its indexes under a store prefix (an S3
    prefix or a directory, '/'-separated): the prefix itself when unsharded, else
    ``<prefix>/_shards/<shards>/<shard>``. The count is part of the path: a second index
    with another count under the same prefix never shares a shard's objects."""
    check_shards(shards)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    if shards == 1:
        return prefix
    base = prefix.rstrip("/")
    tail = f"{SHARDS_DIR}/{shards}/{shard}"
    return f"{base}/{tail}" if base else tail


def merge_hits(answers: Sequence[Sequence[Mapping[str, Any]]], k: int) -> list[Mapping[str, Any]]:
    """The best ``k`` hits of the shards' answers (each a list of hits with ``score``,
    higher is better, and ``key``): by score, ties by shard order then rank within the
    shard, so the merge is deterministic. Keys never repeat across shards (one owner)."""
    ranked = [
        (-float(hit["score"]), shard, rank, hit)
        for shard, hits in enumerate(answers)
        for rank, hit in enumerate(hits)
    ]
    ranked.sort(key=lambda t: (t[0], t[1], t[2]))
    return [t[3] for t in ranked[:k]]
