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
    config_name,
    container_security,
    dns_name,
    metadata,
    pod_identity,
    pod_options,
    pod_security,
    storage_env,
    threads_env,
    tmp_volume,
)
from index_operator.resources.placement import Placement
from index_operator.resources.workloads import ENCODERS_KEY
from index_operator.spec import (
    JOB_POD,
    POLL_JOB_POD,
    Index,
    Migration,
    Model,
    PodOptions,
    Ref,
    Resources,
)
from index_runtime import contract
from index_runtime.contract import Env, ExitCode, JobKind, Role, Scope


def job_name(owner: str, kind: JobKind, seq: int | None = None) -> str:
    """``owner``: the index, a shard's stem (``Placement.stem``) or a migration."""
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
    at: Placement | None = None,
) -> dict[str, Any]:
    """``pods``: a migration's pod options (over the index's); ``at``: the shard whose writer
    the Job drives, or whose prefix it purges (None: the unsharded index)."""
    at = at if at is not None else Placement(ix.ref.name)
    vol, mount = tmp_volume()
    env: list[dict[str, Any]] = [
        {"name": Env.INDEX.value, "value": ix.ref.name},
        {"name": Env.JOB_SPEC.value, "value": json.dumps(dict(spec), sort_keys=True)},
        *threads_env(job_resources(kind)),
    ]
    if kind is JobKind.PURGE:
        env += storage_env(ix, at.prefix(ix.storage.prefix))
    else:
        env += [
            {"name": Env.WRITER_URL.value, "value": at.url(ix.ref.namespace, Role.WRITER)},
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
    return {"metadata": {"labels": at.labels(f"job-{kind.value}")}, "spec": pod}


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
    at: Placement | None = None,
) -> dict[str, Any]:
    """A Job of ``kind`` for index ``ix`` (its shard ``at``), owned by ``owner`` (the index or
    a migration, whose ``pods`` options then apply over the index's)."""
    pod = _job_pod(ix, cl, kind, spec or {}, [], [], pods, at)
    meta = metadata(name, owner, f"job-{kind.value}", ix.ref.name)
    meta["labels"].update(pod["metadata"]["labels"])
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": _job_spec(pod, cl)}


def desired_gate_job(
    ix: Index, mig: Migration, cl: Cluster, target: Model | None = None
) -> dict[str, Any]:
    """The migration gate (sample pairs, fit adapters, measure, decide) in the writer; the
    request carries the migration's id and the target model's metric and dimension. A sharded
    index's gate Job drives its router (``<index>-writer`` selects the router pods), which
    starts the migration on every shard; its backfill is internal (``Migration.gate_request``)."""
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
    request = mig.gate_request(target, sharded=ix.shards > 1)
    pod = _job_pod(ix, cl, JobKind.MIGRATE, request, volumes, mounts, mig.pods)
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


def backfill_job_name(mig: Migration, seq: int = 0) -> str:
    """The ``seq``-th backfill Job of a migration (0: the first, named as before sequence
    numbers existed, so a migration started by an older operator keeps its Job)."""
    return job_name(mig.ref.name, JobKind.BACKFILL, seq or None)


def desired_backfill_job(
    ix: Index, mig: Migration, cl: Cluster, seq: int = 0, target: Model | None = None
) -> dict[str, Any]:
    """The distributed backfill: an Indexed Job of ``spec.backfill.parallelism`` pods. Pod
    ``JOB_COMPLETION_INDEX`` re-encodes share i of ``DRIFTLESS_BACKFILL_SHARES`` (rows by key
    hash) with the target model and hands the vectors to the writer, which rewrites them with
    a compare-and-set and records each share's cursor, so a restarted pod resumes.

    Liveness is by progress, not by the clock: no ``activeDeadlineSeconds`` (a 10^8-row
    backfill takes days); a pod that makes no progress for ``DRIFTLESS_BACKFILL_STALL_S``
    exits non-zero and its index is retried (``backoffLimitPerIndex``); the operator replaces
    a failed Job (``seq`` + 1) while the record still progresses. Resources, GPUs included,
    come from ``spec.backfill.resources``."""
    name = backfill_job_name(mig, seq)
    n = mig.backfill_parallelism
    # a worker reads and rewrites at most 1,000 rows per call (the rows endpoint's limit)
    spec: dict[str, Any] = {"batch": min(mig.backfill_batch, 1000)}
    if mig.backfill_rate > 0:  # each pod's cap (absent: none, as before)
        spec["rate"] = mig.backfill_rate
    job = desired_job(ix, cl, JobKind.BACKFILL, name, mig.ref, spec, mig.pods)
    job["metadata"]["labels"]["app.kubernetes.io/component"] = "job-backfill"
    jspec = job["spec"]
    jspec.pop("activeDeadlineSeconds", None)
    jspec.pop("backoffLimit", None)  # per index instead (a Job-wide count would end all shares)
    jspec.update(
        {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            # a share that failed for good ends nothing else (no maxFailedIndexes: the other
            # shares run to their end, then the Job is Failed and the operator replaces it)
            "backoffLimitPerIndex": 6,
        }
    )
    c = jspec["template"]["spec"]["containers"][0]
    c["resources"] = mig.backfill_resources.to_k8s()
    threads = {e["name"]: e for e in threads_env(mig.backfill_resources)}  # the encoder's
    c["env"] = [threads.get(e["name"], e) for e in c["env"]]
    c["env"] += [
        {"name": Env.BACKFILL_SHARES.value, "value": str(n)},
        {"name": Env.MIGRATION_ID.value, "value": mig.uid},
        {"name": Env.BACKFILL_STALL_S.value, "value": str(mig.backfill_stall_s)},
        {
            "name": Env.ENCODERS.value,  # the worker encodes with the target model itself
            "valueFrom": {
                "configMapKeyRef": {"name": config_name(ix.ref.name), "key": ENCODERS_KEY}
            },
        },
    ]
    if target is not None and not target.encoder.startswith(("http://", "https://")):
        c["image"] = cl.jobs_image  # a bundled model: torch and the packages
    return job


def desired_compaction_cronjob(
    ix: Index, cl: Cluster, suspend: bool = False, at: Placement | None = None
) -> dict[str, Any]:
    """The scheduled compaction (of shard ``at``); ``suspend`` while a migration's cutover is
    near (see ``reconcile.index.maintenance_held``)."""
    at = at if at is not None else Placement(ix.ref.name)
    job = desired_job(ix, cl, JobKind.COMPACT, "unused", ix.ref, at=at)
    spec = job["spec"]
    spec.pop("ttlSecondsAfterFinished")
    name = dns_name(at.stem, "compact", limit=52)  # CronJob names leave room for the suffix
    meta = metadata(name, ix.ref, "job-compact", ix.ref.name)
    meta["labels"].update(at.shard_labels())
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": ix.compaction_schedule,
            "suspend": suspend,
            "concurrencyPolicy": "Forbid",  # one compaction at a time (the writer serializes anyway)
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": at.labels("job-compact")},
                "spec": spec,
            },
        },
    }
