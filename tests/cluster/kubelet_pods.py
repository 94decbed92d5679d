"""Pod objects as the controllers create them and their status as the kubelet reports it
(PURE: manifests in, manifests out; timestamps and random suffixes are the caller's)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.cluster.kubelet_plan import claim_name

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
FAILURES_KEY = "batch.kubernetes.io/job-index-failure-count"  # with backoffLimitPerIndex


def _owner(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_manifest(
    owner: Mapping[str, Any],
    template: Mapping[str, Any],
    name: str,
    *,
    revision: str = "",
    ordinal: int | None = None,
    index: int | None = None,
    index_failures: int | None = None,
) -> dict[str, Any]:
    """The Pod a controller creates from its owner's template: the template's labels and
    annotations plus the controller's own (``pod-template-hash``; StatefulSet:
    ``statefulset.kubernetes.io/pod-name``, ``controller-revision-hash``, ``hostname`` /
    ``subdomain`` and one PVC volume per volumeClaimTemplate; Job: ``job-name``,
    ``controller-uid``, and for an Indexed Job the completion index annotation and label with
    ``JOB_COMPLETION_INDEX`` in every container's env, as the Job controller injects it, and
    with ``backoffLimitPerIndex`` the index's failures so far, ``index_failures``)."""
    kind, meta = owner["kind"], owner["metadata"]
    tmeta = template.get("metadata") or {}
    spec = copy.deepcopy(dict(template.get("spec") or {}))
    labels = dict(tmeta.get("labels") or {})
    annotations = dict(tmeta.get("annotations") or {})
    if kind == "Deployment":
        labels["pod-template-hash"] = revision
    elif kind == "StatefulSet":
        labels.update({
            "statefulset.kubernetes.io/pod-name": name,
            "controller-revision-hash": f"{meta['name']}-{revision}",
            "apps.kubernetes.io/pod-index": str(ordinal),
        })
        spec["hostname"] = name
        spec["subdomain"] = owner["spec"].get("serviceName", "")
        claims = [
            {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name(t["metadata"]["name"], meta["name"], int(ordinal or 0))}}
            for t in owner["spec"].get("volumeClaimTemplates") or ()
        ]
        taken = {v["name"] for v in claims}
        spec["volumes"] = [v for v in spec.get("volumes") or () if v["name"] not in taken] + claims
    elif kind == "Job":
        for k in ("job-name", "batch.kubernetes.io/job-name"):
            labels[k] = meta["name"]
        for k in ("controller-uid", "batch.kubernetes.io/controller-uid"):
            labels[k] = meta["uid"]
        if index is not None:
            labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
            if index_failures is not None:
                annotations[FAILURES_KEY] = str(index_failures)
            ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}
            for c in spec.get("containers") or ():
                c["env"] = [*(c.get("env") or ()), {"name": "JOB_COMPLETION_INDEX", "valueFrom": ref}]
    spec.setdefault("restartPolicy", "Always")
    spec["nodeName"] = "local"
    pod_meta: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels,
        "ownerReferences": [_owner(owner)],
    }
    if annotations:
        pod_meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}


def pvc_manifest(sts: Mapping[str, Any], template: Mapping[str, Any], ordinal: int) -> dict[str, Any]:
    """The PersistentVolumeClaim of one StatefulSet ordinal; owned by the StatefulSet when its
    ``persistentVolumeClaimRetentionPolicy.whenDeleted`` is Delete (then the garbage collector
    removes it with the StatefulSet), else left behind (Retain, the default)."""
    meta = sts["metadata"]
    tname = template["metadata"]["name"]
    pvc_meta: dict[str, Any] = {
        "name": claim_name(tname, meta["name"], ordinal),
        "namespace": meta["namespace"],
        "labels": dict(template["metadata"].get("labels") or {}),
    }
    policy = sts["spec"].get("persistentVolumeClaimRetentionPolicy") or {}
    if policy.get("whenDeleted") == "Delete":
        pvc_meta["ownerReferences"] = [{**_owner(sts), "controller": True}]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": pvc_meta,
        "spec": copy.deepcopy(dict(template.get("spec") or {})),
    }


@dataclass(frozen=True)
class ContainerRun:
    """What the kubelet knows of the pod's (single) container at one moment."""

    name: str
    image: str
    running: bool
    ready: bool
    started: bool  # the startup probe passed (or there is none)
    restarts: int
    started_at: str = ""  # RFC 3339
    waiting: str = ""  # reason: ContainerCreating, CrashLoopBackOff, CreateContainerConfigError
    message: str = ""
    exit_code: int | None = None  # of the last termination
    finished_at: str = ""
    pid: int | None = None


def pod_status(phase: str, ip: str, host_ip: str, start_time: str, c: ContainerRun) -> dict[str, Any]:
    """The status the kubelet writes: phase, addresses, the four conditions and the
    container's state (running / waiting / terminated) with its last termination."""
    state: dict[str, Any]
    if c.running:
        state = {"running": {"startedAt": c.started_at}}
    elif phase in ("Succeeded", "Failed"):
        state = {"terminated": {"exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error", "finishedAt": c.finished_at}}
    else:
        state = {"waiting": {"reason": c.waiting or "ContainerCreating", **({"message": c.message} if c.message else {})}}
    cs: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restarts,
        "state": state,
    }
    if c.pid is not None:
        cs["containerID"] = f"process://{c.pid}"
    if c.exit_code is not None and "terminated" not in state:
        cs["lastState"] = {"terminated": {"exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error", "finishedAt": c.finished_at}}
    ready = str(c.ready)
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": host_ip,
        "startTime": start_time,
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "containerStatuses": [cs],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return status


def cron_job_manifest(cronjob: Mapping[str, Any], scheduled_minute: int, scheduled_iso: str) -> dict[str, Any]:
    """The Job a CronJob starts for the minute ``scheduled_minute`` (since the epoch, the
    controller's name suffix): its jobTemplate, owned by the CronJob."""
    meta, tmpl = cronjob["metadata"], cronjob["spec"]["jobTemplate"]
    tmeta = tmpl.get("metadata") or {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{meta['name']}-{scheduled_minute}",
            "namespace": meta["namespace"],
            "labels": dict(tmeta.get("labels") or {}),
            "annotations": {**(tmeta.get("annotations") or {}), "batch.kubernetes.io/cronjob-scheduled-timestamp": scheduled_iso},
            "ownerReferences": [_owner(cronjob)],
        },
        "spec": copy.deepcopy(dict(tmpl.get("spec") or {})),
    }
