"""Where one shard of a VectorIndex lives in Kubernetes and in the store (PURE).

A ``Placement`` names a shard's objects, labels them and gives its storage prefix. The
unsharded index (``shards == 1``) has one placement whose names, labels and prefix are the
index's own, so everything built for it is what was built before shards existed.

Shard ``i`` of a sharded index ``X``: objects ``X-s<i>-<role>`` (``X-s<i>-writer``, …, Jobs
``X-s<i>-train-<n>``), labels ``app.kubernetes.io/instance: X`` plus ``driftless.dev/shard: i``,
storage ``shard_prefix(<spec.storage.prefix>, i, n)`` (the runtime appends the index name, so a
shard's objects are ``<prefix>/_shards/<n>/<i>/X/…``: no index name starts with ``_``, so no
other index's ``<prefix>/<name>/`` holds them, and two shards or two counts never share one).

Names can meet another index's: an index called ``X-s1`` names its writer ``X-s1-writer``, as
shard 1 of ``X`` does. Kubernetes names have no character an index name cannot also hold, so
no scheme avoids that by construction; ``name_conflicts`` finds a desired object already owned
by another VectorIndex, and the operator then applies nothing for the later index and says so
(condition ``Ready=False``, reason ``NameConflict``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from index_operator.resources.common import dns_name, labels, selector
from index_runtime import contract
from index_runtime.contract import Role
from index_runtime.shards import check_shards, shard_prefix

SHARD_LABEL = "driftless.dev/shard"
ROUTER = "router"  # the component of a sharded index's router pods


@dataclass(frozen=True)
class Placement:
    """Shard ``shard`` of ``shards`` of index ``index``."""

    index: str
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        check_shards(self.shards)
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is not in 0..{self.shards - 1}")

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    @property
    def stem(self) -> str:
        """What the shard's object names start with: the index name when unsharded."""
        return f"{self.index}-s{self.shard}" if self.sharded else self.index

    def name(self, *parts: str) -> str:
        return dns_name(self.stem, *parts)

    def service(self, role: Role) -> str:
        return self.name(role.value)

    def url(self, namespace: str, role: Role) -> str:
        return f"http://{self.service(role)}.{namespace}.svc:{contract.HTTP_PORT}"

    def shard_labels(self) -> dict[str, str]:
        return {SHARD_LABEL: str(self.shard)} if self.sharded else {}

    def selector(self, component: str) -> dict[str, str]:
        return {**selector(self.index, component), **self.shard_labels()}

    def labels(self, component: str) -> dict[str, str]:
        return {**labels(self.index, component), **self.shard_labels()}

    def prefix(self, base: str) -> str:
        """The storage prefix of the shard's pods (``DRIFTLESS_S3_PREFIX``)."""
        return shard_prefix(base, self.shard, self.shards)


def placements(index: str, shards: int) -> tuple[Placement, ...]:
    """Every shard of an index, in shard order (one, the index itself, when unsharded)."""
    return tuple(Placement(index, i, shards) for i in range(check_shards(shards)))


def router_name(index: str) -> str:
    return dns_name(index, ROUTER)


def shard_urls(index: str, namespace: str, shards: int, role: Role) -> str:
    """``Env.SHARD_WRITERS`` / ``Env.SHARD_READERS``: the shards' Service URLs, comma-separated
    in shard order."""
    return ",".join(p.url(namespace, role) for p in placements(index, shards))


def name_conflicts(
    desired: Iterable[Mapping[str, Any]],
    live: Callable[[str, str], Mapping[str, Any] | None],
    index: str,
) -> list[str]:
    """Desired objects whose name another VectorIndex's object already holds (``live(kind,
    name)``: the object as known, None if absent), as ``Kind/name (VectorIndex other)``.
    An object owned by a VectorIndex of the same name is not a conflict: it is this index's,
    or a deleted and re-created one's that garbage collection is removing."""
    out = []
    for obj in desired:
        kind, name = str(obj["kind"]), str(obj["metadata"]["name"])
        have = live(kind, name)
        if not have:
            continue
        for ref in (have.get("metadata") or {}).get("ownerReferences") or ():
            if (
                ref.get("kind") == "VectorIndex"
                and ref.get("controller")
                and ref.get("name") != index
            ):
                out.append(f"{kind}/{name} (VectorIndex {ref.get('name')})")
    return out
