"""``PodState``: what the kubelet keeps of one pod (the public fields are the contract's;
the rest is the kubelet's bookkeeping), and its ``PodView`` for the controllers."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tests.cluster.kubelet_controllers import PodView
from tests.cluster.kubelet_plan import ProbeCounter, Probes
from tests.cluster.kubelet_pods import INDEX_KEY
from tests.cluster.net import Host, Proc
from tests.kube_harness import _now

GROUPS = {"statefulsets": "apis/apps/v1", "deployments": "apis/apps/v1", "jobs": "apis/batch/v1", "cronjobs": "apis/batch/v1"}


def api_path(plural: str, namespace: str, name: str | None = None) -> str:
    """The API path of a namespaced collection or object (core group unless in GROUPS)."""
    base = f"{GROUPS.get(plural, 'api/v1')}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


@dataclass(eq=False)
class PodState:
    """One pod. ``proc`` is None between container runs (backoff) and once it has ended;
    ``host`` stays across restarts (same netns, same IP) and goes with the pod."""

    name: str
    namespace: str
    labels: dict[str, str]
    host: Host | None
    proc: Proc | None
    ready: bool
    restarts: int
    phase: str  # Pending / Running / Succeeded / Failed
    owner: tuple[str, str]  # (kind, name); ("", "") for a bare pod
    # --- bookkeeping
    uid: str = ""
    owner_uid: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    revision: str = ""
    ordinal: int | None = None
    index: int | None = None
    start_time: str = ""
    started_at: str = ""  # of the current / last container run
    started: bool = False  # the startup probe passed
    run: int = 0  # container runs so far (probe results of an older run are dropped)
    run_started: float = 0.0
    crashes: int = 0  # restarts counted by the backoff (reset after a long run)
    next_start: float = 0.0
    waiting: str = ""
    message: str = ""
    exit_code: int | None = None
    finished_at: str = ""
    finished_mono: float = 0.0
    last_ip: str = ""
    probes: Probes | None = None
    counters: dict[str, ProbeCounter] = field(default_factory=dict)
    probe_due: dict[str, float] = field(default_factory=dict)
    probing: set[str] = field(default_factory=set)
    deleting: bool = False  # a controller terminates it (the object goes once it exited)
    api_gone: bool = False  # the object was deleted (by anyone): terminate and forget
    kill_at: float = 0.0

    @staticmethod
    def adopt(obj: dict[str, Any]) -> PodState:
        """A Pod object as the kubelet starts tracking it (the controller's labels tell its
        revision, StatefulSet ordinal and Job completion index)."""
        meta = obj["metadata"]
        labels = dict(meta.get("labels") or {})
        ctrl = next((r for r in meta.get("ownerReferences") or () if r.get("controller")), None)
        rev = labels.get("pod-template-hash") or labels.get("controller-revision-hash", "").rsplit("-", 1)[-1]
        ordinal = labels.get("apps.kubernetes.io/pod-index")
        index = labels.get(INDEX_KEY)
        return PodState(
            name=meta["name"],
            namespace=meta["namespace"],
            labels=labels,
            host=None,
            proc=None,
            ready=False,
            restarts=0,
            phase="Pending",
            owner=(ctrl["kind"], ctrl["name"]) if ctrl else ("", ""),
            uid=str(meta.get("uid", "")),
            owner_uid=str(ctrl["uid"]) if ctrl else "",
            manifest=copy.deepcopy(obj),
            revision=rev,
            ordinal=int(ordinal) if ordinal is not None and ordinal.isdigit() else None,
            index=int(index) if index is not None and index.isdigit() else None,
            start_time=_now(),
        )


def pod_view(p: PodState) -> PodView:
    c = p.manifest["spec"]["containers"][0]
    ports = {str(x["name"]): int(x["containerPort"]) for x in c.get("ports") or () if x.get("name")}
    return PodView(
        name=p.name,
        labels=p.labels,
        phase=p.phase,
        ready=p.ready,
        ip=p.host.ip if p.host is not None else "",
        revision=p.revision,
        ordinal=p.ordinal,
        index=p.index,
        exit_code=p.exit_code,
        container=str(c.get("name", "")),
        finished_at=p.finished_mono,
        ports=ports,
        subdomain=str(p.manifest["spec"].get("subdomain", "")),
        deleting=p.deleting or p.api_gone,
    )
