"""The controllers of the local cluster as PURE decisions (no I/O): which pods a StatefulSet,
Deployment or Job needs next, their status as the upstream controllers write it, Endpoints
and the names Services give in the pods' hosts files.

Inputs are ``PodView`` snapshots the kubelet takes of its pods; outputs are what to create
or delete and status dicts (timestamps are the caller's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PodView:
    """One pod as the controllers see it. ``phase``: Pending / Running / Succeeded / Failed;
    ``exit_code`` of a terminated (Job) pod; ``finished_at`` in monotonic seconds."""

    name: str
    labels: Mapping[str, str]
    phase: str
    ready: bool = False
    ip: str = ""
    revision: str = ""  # template hash (Deployment) / revision (StatefulSet)
    ordinal: int | None = None  # StatefulSet
    index: int | None = None  # Indexed Job completion index
    exit_code: int | None = None
    container: str = ""
    finished_at: float = 0.0
    ports: Mapping[str, int] | None = None  # container port name -> number
    subdomain: str = ""  # a StatefulSet pod's governing Service (hostname = name)
    deleting: bool = False


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable hash of a pod template (Deployment's pod-template-hash, StatefulSet's
    controller-revision-hash suffix): a changed template rolls the pods."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (``matchLabels`` + ``matchExpressions``) or a Service's plain map."""
    if not selector:
        return False
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    want = {**plain, **(selector.get("matchLabels") or {})}
    if any(labels.get(k) != v for k, v in want.items()):
        return False
    for e in selector.get("matchExpressions") or ():
        key, op, values = e["key"], e["operator"], set(e.get("values") or ())
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _scaled(value: Any, total: int, up: bool) -> int:
    """An int-or-percent of ``total`` (maxSurge rounds up, maxUnavailable down)."""
    if isinstance(value, str) and value.endswith("%"):
        pct = int(value[:-1]) * total
        return -(-pct // 100) if up else pct // 100
    return int(value)


# --- Deployments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    create: int  # new pods of the current template
    delete: tuple[str, ...]  # pod names to terminate


def deployment_plan(spec: Mapping[str, Any], pods: Sequence[PodView], revision: str) -> Scale:
    """One step of the Deployment controller. ``Recreate``: every old pod goes before a new
    one starts. ``RollingUpdate``: at most replicas + maxSurge pods, at least
    replicas - maxUnavailable ready; not-ready old pods go first."""
    want = int(spec.get("replicas", 1))
    live = [p for p in pods if not p.deleting]
    new = [p for p in live if p.revision == revision]
    old = [p for p in live if p.revision != revision]
    strategy = spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        if old or any(p.deleting for p in pods):
            return Scale(0, tuple(p.name for p in old))
        return _resize(new, want)
    ru = strategy.get("rollingUpdate") or {}
    surge = _scaled(ru.get("maxSurge", "25%"), want, up=True)
    unavailable = _scaled(ru.get("maxUnavailable", "25%"), want, up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    if not old:
        return _resize(new, want)
    create = max(0, min(want - len(new), want + surge - len(live)))
    ready = sum(p.ready for p in live)
    spare = ready - (want - unavailable)  # ready pods that may go
    doomed = [p.name for p in old if not p.ready]
    for p in old:
        if p.ready and spare > 0:
            doomed.append(p.name)
            spare -= 1
    return Scale(create, tuple(doomed))


def _resize(pods: Sequence[PodView], want: int) -> Scale:
    if len(pods) >= want:  # scale down: not-ready pods first, then the newest names
        extra = sorted(pods, key=lambda p: (p.ready, p.name))[: len(pods) - want]
        return Scale(0, tuple(p.name for p in extra))
    return Scale(want - len(pods), ())


def deployment_status(
    spec: Mapping[str, Any], generation: int, pods: Sequence[PodView], revision: str
) -> dict[str, Any]:
    want = int(spec.get("replicas", 1))
    live = [p for p in pods if not p.deleting]
    ready = sum(p.ready for p in live)
    updated = sum(p.revision == revision for p in live)
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    unavailable = _scaled(ru.get("maxUnavailable", "25%"), want, up=False)
    available = ready >= want - unavailable
    done = updated == want == len(live) and ready == want
    return {
        "observedGeneration": generation,
        "replicas": len(live),
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": max(0, want - ready),
        "conditions": [
            {"type": "Available", "status": str(available),
             "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable"},
            {"type": "Progressing", "status": "True",
             "reason": "NewReplicaSetAvailable" if done else "ReplicaSetUpdated"},
        ],
    }


# --- StatefulSets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OrdinalStep:
    create: tuple[int, ...]
    delete: tuple[str, ...]


def statefulset_plan(spec: Mapping[str, Any], pods: Sequence[PodView], revision: str) -> OrdinalStep:
    """One step of the StatefulSet controller: ordinals 0..replicas-1. ``OrderedReady``
    creates ordinal k only when every lower one runs and is ready, removes the highest first;
    ``RollingUpdate`` replaces the highest ordinal of an old revision, one at a time, when all
    are ready (the same name comes back with the new template)."""
    want = int(spec.get("replicas", 1))
    ordered = spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    by_ord = {p.ordinal: p for p in pods if p.ordinal is not None}
    if any(p.deleting for p in pods) and ordered:
        return OrdinalStep((), ())  # wait for a terminating pod
    extra = sorted((o for o in by_ord if o >= want), reverse=True)  # type: ignore[operator]
    if extra:
        return OrdinalStep((), (by_ord[extra[0]].name,) if ordered else tuple(by_ord[o].name for o in extra))
    missing = [o for o in range(want) if o not in by_ord]
    if missing:
        if not ordered:
            return OrdinalStep(tuple(missing), ())
        first = missing[0]
        if all(by_ord[o].ready for o in range(first)):
            return OrdinalStep((first,), ())
        return OrdinalStep((), ())
    strategy = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
    stale = [o for o in range(want) if by_ord[o].revision != revision]
    if strategy == "RollingUpdate" and stale and all(p.ready for p in by_ord.values()):
        return OrdinalStep((), (by_ord[max(stale)].name,))
    return OrdinalStep((), ())


def statefulset_status(
    spec: Mapping[str, Any], generation: int, pods: Sequence[PodView], revision: str, name: str
) -> dict[str, Any]:
    live = [p for p in pods if not p.deleting]
    ready = sum(p.ready for p in live)
    updated = sum(p.revision == revision for p in live)
    return {
        "observedGeneration": generation,
        "replicas": len(live),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "currentReplicas": updated,
        "updatedReplicas": updated,
        "currentRevision": f"{name}-{revision}",
        "updateRevision": f"{name}-{revision}",
    }


# --- Jobs -------------------------------------------------------------------------------------


def failure_action(policy: Mapping[str, Any] | None, container: str, exit_code: int) -> str:
    """The ``podFailurePolicy`` action for a failed pod: the first rule whose ``onExitCodes``
    match (FailJob, FailIndex, Ignore, Count); Count when none does. Rules on pod conditions
    (DisruptionTarget) never match here: this cluster has no evictions."""
    for rule in (policy or {}).get("rules") or ():
        on = rule.get("onExitCodes")
        if not on or on.get("containerName", container) != container:
            continue
        inside = exit_code in set(on.get("values") or ())
        if inside == (on.get("operator", "In") == "In"):
            return str(rule["action"])
    return "Count"


def format_indexes(indexes: Iterable[int]) -> str:
    """Kubernetes' interval form: {0,1,2,4,6,7} -> "0-2,4,6-7"."""
    out: list[str] = []
    xs = sorted(set(indexes))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class JobStep:
    """What the Job controller does now: pods to start (their completion indexes, None for a
    NonIndexed Job), whether to kill the active ones, the status counters, and the terminal
    condition (``Complete`` / ``Failed``, with its reason) if the Job has ended."""

    start: tuple[int | None, ...]
    status: dict[str, Any]
    terminal: str = ""
    reason: str = ""
    kill_active: bool = False


def job_plan(
    spec: Mapping[str, Any],
    pods: Sequence[PodView],
    now: float,
    elapsed_s: float,
    backoff: tuple[float, float] = (1.0, 4.0),
) -> JobStep:
    """One step of the Job controller over every pod the Job ever had (``pods``).

    * counters: ``active`` (not finished), ``ready``, ``succeeded``, ``failed`` (pods whose
      failure the podFailurePolicy ``Ignore``s are not counted);
    * FailJob on a matching exit code, ``backoffLimit`` exceeded (Job-wide, default 6) or
      ``activeDeadlineSeconds`` passed: Failed, active pods killed;
    * Indexed: ``completedIndexes``; with ``backoffLimitPerIndex`` an index whose failures
      exceed it (or FailIndex) is in ``failedIndexes`` and the others run on; the Job fails
      once every index is done if any failed (or at once past ``maxFailedIndexes``);
    * a failed pod's replacement waits ``base·2^(failures-1)`` s, capped (``backoff``)."""
    completions = int(spec.get("completions") or 1)
    parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
    indexed = spec.get("completionMode") == "Indexed"
    per_index = spec.get("backoffLimitPerIndex")
    policy = spec.get("podFailurePolicy")
    active = [p for p in pods if p.phase in ("Pending", "Running")]
    done_ok = [p for p in pods if p.phase == "Succeeded"]
    failed = [p for p in pods if p.phase == "Failed"]
    actions = {p.name: failure_action(policy, p.container, p.exit_code or 0) for p in failed}
    counted = [p for p in failed if actions[p.name] != "Ignore"]
    status: dict[str, Any] = {
        "active": len(active),
        "ready": sum(p.ready for p in active),
        "succeeded": len(done_ok),
        "failed": len(counted),
    }

    def end(kind: str, reason: str) -> JobStep:
        status["active"] = 0 if kind else status["active"]
        return JobStep((), status, kind, reason, kill_active=kind == "Failed")

    if any(a == "FailJob" for a in actions.values()):
        return end("Failed", "PodFailurePolicy")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and elapsed_s > float(deadline):
        return end("Failed", "DeadlineExceeded")

    def wait_over(history: Sequence[PodView]) -> bool:
        if not history:
            return True
        last = max(p.finished_at for p in history)
        delay = min(backoff[0] * 2 ** (len(history) - 1), backoff[1])
        return now >= last + delay

    if not indexed:
        if len(done_ok) >= completions:
            return end("Complete", "CompletionsReached")
        if len(counted) > int(spec.get("backoffLimit", 6)):
            return end("Failed", "BackoffLimitExceeded")
        room = min(parallelism, completions - len(done_ok)) - len(active)
        n = room if room > 0 and wait_over(counted) else 0
        return JobStep((None,) * n, status)

    completed = {p.index for p in done_ok if p.index is not None}
    status["completedIndexes"] = format_indexes(completed)
    fails: dict[int, list[PodView]] = {}
    for p in counted:
        if p.index is not None:
            fails.setdefault(p.index, []).append(p)
    failed_ix: set[int] = set()
    if per_index is not None:
        failed_ix = {
            i for i, fs in fails.items()
            if i not in completed and (len(fs) > int(per_index) or any(actions[p.name] == "FailIndex" for p in fs))
        }
        status["failedIndexes"] = format_indexes(failed_ix)
        cap = spec.get("maxFailedIndexes")
        if cap is not None and len(failed_ix) > int(cap):
            return end("Failed", "MaxFailedIndexesExceeded")
    elif len(counted) > int(spec.get("backoffLimit", 6)):
        return end("Failed", "BackoffLimitExceeded")
    busy = {p.index for p in active}
    todo = [i for i in range(completions) if i not in completed and i not in failed_ix]
    if len(completed) >= completions:
        return end("Complete", "CompletionsReached")
    if not active and not [i for i in todo if i not in busy] and failed_ix:
        return end("Failed", "FailedIndexes")
    room = parallelism - len(active)
    start = [i for i in todo if i not in busy and wait_over(fails.get(i, []))][: max(room, 0)]
    return JobStep(tuple(start), status)


# --- Services ---------------------------------------------------------------------------------


def service_names(service: str, namespace: str) -> list[str]:
    """The DNS names of a Service: short, ``.ns``, ``.ns.svc``, ``.ns.svc.cluster.local``."""
    base = f"{service}.{namespace}"
    return [service, base, f"{base}.svc", f"{base}.svc.cluster.local"]


def target_port(port: Mapping[str, Any], pod: PodView) -> int | None:
    """A Service port's ``targetPort`` on one pod (a name resolves through its ports)."""
    tp = port.get("targetPort", port.get("port"))
    if isinstance(tp, str) and not tp.isdigit():
        return (pod.ports or {}).get(tp)
    return int(tp)


def endpoints(service: Mapping[str, Any], pods: Sequence[PodView]) -> dict[str, Any]:
    """The Endpoints object of a Service: running pods matched by its selector, ready ones in
    ``addresses`` (all of them with ``publishNotReadyAddresses``), the others in
    ``notReadyAddresses``."""
    meta, spec = service["metadata"], service.get("spec") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    chosen = [
        p for p in pods
        if p.ip and not p.deleting and p.phase == "Running" and matches(spec.get("selector"), p.labels)
    ]
    subsets = []
    for port in spec.get("ports") or ():
        ready, unready = [], []
        for p in sorted(chosen, key=lambda p: p.name):
            if target_port(port, p) is None:
                continue
            addr: dict[str, Any] = {"ip": p.ip, "targetRef": {"kind": "Pod", "name": p.name, "namespace": meta["namespace"]}}
            if p.subdomain == meta["name"]:
                addr["hostname"] = p.name
            (ready if p.ready or publish else unready).append(addr)
        if ready or unready:
            tp = target_port(port, chosen[0]) or 0
            sub: dict[str, Any] = {"ports": [{"name": port.get("name", ""), "port": tp, "protocol": port.get("protocol", "TCP")}]}
            if ready:
                sub["addresses"] = ready
            if unready:
                sub["notReadyAddresses"] = unready
            subsets.append(sub)
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": dict(meta.get("labels") or {})},
        "subsets": subsets,
    }


def ready_addresses(ep: Mapping[str, Any], port_name: str) -> list[str]:
    return [
        a["ip"]
        for s in ep.get("subsets") or ()
        if any(p.get("name", "") == port_name for p in s["ports"])
        for a in s.get("addresses") or ()
    ]


def hosts_names(
    services: Sequence[tuple[str, str, list[str]]],
    pod_names: Sequence[tuple[str, str, str, str]] = (),
) -> dict[str, list[str]]:
    """The names every pod's hosts file carries. ``services``: (namespace, name, IPs) — a
    ClusterIP Service's proxy address or a headless Service's ready pod IPs; ``pod_names``:
    (namespace, service, pod, ip) of StatefulSet pods (``pod.svc.ns.svc...``). A short name
    (``svc`` alone) resolves only in its own namespace upstream; one hosts file serves every
    pod here, so a short name two namespaces share is left out (the qualified names stay)."""
    short: dict[str, set[str]] = {}
    for ns, name, _ in services:
        short.setdefault(name, set()).add(ns)
    out: dict[str, list[str]] = {}
    for ns, name, ips in services:
        if not ips:
            continue
        for n in service_names(name, ns):
            if n == name and len(short[name]) > 1:
                continue
            out[n] = sorted(set(ips))
    for ns, svc, pod, ip in pod_names:
        for n in service_names(svc, ns)[1:]:
            out[f"{pod}.{n}"] = [ip]
    return out
