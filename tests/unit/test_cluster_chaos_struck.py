"""``chaos._back``: when a struck pod counts as running again (restarted in place, or replaced
by a pod of its owner that was not serving at the strike), over a stand-in kubelet whose pods
change as the LocalCluster's kubelet changes its PodStates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.cluster.chaos import Struck, _back

OWNER = ("Deployment", "docs-shadow")


@dataclass
class Pod:
    name: str
    ready: bool = True
    restarts: int = 0
    proc: Any = field(default_factory=object)
    owner: tuple[str, str] = OWNER
    namespace: str = "search"
    host: Any = None


class Kubelet:
    def __init__(self, *pods: Pod) -> None:
        self.list = list(pods)

    def pods(self, namespace: str | None = None) -> list[Pod]:
        return list(self.list)


class Cluster:
    def __init__(self, *pods: Pod) -> None:
        self.kubelet = Kubelet(*pods)


def test_restarted_in_place_counts_once_ready() -> None:
    pod = Pod("docs-shadow-a-1")
    cluster = Cluster(pod)
    struck = Struck.of(pod, cluster)
    pod.proc, pod.ready = None, False  # killed
    assert not _back(cluster, struck, ready=False)
    pod.proc, pod.restarts = object(), 1
    assert _back(cluster, struck, ready=False) and not _back(cluster, struck)
    pod.ready = True
    assert _back(cluster, struck)


def test_a_rollouts_surge_pod_starting_at_the_strike_replaces_the_deleted_old_pod() -> None:
    """CI's campaign at a migration's end: the Deployment's template changed, its surge pod
    was starting when the old (ready) pod was killed; the controller deleted the old pod
    instead of restarting it, and the surge pod became ready. That pod existed at the
    strike, which the check once held against it: 240 s 'did not run again'."""
    old, surge = Pod("docs-shadow-a-1"), Pod("docs-shadow-b-2", ready=False)
    cluster = Cluster(old, surge)
    struck = Struck.of(old, cluster)
    old.proc, old.ready = None, False  # killed, then terminated by the rollout
    assert not _back(cluster, struck, ready=False)  # still there, not restarted
    cluster.kubelet.list.remove(old)  # deleted
    assert _back(cluster, struck, ready=False) and not _back(cluster, struck)
    surge.ready = True
    assert _back(cluster, struck)


def test_a_sibling_serving_at_the_strike_is_no_replacement() -> None:
    a, b = Pod("docs-reader-x-1"), Pod("docs-reader-x-2")
    cluster = Cluster(a, b)
    struck = Struck.of(a, cluster)
    cluster.kubelet.list.remove(a)  # deleted, nothing new yet
    assert not _back(cluster, struck) and not _back(cluster, struck, ready=False)
    cluster.kubelet.list.append(Pod("docs-reader-x-3"))  # the ReplicaSet's new pod
    assert _back(cluster, struck)
