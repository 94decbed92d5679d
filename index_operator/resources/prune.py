"""Which children left the desired set (PURE): what a reconcile deletes after applying.

Only kinds the builders may stop producing for an index that still exists are pruned: the
readers' PodDisruptionBudget (readers < 2) and the ServiceMonitor (monitoring turned off).
Everything else is either always built while the index exists (Services, workloads, Secrets,
the ConfigMap, the compaction CronJob) or not the desired set's to decide (Jobs end by their
TTL). The per-index NetworkPolicy is switched installation-wide together with the operator's
rights on NetworkPolicies, so it cannot be pruned (the chart's values say how to remove them).
``tests/unit/test_operator_prune.py`` checks this list against the builders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from typing import Any

PRUNABLE = frozenset({"PodDisruptionBudget", "ServiceMonitor"})


def stale_children(
    children: Iterable[tuple[str, Mapping[str, Any]]],
    desired: Set[tuple[str, str]],
    known_kinds: Set[str],
) -> list[tuple[str, str]]:
    """(kind, name) of each owned child of a prunable kind whose listing is complete
    (``known_kinds``) and that the desired set no longer has."""
    out = []
    for kind, obj in children:
        name = str((obj.get("metadata") or {}).get("name") or "")
        if kind in PRUNABLE and kind in known_kinds and (kind, name) not in desired:
            out.append((kind, name))
    return sorted(out)
