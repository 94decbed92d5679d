"""The StatefulSet, Deployment and Job controllers of the local cluster (a mixin of
``Kubelet``): each step's decision is ``kubelet_controllers``' (pure); this module creates the
Pods and PVCs it asks for, terminates the ones it drops and writes the owners' status."""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Mapping
from typing import Any

from tests.cluster import kubelet_controllers as ctl
from tests.cluster.kubelet_cron import cron_plan
from tests.cluster.kubelet_pods import cron_job_manifest, pod_manifest, pvc_manifest
from tests.cluster.kubelet_state import PodState, api_path, pod_view
from tests.kube_harness import _now


class WorkloadControllers:
    """Needs from the Kubelet: ``_pods``, ``_claims``, ``_job_seen``, ``_job_done``,
    ``backoff_s``, ``_write``, ``_terminate``."""

    _pods: dict[tuple[str, str], PodState]
    _claims: set[tuple[str, str]]
    _job_seen: dict[tuple[str, str], float]
    _job_done: dict[tuple[str, str], float]
    backoff_s: tuple[float, float]

    async def _write(self, method: str, path: str, body: Any = None, quiet: bool = False) -> dict[str, Any] | None:
        raise NotImplementedError

    def _terminate(self, p: PodState) -> None:
        raise NotImplementedError

    def _owned(self, owner: Mapping[str, Any]) -> list[PodState]:
        uid = owner["metadata"]["uid"]
        return [p for p in self._pods.values() if p.owner_uid == uid]

    async def _create_pod(self, manifest: dict[str, Any]) -> None:
        ns = manifest["metadata"]["namespace"]
        obj = await self._write("POST", api_path("pods", ns), manifest)
        if obj is not None:
            self._pods[(ns, obj["metadata"]["name"])] = PodState.adopt(obj)

    async def _statefulset(self, sts: dict[str, Any]) -> None:
        meta, spec = sts["metadata"], sts["spec"]
        rev = ctl.template_hash(spec["template"])
        pods = self._owned(sts)
        step = ctl.statefulset_plan(spec, [pod_view(p) for p in pods], rev)
        for o in step.create:
            for t in spec.get("volumeClaimTemplates") or ():
                pvc = pvc_manifest(sts, t, o)
                key = (meta["namespace"], pvc["metadata"]["name"])
                if key not in self._claims:
                    self._claims.add(key)
                    await self._write("POST", api_path("persistentvolumeclaims", meta["namespace"]), pvc, quiet=True)
            await self._create_pod(pod_manifest(sts, spec["template"], f"{meta['name']}-{o}", revision=rev, ordinal=o))
        self._delete_named(pods, step.delete)
        status = ctl.statefulset_status(spec, int(meta.get("generation") or 1), [pod_view(p) for p in self._owned(sts)], rev, meta["name"])
        await self._status("statefulsets", sts, status)

    async def _deployment(self, d: dict[str, Any]) -> None:
        meta, spec = d["metadata"], d["spec"]
        rev = ctl.template_hash(spec["template"])
        pods = self._owned(d)
        step = ctl.deployment_plan(spec, [pod_view(p) for p in pods], rev)
        for _ in range(step.create):
            name = f"{meta['name']}-{rev}-{secrets.token_hex(3)[:5]}"
            await self._create_pod(pod_manifest(d, spec["template"], name, revision=rev))
        self._delete_named(pods, step.delete)
        status = ctl.deployment_status(spec, int(meta.get("generation") or 1), [pod_view(p) for p in self._owned(d)], rev)
        await self._status("deployments", d, status)

    def _delete_named(self, pods: list[PodState], names: tuple[str, ...]) -> None:
        for p in pods:
            if p.name in names and not p.deleting:
                self._terminate(p)

    async def _job(self, job: dict[str, Any]) -> None:
        meta, spec, st = job["metadata"], job["spec"], job.get("status") or {}
        key = (meta["namespace"], meta["name"])
        done = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in st.get("conditions") or ())
        now = time.monotonic()
        first = self._job_seen.setdefault(key, now)
        pods = self._owned(job)
        if done:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and now - self._job_done.setdefault(key, now) >= float(ttl):
                await self._write("DELETE", api_path("jobs", *key), quiet=True)
            return
        step = ctl.job_plan(spec, [pod_view(p) for p in pods], now, now - first, self.backoff_s)
        if not spec.get("suspend"):
            for index in step.start:
                base = f"{meta['name']}-{index}" if index is not None else meta["name"]
                name = f"{base}-{secrets.token_hex(3)[:5]}"
                failures = None
                if index is not None and spec.get("backoffLimitPerIndex") is not None:
                    failures = sum(  # the index's counted failures so far
                        p.index == index and p.phase == "Failed"
                        and ctl.failure_action(spec.get("podFailurePolicy"), pod_view(p).container, p.exit_code or 0) != "Ignore"
                        for p in pods
                    )
                await self._create_pod(pod_manifest(job, spec["template"], name, index=index, index_failures=failures))
        status = {**step.status, "startTime": st.get("startTime") or _now()}
        if step.terminal:
            if step.kill_active:
                self._delete_named(pods, tuple(p.name for p in pods if p.phase in ("Pending", "Running")))
            ts = _now()
            first_type = "SuccessCriteriaMet" if step.terminal == "Complete" else "FailureTarget"
            status["conditions"] = [
                {"type": t, "status": "True", "reason": step.reason, "lastTransitionTime": ts, "lastProbeTime": ts}
                for t in (first_type, step.terminal)
            ]
            if step.terminal == "Complete":
                status["completionTime"] = ts
            self._job_done[key] = now
        await self._status("jobs", job, status)

    async def _status(self, plural: str, obj: Mapping[str, Any], status: dict[str, Any]) -> None:
        """Patch the stored status where it differs from ``status`` (merge patch)."""
        stored = obj.get("status") or {}
        if all(stored.get(k) == v for k, v in status.items()):
            return
        meta = obj["metadata"]
        await self._write("PATCH", api_path(plural, meta["namespace"], meta["name"]) + "/status", {"status": status})

    async def _cronjob(self, cj: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        """Jobs from a CronJob's schedule (``kubelet_cron``), its status (lastScheduleTime,
        active) and the history limits."""
        meta, spec, st = cj["metadata"], cj["spec"], cj.get("status") or {}
        mine = [j for j in jobs if any(r.get("uid") == meta["uid"] for r in j["metadata"].get("ownerReferences") or ())]
        states = [(j["metadata"]["name"], _job_state(j), _time(j["metadata"].get("creationTimestamp"))) for j in mine]
        now = dt.datetime.now(dt.UTC)
        since = _time(st.get("lastScheduleTime") or meta.get("creationTimestamp"))
        try:
            step = cron_plan(spec, since, now, states)
        except ValueError as exc:  # a schedule the API server would have refused
            self._error(f"cronjob {meta['namespace']}/{meta['name']}: {exc}")
            return
        status: dict[str, Any] = {}
        if step.start is not None:
            iso = step.start.strftime("%Y-%m-%dT%H:%M:%SZ")
            job = cron_job_manifest(cj, int(step.start.timestamp() // 60), iso)
            if await self._write("POST", api_path("jobs", meta["namespace"]), job, quiet=True) is not None:
                states.append((job["metadata"]["name"], "Active", now))
            status["lastScheduleTime"] = iso
        for name in step.delete:
            await self._write("DELETE", api_path("jobs", meta["namespace"], name), quiet=True)
        status["active"] = [
            {"apiVersion": "batch/v1", "kind": "Job", "name": n, "namespace": meta["namespace"]}
            for n, s, _ in states if s == "Active"
        ]
        await self._status("cronjobs", cj, status)

    def _error(self, msg: str) -> None:
        raise NotImplementedError


def _job_state(job: Mapping[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or ():
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return "Succeeded" if c["type"] == "Complete" else "Failed"
    return "Active"


def _time(iso: str | None) -> dt.datetime:
    if not iso:
        return dt.datetime.now(dt.UTC)
    return dt.datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
