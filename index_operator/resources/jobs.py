"""Jobs and the compaction CronJob (PURE builders).

Names are deterministic: the same (owner, purpose, sequence number) always gives the same
name, so a replayed handler finds the Job it already created (409) instead of starting a
second one. Jobs are created once and never patched (their pod template is immutable).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from index_operator.resources.access import token_env
from index_operator.resources.common import (
    Cluster,
    container_security,
    dns_name,
    labels,
    metadata,
    pod_identity,
    pod_options,
    pod_security,
    service_url,
    storage_env,
    threads_env,
    tmp_volume,
)
from index_operator.spec import (
    JOB_POD,
    POLL_JOB_POD,
    Index,
    Migration,
    PodOptions,
    Ref,
    Resources,
)
from index_runtime import contract
from index_runtime.contract import Env, ExitCode, JobKind, Role, Scope


def job_name(owner: str, kind: JobKind, seq: int | None = None) -> str:
    return dns_name(owner, kind.value, "" if seq is None else str(seq))


def job_resources(kind: JobKind) -> Resources:
    """The purge deletes objects itself and the backfill may encode in its pod: they keep
    JOB_POD; the others only drive the writer's admin API and poll it."""
    return JOB_POD if kind in (JobKind.PURGE, JobKind.BACKFILL) else POLL_JOB_POD


def _job_pod(
    ix: Index,
    cl: Cluster,
    kind: JobKind,
    spec: Mapping[str, Any],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    pods: PodOptions | None = None,
) -> dict[str, Any]:
    """``pods``: a migration's pod options (over the index's)."""
    vol, mount = tmp_volume()
    env: list[dict[str, Any]] = [
        {"name": Env.INDEX.value, "value": ix.ref.name},
        {"name": Env.JOB_SPEC.value, "value": json.dumps(dict(spec), sort_keys=True)},
        *threads_env(job_resources(kind)),
    ]
    if kind is JobKind.PURGE:
        env += storage_env(ix)
    else:
        env += [
            {
                "name": Env.WRITER_URL.value,
                "value": service_url(ix.ref.name, ix.ref.namespace, Role.WRITER),
            },
            token_env(ix.ref.name, Scope.ADMIN, Env.ADMIN_TOKEN),  # it drives the admin API
        ]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (backoffLimit, podFailurePolicy)
        "securityContext": pod_security(),
        **pod_identity(ix),
        **pod_options(cl, *((pods,) if pods else ()), ix.pods),
        "containers": [
            {
                "name": kind.value,
                # the work runs in the writer (it encodes): a Job only drives its admin API
                "image": cl.runtime_image,
                "imagePullPolicy": cl.pull_policy,
                "command": contract.job_command(kind),
                "env": env,
                "resources": job_resources(kind).to_k8s(),
                "securityContext": container_security(),
                "volumeMounts": [mount, *mounts],
            }
        ],
        "volumes": [vol, *volumes],
    }
    return {"metadata": {"labels": labels(ix.ref.name, f"job-{kind.value}")}, "spec": pod}


def _job_spec(pod: dict[str, Any], cl: Cluster) -> dict[str, Any]:
    return {
        "backoffLimit": 3,
        "activeDeadlineSeconds": cl.job_deadline_s,
        "ttlSecondsAfterFinished": cl.job_ttl_s,
        # bad configuration cannot heal: fail the Job at once instead of retrying
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": pod["spec"]["containers"][0]["name"],
                        "operator": "In",
                        "values": [int(ExitCode.INVALID)],
                    },
                }
            ]
        },
        "template": pod,
    }


def desired_job(
    ix: Index,
    cl: Cluster,
    kind: JobKind,
    name: str,
    owner: Ref,
    spec: Mapping[str, Any] | None = None,
    pods: PodOptions | None = None,
) -> dict[str, Any]:
    """A Job of ``kind`` for index ``ix``, owned by ``owner`` (the index or a migration,
    whose ``pods`` options then apply over the index's)."""
    pod = _job_pod(ix, cl, kind, spec or {}, [], [], pods)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, owner, f"job-{kind.value}", ix.ref.name),
        "spec": _job_spec(pod, cl),
    }


def desired_gate_job(ix: Index, mig: Migration, cl: Cluster) -> dict[str, Any]:
    """The migration gate (sample pairs, fit adapters, measure, decide) in the writer."""
    volumes, mounts = [], []
    if mig.labelled_configmap:
        volumes.append(
            {
                "name": "labelled",
                "configMap": {
                    "name": mig.labelled_configmap,
                    "items": [{"key": mig.labelled_key, "path": contract.LABELLED_FILE}],
                },
            }
        )
        mounts.append({"name": "labelled", "mountPath": contract.LABELLED_DIR, "readOnly": True})
    pod = _job_pod(ix, cl, JobKind.MIGRATE, mig.gate_request(), volumes, mounts, mig.pods)
    if mig.labelled_configmap:
        path = f"{contract.LABELLED_DIR}/{contract.LABELLED_FILE}"
        pod["spec"]["containers"][0]["env"].append({"name": Env.LABELLED_FILE.value, "value": path})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            job_name(mig.ref.name, JobKind.MIGRATE), mig.ref, "job-migrate", ix.ref.name
        ),
        "spec": _job_spec(pod, cl),
    }


def desired_backfill_job(ix: Index, mig: Migration, cl: Cluster) -> dict[str, Any]:
    """The backfill as an Indexed Job. The writer re-encodes and rewrites rows with a
    compare-and-set and keeps its progress in the manifest, so a retried or re-created pod
    resumes where the last one stopped. One completion today: the rows are rewritten by the
    single writer (see docs/architecture.md for sharding the encoding across completions)."""
    job = desired_job(
        ix, cl, JobKind.BACKFILL, job_name(mig.ref.name, JobKind.BACKFILL), mig.ref, {}, mig.pods
    )
    job["metadata"]["labels"]["app.kubernetes.io/component"] = "job-backfill"
    job["spec"].update({"completionMode": "Indexed", "completions": 1, "parallelism": 1})
    return job


def desired_compaction_cronjob(ix: Index, cl: Cluster) -> dict[str, Any]:
    job = desired_job(ix, cl, JobKind.COMPACT, "unused", ix.ref)
    spec = job["spec"]
    spec.pop("ttlSecondsAfterFinished")
    name = dns_name(ix.ref.name, "compact", limit=52)  # CronJob names leave room for the suffix
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(name, ix.ref, "job-compact", ix.ref.name),
        "spec": {
            "schedule": ix.compaction_schedule,
            "concurrencyPolicy": "Forbid",  # one compaction at a time (the writer serializes anyway)
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels(ix.ref.name, "job-compact")},
                "spec": spec,
            },
        },
    }
