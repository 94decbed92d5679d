"""Observe -> decide -> act for each custom resource (the I/O around the pure planners).

Each ``reconcile_*`` reads what it needs (children, Jobs, the runtime's status over HTTP),
calls the pure planner (``reconcile.index.plan_index``, ``reconcile.migration.plan_migration``)
and carries out its actions. It returns the status to write and the events to post; the kopf
handlers write them. Actions come first: if one fails, the handler retries and the status is
not advanced past what really happened.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from index_operator import resources as res
from index_operator.cache import ChildCache
from index_operator.kube import UNKNOWN, Kube, KubeError, namespace_terminating
from index_operator.metrics import OperatorMetrics
from index_operator.reconcile.conditions import Condition, merge_conditions
from index_operator.reconcile.index import (
    Act,
    Action,
    Event,
    IndexObservation,
    maintenance_held,
    plan_index,
)
from index_operator.reconcile.jobs import JobState, job_state
from index_operator.reconcile.migration import (
    TERMINAL,
    MAct,
    MAction,
    MigrationObservation,
    cutover_refused,
    plan_migration,
)
from index_operator.reconcile.shards import combine_shards, shard_prior
from index_operator.resources.common import config_name
from index_operator.resources.placement import Placement, name_conflicts, placements, router_name
from index_operator.resources.workloads import ENCODERS_KEY
from index_operator.runtime_client import MISSING, RuntimeClient, RuntimeError_
from index_operator.spec import Index, Migration, Model, PodOptions, SpecError
from index_runtime.contract import JobKind, MigrationRecord, Role, Scope
from index_runtime.errors import InvalidInputError
from index_runtime.index.settings import IndexSettings

log = logging.getLogger(__name__)


@dataclass
class OperatorConfig:
    cluster: res.Cluster = field(default_factory=res.Cluster)
    interval_s: float = 10.0
    # every runtime Service resolves to this URL (tests: one runtime on loopback); empty = DNS
    runtime_url: str = ""
    # the monitoring.coreos.com API exists: watch ServiceMonitors (and prune them once
    # cluster.monitoring is turned off) even when none are built
    monitoring_api: bool = False

    @staticmethod
    def from_env(env: Mapping[str, str] = os.environ) -> OperatorConfig:
        cl = res.Cluster(
            runtime_image=env.get("DRIFTLESS_RUNTIME_IMAGE", res.Cluster.runtime_image),
            jobs_image=env.get("DRIFTLESS_JOBS_IMAGE", res.Cluster.jobs_image),
            pull_policy=env.get("DRIFTLESS_IMAGE_PULL_POLICY", res.Cluster.pull_policy),
            monitoring=env.get("DRIFTLESS_SERVICE_MONITORS", "false") == "true",
            monitor_labels=_labels(env.get("DRIFTLESS_SERVICE_MONITOR_LABELS")),
            network_policy=network_policy_from_env(env),
            pod_defaults=PodOptions.parse(json.loads(env.get("DRIFTLESS_POD_DEFAULTS") or "{}")),
        )
        return OperatorConfig(
            cl,
            float(env.get("DRIFTLESS_OPERATOR_INTERVAL", "10")),
            env.get("DRIFTLESS_RUNTIME_URL", ""),
            env.get("DRIFTLESS_MONITORING_API", "false") == "true",
        )

    def watched_kinds(self) -> tuple[str, ...]:
        """The children the watch cache holds: every kind the operator builds or prunes."""
        kinds = ["ConfigMap", "Secret", "Service", "StatefulSet", "Deployment", "Job", "CronJob"]
        kinds.append("PodDisruptionBudget")
        if self.cluster.network_policy is not None:
            kinds.append("NetworkPolicy")
        if self.cluster.monitoring or self.monitoring_api:
            kinds.append("ServiceMonitor")
        return tuple(kinds)


def _labels(raw: str | None) -> dict[str, str]:
    """A JSON object of label names to values (the chart's monitoring.serviceMonitorLabels)."""
    value = json.loads(raw) if raw else {}
    if not isinstance(value, dict):
        raise ValueError(f"DRIFTLESS_SERVICE_MONITOR_LABELS must be a JSON object, got {raw!r}")
    return {str(k): str(v) for k, v in value.items()}


def network_policy_from_env(env: Mapping[str, str]) -> res.NetworkPolicyConfig | None:
    """The chart's ``runtimeNetworkPolicy`` values, as its Deployment passes them: on/off, the
    operator's own namespace and pod labels, and the client and Prometheus peers (JSON lists
    of NetworkPolicyPeers; unset: the defaults of ``NetworkPolicyConfig``)."""
    if env.get("DRIFTLESS_NETWORK_POLICIES", "false") != "true":
        return None
    default = res.NetworkPolicyConfig()

    def peers(name: str, fallback: Any) -> tuple[dict[str, Any], ...]:
        raw = env.get(name)
        value = json.loads(raw) if raw else list(fallback)
        if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
            raise ValueError(f"{name} must be a JSON list of NetworkPolicyPeers, got {raw!r}")
        return tuple(value)

    labels = json.loads(env.get("DRIFTLESS_OPERATOR_POD_LABELS") or "{}")
    return res.NetworkPolicyConfig(
        operator_namespace=env.get("DRIFTLESS_OPERATOR_NAMESPACE", ""),
        operator_labels={str(k): str(v) for k, v in labels.items()},
        clients=peers("DRIFTLESS_NETWORK_POLICY_CLIENTS", default.clients),
        metrics=peers("DRIFTLESS_NETWORK_POLICY_METRICS", default.metrics),
    )


def secret_data(secret: Mapping[str, Any] | None) -> dict[str, str]:
    """A Secret's values as text (``data`` is base64; servers that keep ``stringData`` as
    sent, like the test emulator, are read too)."""
    sec = secret or {}
    out = {str(k): str(v) for k, v in (sec.get("stringData") or {}).items()}
    for k, v in (sec.get("data") or {}).items():
        out[str(k)] = base64.b64decode(v).decode()
    return out


class Controller:
    """What the handlers share: the API clients, the config, tokens not yet stored."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.metrics = OperatorMetrics()
        self.kube = Kube(on_request=self.metrics.request)
        self.runtime = RuntimeClient()
        self.cache: ChildCache | None = None  # started by start_cache once logged in
        # Jobs this process created that the cache has not shown yet: their absence there
        # is not news (a GET decides), anyone else's absence is
        self._unseen_jobs: set[tuple[str, str]] = set()
        # tokens drawn for an index whose Secret is not stored yet: a migration's reconcile
        # and the index's own must not draw different ones before the Secret is applied
        self._fresh: dict[tuple[str, str], dict[Scope, str]] = {}

    def start_cache(self, namespaces: Sequence[str]) -> None:
        """Watch the children (``namespaces`` empty: cluster-wide); idempotent."""
        if self.cache is None:
            self.cache = ChildCache(
                self.kube,
                self.config.watched_kinds(),
                tuple(namespaces),
                on_restart=lambda kind: self.metrics.watch_restarts.labels(kind).inc(),
            )
        self.cache.start()

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.stop()
        await self.kube.close()
        await self.runtime.close()

    async def wait_cache(self, timeout_s: float = 30.0) -> None:
        """Before a reconcile reads children: the watch cache has listed them (at start)."""
        if self.cache is not None:
            await self.cache.wait_synced(timeout_s)

    def cached(self, kind: str, namespace: str, name: str) -> Any:
        """The child as the watch cache knows it (None: absent); ``UNKNOWN`` without a cache
        (then it is read with a GET). Children are never read with a GET next to a cache
        (the chart grants no ``get`` on them): a kind whose watch is relisting raises
        ``CacheNotSynced`` and kopf retries the pass."""
        if self.cache is None:
            return UNKNOWN
        known, obj = self.cache.store.lookup(kind, namespace, name)
        if not known:
            raise CacheNotSynced(f"the watch cache of {kind} in {namespace!r} is (re)listing")
        return obj

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret or Job: from the cache when it holds it, else a GET (a tokens Secret its
        owner brought has none of our labels; a Job this process just created may not be
        seen yet). A Job absent from a synced cache and not just created is absent."""
        known, obj = (
            (False, None) if self.cache is None else self.cache.store.lookup(kind, namespace, name)
        )
        if known and obj is not None:
            self._unseen_jobs.discard((namespace, name))
            return dict(obj)
        if known and kind == "Job" and (namespace, name) not in self._unseen_jobs:
            return None
        return await self.kube.get(kind, namespace, name)

    async def create_job(self, job: Mapping[str, Any]) -> bool:
        meta = job["metadata"]
        self._unseen_jobs.add((meta["namespace"], meta["name"]))
        return await self.kube.create(job)

    def url(self, index: str, namespace: str, role: Role) -> str:
        return self.config.runtime_url or res.service_url(index, namespace, role)

    def shard_url(self, at: Placement, namespace: str, role: Role) -> str:
        return self.config.runtime_url or at.url(namespace, role)

    def conflicts(self, ix: Index, objs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Desired objects another VectorIndex already owns (``placement.name_conflicts``);
        none known without a watch cache."""
        if self.cache is None:
            return []
        ns = ix.ref.namespace
        return name_conflicts(objs, lambda kind, n: self.cached(kind, ns, n), ix.ref.name)

    async def tokens(self, namespace: str, index: str) -> res.Tokens:
        """The index's tokens: from ``<index>-tokens`` (read on every reconcile, so deleting
        it rotates them), else new ones (applied with the Secrets by the index's reconcile)."""
        key = (namespace, index)
        name = res.tokens_secret_name(index)
        stored = secret_data(await self.read("Secret", namespace, name))
        legacy = None
        if not stored and not await self.read(
            "Secret", namespace, res.hashes_secret_name(index)
        ):  # never had per-scope tokens: an upgrade keeps the old admin token
            old = await self.read("Secret", namespace, res.legacy_admin_secret_name(index))
            legacy = secret_data(old).get("token")
        if key not in self._fresh:
            self._fresh[key] = {s: secrets.token_urlsafe(32) for s in Scope}
        tokens = res.plan_tokens(stored, legacy, self._fresh[key])
        if all(stored.get(s.value) for s in Scope):
            self._fresh.pop(key, None)
        return tokens

    async def job_states(self, namespace: str, names: Mapping[str, str]) -> dict[str, JobState]:
        return {k: job_state(await self.read("Job", namespace, n)) for k, n in names.items()}

    # VectorIndex ---------------------------------------------------------------------------

    def _kept_models(
        self, record: MigrationRecord | None, writer: Any, ns: str, name: str
    ) -> tuple[str, ...]:
        """Models whose encoders the index keeps beyond its own and a running migration's: both
        of a migration that ended keeping them merged (every write and text query encodes
        with both); while the writer cannot be read, the ones its ConfigMap has now (a
        ConfigMap change rolls the pods, so nothing is dropped on a missing status). A sharded
        index passes its shards' writers (a list): any one unread keeps the ConfigMap's."""
        if record is not None and record.kept_merged:
            return (record.from_model, record.to_model)
        writers = writer if isinstance(writer, list) else [writer]
        if all(isinstance(w, Mapping) for w in writers):
            return ()
        cm = self.cached("ConfigMap", ns, config_name(name))
        data = (cm.get("data") or {}) if isinstance(cm, Mapping) else {}
        try:
            return tuple(json.loads(data.get(ENCODERS_KEY) or "{}"))
        except ValueError:
            return ()

    async def reconcile_index(
        self,
        body: Mapping[str, Any],
        models: Mapping[str, Model],
        migrating: str,
        migration_target: str = "",
    ) -> tuple[dict[str, Any], list[Event]]:
        """``migrating``: the running ModelMigration of the index, ``migration_target``: its
        target model (its encoder joins the index's ConfigMap while it runs)."""
        prior = dict(body.get("status") or {})
        try:
            ix = Index.parse(body)
        except (KeyError, SpecError) as exc:
            return _invalid(body, prior, f"invalid spec: {exc}"), []
        model = models.get(ix.model)
        served = str(prior.get("model") or ix.model)
        if model is None:
            return _invalid(body, prior, f"no EmbeddingModel {ix.model!r}", "ModelNotFound"), []
        dim_model = models.get(served, model)
        try:
            desired = IndexSettings.from_json(ix.settings, dim_model.dimension).to_json()
        except InvalidInputError as exc:
            return _invalid(body, prior, str(exc)), []
        ns, name = ix.ref.namespace, ix.ref.name
        await self.wait_cache()
        tokens = await self.tokens(ns, name)
        if ix.shards > 1:
            return await self._reconcile_sharded(
                body, ix, model, models, desired, tokens, migrating, migration_target
            )
        token = tokens[Scope.ADMIN]
        cl = self.config.cluster
        writer = await self.runtime.status(self.url(name, ns, Role.WRITER), name, token)
        record = MigrationRecord.from_json(((writer or {}).get("migration") or {}).get("record"))
        kept = self._kept_models(record, writer, ns, name)
        encoders = res.index_encoders(
            models,
            (
                ix.model,
                *res.serving_models([writer], "" if kept else served),
                migration_target,
                *kept,
            ),
        )
        mphase = record.phase if record is not None and record.active else ""
        objs = [
            *res.desired_objects(ix, cl, encoders, tokens),
            res.desired_compaction_cronjob(ix, cl, suspend=bool(maintenance_held(mphase))),
        ]
        if clash := self.conflicts(ix, objs):
            return _invalid(body, prior, _clash_message(clash), "NameConflict"), []
        for obj in objs:
            meta = obj["metadata"]
            await self.kube.apply(obj, self.cached(obj["kind"], ns, meta["name"]))
        await self.prune(ix, objs)
        shadow = await self.runtime.status(self.url(name, ns, Role.SHADOW), name, token)
        job_names = {
            k: str(v.get("name"))
            for k, v in (prior.get("jobs") or {}).items()
            if v.get("state") not in FINISHED  # a finished Job's state cannot change
        }
        jobs = {
            k: JobState(str(v["state"]))
            for k, v in (prior.get("jobs") or {}).items()
            if v.get("state") in FINISHED
        }
        obs = IndexObservation(
            now=time.time(),
            writer=writer if writer is not MISSING else {},
            exists=writer is not MISSING,
            shadow=shadow or None,
            jobs={**jobs, **await self.job_states(ns, job_names)},
            prior=prior,
            migrating=migrating,
            migration_phase=mphase,
        )
        plan = plan_index(ix, obs, desired)
        status = plan.status
        try:
            await self._carry_out(
                ix,
                Placement(name),
                model,
                desired,
                token,
                plan.actions,
                status.setdefault("jobs", {}),
            )
        except _Refused as why:
            if why.spec:  # the runtime refused the spec: say so, keep data
                return _invalid(body, status, why.message), list(plan.events)
            return prior, []  # nothing happened: the next pass retries
        return status, list(plan.events)

    async def _carry_out(
        self,
        ix: Index,
        at: Placement,
        model: Model,
        desired: Mapping[str, Any],
        token: str,
        actions: Sequence[Action],
        jobs: dict[str, Any],
    ) -> None:
        """The plan's actions against one shard's writer (the index's when unsharded); Jobs
        started are recorded in ``jobs``. Raises ``_Refused`` when the runtime refuses the
        spec (400, 422) or the operator's token (401, 403)."""
        ns, name = ix.ref.namespace, ix.ref.name
        cl = self.config.cluster
        base = self.shard_url(at, ns, Role.WRITER)
        for a in actions:
            try:
                if a.act is Act.CREATE_INDEX:
                    await self.runtime.create_index(
                        base,
                        token,
                        name,
                        model.name,
                        model.dimension,
                        model.metric,
                        ix.key_type,
                        desired,
                    )
                elif a.act is Act.UPDATE_SETTINGS:
                    await self.runtime.admin(base, token, name, "settings", desired, method="PUT")
                elif a.act is Act.PROMOTE:
                    await self.runtime.admin(base, token, name, "promote", {})
                elif a.act is Act.DISCARD:
                    await self.runtime.admin(base, token, name, "discard")
                elif a.act is Act.START_JOB and a.job is not None:
                    jname = res.job_name(at.stem, a.job, a.seq)
                    await self.create_job(res.desired_job(ix, cl, a.job, jname, ix.ref, {}, at=at))
                    jobs[a.job.value] = {
                        "seq": a.seq,
                        "name": jname,
                        "state": JobState.ACTIVE.value,
                    }
            except RuntimeError_ as exc:
                if exc.status in (400, 422):
                    where = f" (shard {at.shard})" if at.sharded else ""
                    raise _Refused(
                        True, f"the runtime refused {a.act.value}{where}: {exc}"
                    ) from exc
                if exc.status in REFUSED_TOKEN:
                    _token_refused(ns, name, a.act.value, exc)
                    raise _Refused(False, str(exc)) from exc
                raise

    async def _reconcile_sharded(
        self,
        body: Mapping[str, Any],
        ix: Index,
        model: Model,
        models: Mapping[str, Model],
        desired: Mapping[str, Any],
        tokens: res.Tokens,
        migrating: str = "",
        migration_target: str = "",
    ) -> tuple[dict[str, Any], list[Event]]:
        """A sharded index: the objects of every shard and the router; each shard planned as an
        unsharded index over its own writer and shadow (its prior: its ``status.shards``
        entry), its actions carried out against its writer; the status combined. A running
        migration's target joins the index's ConfigMap (every shard's pods mount it), and each
        shard holds its maintenance in its own cutover window (its writer's record)."""
        prior = dict(body.get("status") or {})
        ns, name = ix.ref.namespace, ix.ref.name
        token = tokens[Scope.ADMIN]
        cl = self.config.cluster
        served = str(prior.get("model") or ix.model)
        ats = placements(name, ix.shards)
        writers = list(
            await asyncio.gather(
                *(
                    self.runtime.status(self.shard_url(at, ns, Role.WRITER), name, token)
                    for at in ats
                )
            )
        )
        records = [
            MigrationRecord.from_json(((w or {}).get("migration") or {}).get("record"))
            for w in writers
        ]
        mphases = [r.phase if r is not None and r.active else "" for r in records]
        kept = [m for r in records for m in self._kept_models(r, writers, ns, name)]
        encoders = res.index_encoders(
            models,
            (ix.model, *res.serving_models(writers, "" if kept else served), migration_target, *kept),
        )
        objs = [
            *res.desired_objects(ix, cl, encoders, tokens),
            *(
                res.desired_compaction_cronjob(ix, cl, bool(maintenance_held(mp)), at)
                for at, mp in zip(ats, mphases, strict=True)
            ),
        ]
        if clash := self.conflicts(ix, objs):
            return _invalid(body, prior, _clash_message(clash), "NameConflict"), []
        for obj in objs:
            meta = obj["metadata"]
            await self.kube.apply(obj, self.cached(obj["kind"], ns, meta["name"]))
        await self.prune(ix, objs)
        now = time.time()
        plans = []
        for at, writer, mphase in zip(ats, writers, mphases, strict=True):
            before = shard_prior(prior, at.shard)
            shadow = await self.runtime.status(self.shard_url(at, ns, Role.SHADOW), name, token)
            job_names = {
                k: str(v.get("name"))
                for k, v in (before.get("jobs") or {}).items()
                if v.get("state") not in FINISHED
            }
            jobs = {
                k: JobState(str(v["state"]))
                for k, v in (before.get("jobs") or {}).items()
                if v.get("state") in FINISHED
            }
            obs = IndexObservation(
                now=now,
                writer=writer if writer is not MISSING else {},
                exists=writer is not MISSING,
                shadow=shadow or None,
                jobs={**jobs, **await self.job_states(ns, job_names)},
                prior=before,
                migrating=migrating,
                migration_phase=mphase,
            )
            plans.append(plan_index(ix, obs, desired))
        combined = combine_shards(ix, plans, prior, now, migrating)
        status = combined.status
        # every shard's actions at once, each to the end: one shard's writer timing out (its
        # index created on a loaded node took over the client's 10 s) held the next shard's
        # create back until a later pass, and the index in Pending for minutes
        outcomes = await asyncio.gather(
            *(
                self._carry_out(
                    ix, at, model, desired, token, plan.actions, status["shards"][at.shard]["jobs"]
                )
                for at, plan in zip(ats, plans, strict=True)
            ),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, _Refused)]
        for why in refused:
            if why.spec:
                return _invalid(body, status, why.message), list(combined.events)
        if refused:
            return prior, []
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o
        return status, list(combined.events)

    async def prune(self, ix: Index, desired: Sequence[Mapping[str, Any]]) -> None:
        """Delete the index's children that left the desired set (a PDB once readers < 2, a
        ServiceMonitor once monitoring is off); only kinds the cache has synced."""
        if self.cache is None:
            return
        ns = ix.ref.namespace
        store = self.cache.store
        for kind, name in res.stale_children(
            store.children(ns, ix.ref.uid),
            {(o["kind"], o["metadata"]["name"]) for o in desired},
            store.kinds_known(ns),
        ):
            await self.kube.delete(kind, ns, name)
            self.metrics.pruned.labels(kind).inc()
            log.info("pruned %s %s/%s: no longer desired", kind, ns, name)

    async def finalize_index(self, body: Mapping[str, Any]) -> tuple[str, list[Event]]:
        """Deleting a VectorIndex with reclaim policy Delete (only those carry the finalizer):
        stop its pods, purge the stored data with a Job. Returns '' when done, else what is
        awaited. In a namespace being deleted the Job is refused (and the Secret with the
        storage credentials goes with the namespace): the finalizer is released with a
        Warning naming the data left behind (``purge_refused``): the operator holds no
        storage credentials of its own, and the index's may already be gone."""
        ix = Index.parse(body)
        ns, name = ix.ref.namespace, ix.ref.name
        ats = placements(name, ix.shards)
        if ix.shards > 1:
            await self.kube.delete("Deployment", ns, router_name(name))
        for at in ats:
            for kind, role in (
                ("StatefulSet", Role.WRITER),
                ("Deployment", Role.READER),
                ("Deployment", Role.SHADOW),
            ):
                await self.kube.delete(kind, ns, at.service(role))
        if ix.storage.reclaim != "Delete":
            return "", []
        waiting = []
        for at in ats:  # one purge Job per shard, each over its shard's prefix
            jname = res.job_name(at.stem, JobKind.PURGE)
            job = await self.kube.get("Job", ns, jname)
            if job is None:
                try:
                    await self.kube.create(
                        res.desired_job(
                            ix, self.config.cluster, JobKind.PURGE, jname, ix.ref, at=at
                        )
                    )
                except KubeError as exc:
                    if not namespace_terminating(exc):
                        raise
                    self.metrics.purges_skipped.inc()
                    why = purge_refused(ix)
                    log.warning("VectorIndex %s/%s: %s", ns, name, why)
                    return "", [Event("Warning", "PurgeSkipped", why)]
                waiting.append(f"purge Job {jname} created")
                continue
            state = job_state(job)
            if state is not JobState.SUCCEEDED:
                waiting.append(f"purge Job {jname} is {state.value}")
        return "; ".join(waiting), []

    # ModelMigration ------------------------------------------------------------------------

    async def reconcile_migration(
        self, body: Mapping[str, Any], models: Mapping[str, Model], busy: str
    ) -> tuple[dict[str, Any], list[Event]]:
        prior = dict(body.get("status") or {})
        mig = Migration.parse(body)
        ns = mig.ref.namespace
        if prior.get("phase") in TERMINAL:
            return prior, []
        ix_body = await self.kube.get("VectorIndex", ns, mig.index)
        writer = None
        ix = None
        token = ""
        if ix_body is not None:
            ix = Index.parse(ix_body)
        if ix is not None:
            # a sharded index's writer Service selects its router: the status carries one
            # record for the index merged from the shards' (shard_migration.merge_records)
            token = (await self.tokens(ns, mig.index))[Scope.ADMIN]
            writer = await self.runtime.status(
                self.url(mig.index, ns, Role.WRITER), mig.index, token
            )
        rec = MigrationRecord.from_json(((writer or {}).get("migration") or {}).get("record"))
        seq = int((prior.get("backfillJob") or {}).get("seq", 0))
        names = {
            "gate": res.job_name(mig.ref.name, JobKind.MIGRATE),
            "backfill": res.backfill_job_name(mig, seq),
        }
        jobs = await self.job_states(ns, names)
        obs = MigrationObservation(
            now=time.time(),
            record=rec,
            reachable=bool(writer),
            index_exists=ix_body is not None,
            target_exists=mig.target in models,
            from_model=str((writer or {}).get("model", "")),
            busy=busy,
            gate_job=jobs["gate"],
            backfill_job=jobs["backfill"],
            prior=prior,
            shards=ix.shards if ix is not None else 1,
        )
        plan = plan_migration(mig, obs)
        status = plan.status
        if ix is None:
            return status, list(plan.events)
        events = list(plan.events)
        actions = list(plan.actions)
        gate = [a for a in actions if a.act is MAct.START_JOB and a.job is JobKind.MIGRATE]
        if gate and (waiting := await self._awaiting_encoder(ix, mig, writer, token)):
            actions = [a for a in actions if a not in gate]  # the next pass starts it
            status["reason"] = "WaitingForEncoder"
            status["message"] = (
                f"waiting for the {waiting} of {mig.index!r} to restart with the encoder of "
                f"{mig.target!r} (the index's ConfigMap gained it)"
            )
        try:
            held = await self._migration_actions(
                mig, ix, models.get(mig.target), actions, status, obs.now, token
            )
        except RuntimeError_ as exc:
            if exc.status not in REFUSED_TOKEN:
                raise
            _token_refused(ns, mig.index, "a migration step", exc)
            return prior, []  # nothing happened: the next pass retries
        if held is not None:  # the runtime held the cutover: say that, not "CuttingOver"
            events = [e for e in events if "-> CuttingOver" not in e.message]
            if prior.get("phase") != "Backfilled":
                events.append(held)
        return status, events

    async def _awaiting_encoder(self, ix: Index, mig: Migration, writer: Any, token: str) -> str:
        """Whose writer does not run the target's encoder yet ('' = none: the gate may start).
        A sharded index's router reports no encoders of its own: every shard's writer is
        asked (each runs the gate on its own rows)."""
        if ix.shards == 1:
            return "writer" if res.awaits_encoder(writer, mig.target) else ""
        ns = mig.ref.namespace
        ats = placements(mig.index, ix.shards)
        writers = await asyncio.gather(
            *(
                self.runtime.status(self.shard_url(at, ns, Role.WRITER), mig.index, token)
                for at in ats
            )
        )
        late = [
            at.shard
            for at, w in zip(ats, writers, strict=True)
            if res.awaits_encoder(w, mig.target)
        ]
        return f"writers of shards {', '.join(map(str, late))}" if late else ""

    async def _migration_actions(
        self,
        mig: Migration,
        ix: Index,
        target: Model | None,
        actions: Sequence[MAction],
        status: dict[str, Any],
        now: float,
        token: str,
    ) -> Event | None:
        """Carry out the plan's actions; a cutover the runtime holds (409) rewrites the status
        to Backfilled with its reason and returns the event to post instead."""
        ns = mig.ref.namespace
        base = self.url(mig.index, ns, Role.WRITER)
        cl = self.config.cluster
        held = None
        for a in actions:
            if a.act is MAct.START_JOB and a.job is JobKind.MIGRATE:
                await self.create_job(res.desired_gate_job(ix, mig, cl, target))
            elif a.act is MAct.START_JOB and a.job is JobKind.BACKFILL:
                await self.create_job(res.desired_backfill_job(ix, mig, cl, a.seq, target))
            elif a.act is MAct.RESUME:
                try:
                    await self.runtime.admin(
                        base, token, mig.index, "migrations/backfill", {"id": mig.uid}
                    )
                except RuntimeError_ as exc:
                    if exc.status != 409:  # nothing to resume (it moved on): the next pass sees
                        raise
            elif a.act is MAct.ROLLBACK:
                try:
                    await self.runtime.admin(
                        base, token, mig.index, "migrations/rollback", {"id": mig.uid}
                    )
                except RuntimeError_ as exc:
                    if exc.status != 409:  # it ended meanwhile (a cutover, Failed): the next
                        raise  # pass reads the record's end
            elif a.act is MAct.CUTOVER:
                try:
                    await self.runtime.admin(
                        base,
                        token,
                        mig.index,
                        "migrations/cutover",
                        {"id": mig.uid, "force": a.force},
                    )
                except RuntimeError_ as exc:
                    if exc.status != 409:
                        raise
                    why, msg = cutover_refused(exc.message)
                    status.update({"phase": "Backfilled", "reason": why, "message": msg})
                    status["conditions"] = merge_conditions(
                        status.get("conditions"),
                        [
                            Condition("CutoverHeld", True, why, msg),
                            Condition("Progressing", False, why, msg),
                        ],
                        mig.ref.generation,
                        now,
                    )
                    held = Event("Normal", why, f"the cutover is held: {msg}")
        return held


REFUSED_TOKEN = (401, 403)


class _Refused(Exception):
    """The runtime refused an action: the spec (``spec``: 400/422) or the operator's token."""

    def __init__(self, spec: bool, message: str) -> None:
        super().__init__(message)
        self.spec = spec
        self.message = message


def _clash_message(clash: Sequence[str]) -> str:
    return (
        f"names this index needs belong to another VectorIndex: {', '.join(clash[:5])}"
        f"{' …' if len(clash) > 5 else ''}; nothing was applied (a sharded index X names its "
        "shards' objects X-s<i>-…: rename one of the two indexes)"
    )


class CacheNotSynced(Exception):
    """A child's kind is not in the watch cache right now (its watch is relisting)."""


FINISHED = (JobState.SUCCEEDED.value, JobState.FAILED.value)


def purge_refused(ix: Index) -> str:
    """What a VectorIndex released without its purge left behind, for the Warning and log."""
    st = ix.storage
    where = ", ".join(
        f"s3://{st.bucket}/{path}/"
        for at in placements(ix.ref.name, ix.shards)
        if (path := "/".join(p for p in (at.prefix(st.prefix).strip("/"), ix.ref.name) if p))
    )
    return (
        f"namespace {ix.ref.namespace} is being deleted: the purge Job was refused, the "
        f"finalizer is released without purging; the index's data is left at {where}"
        f"{' (endpoint ' + st.endpoint + ')' if st.endpoint else ''}: delete it by hand"
    )


def _token_refused(namespace: str, index: str, what: str, exc: RuntimeError_) -> None:
    """New tokens (rotation) reach the operator at once and the pods when they have rolled:
    until then the old pods refuse the operator's calls. Not an error worth kopf's backoff."""
    log.warning(
        "the runtime of %s/%s refused the operator's token for %s (%s); pods not yet rolled "
        "onto the current tokens? retrying on the next pass",
        namespace,
        index,
        what,
        exc,
    )


def _invalid(
    body: Mapping[str, Any], prior: Mapping[str, Any], message: str, reason: str = "InvalidSpec"
) -> dict[str, Any]:
    gen = int((body.get("metadata") or {}).get("generation") or 1)
    return {
        **{k: v for k, v in prior.items() if k != "conditions"},
        "observedGeneration": gen,
        "phase": prior.get("phase") or "Pending",
        "reason": reason,
        "message": message,
        "conditions": merge_conditions(
            prior.get("conditions"), [Condition("Ready", False, reason, message)], gen, time.time()
        ),
    }
