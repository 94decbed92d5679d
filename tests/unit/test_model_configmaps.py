"""Each index's ConfigMap holds only the models it uses: an EmbeddingModel change rolls only
the pods of the indexes that use that model, and a bundled model of another index does not
switch this index to the jobs (torch) image. Driven through ``Controller.reconcile_index``
with a recording API client, so what is checked is what the operator applies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from index_operator import resources as res
from index_operator.controller import Controller, OperatorConfig
from index_operator.resources.common import config_name
from index_operator.resources.workloads import ENCODERS_KEY
from index_operator.spec import Model
from index_runtime.contract import Role
from tests.unit.test_operator_reconcile import writer


class RecordingKube:
    """Stores what is applied; the Secrets read back so tokens stay the same between passes."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    async def apply(self, obj: Mapping[str, Any], live: Any = None) -> str:
        self.objects[(obj["kind"], obj["metadata"]["name"])] = json.loads(json.dumps(obj))
        return "applied"

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    async def create(self, obj: Mapping[str, Any]) -> bool:
        await self.apply(obj)
        return True


class NoRuntime:
    """The writer answers but has the index already (no create action)."""

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        return None

    async def close(self) -> None:
        return None


def _index(name: str, model: str) -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": name, "namespace": "search", "uid": f"u-{name}", "generation": 1},
        "spec": {"modelRef": {"name": model}, "storage": {"bucket": "bkt"}},
    }


def _models(**encoders: str) -> dict[str, Model]:
    return {n: Model(n, 384, "cosine", e) for n, e in encoders.items()}


def _pod_templates(
    ctl: Controller, body: dict[str, Any], models: dict[str, Model], target: str = ""
) -> dict[Any, Any]:
    kube: Any = ctl.kube
    asyncio.run(ctl.reconcile_index(body, models, "mig" if target else "", target))
    specs = {k: v.get("spec") or {} for k, v in kube.objects.items()}
    out: dict[Any, Any] = {k: s["template"] for k, s in specs.items() if "template" in s}
    out["config"] = kube.objects[("ConfigMap", config_name(body["metadata"]["name"]))]
    return out


def _controller() -> Controller:
    ctl = Controller(OperatorConfig())
    ctl.kube = RecordingKube()  # type: ignore[assignment]
    ctl.runtime = NoRuntime()  # type: ignore[assignment]
    return ctl


HTTP_A = "http://enc-a.search.svc:8080#a"
HTTP_B = "http://enc-b.search.svc:8080#b"


def test_changing_a_model_another_index_uses_leaves_this_index_untouched() -> None:
    ctl = _controller()
    b = _index("b", "model-b")
    before = _pod_templates(ctl, b, _models(**{"model-a": HTTP_A, "model-b": HTTP_B}))
    # index a's model is edited (a new endpoint) and a bundled model appears in the namespace
    changed = _models(**{"model-a": HTTP_A + "2", "model-b": HTTP_B, "e5": "e5-small-v2"})
    after = _pod_templates(ctl, b, changed)
    assert after == before  # no rollout of b's writer, readers or shadow
    assert json.loads(after["config"]["data"][ENCODERS_KEY]) == {"model-b": HTTP_B}
    images = {c["image"] for t in after.values() if "spec" in t for c in t["spec"]["containers"]}
    assert images == {ctl.config.cluster.runtime_image}  # not the torch image


def test_a_running_migration_adds_its_target_and_the_bundled_image_follows() -> None:
    ctl = _controller()
    b = _index("b", "model-b")
    models = _models(**{"model-b": HTTP_B, "e5": "e5-small-v2", "other": HTTP_A})
    during = _pod_templates(ctl, b, models, target="e5")
    assert json.loads(during["config"]["data"][ENCODERS_KEY]) == {
        "e5": "e5-small-v2",
        "model-b": HTTP_B,
    }
    writer = during[("StatefulSet", res.service_name("b", Role.WRITER))]
    assert writer["spec"]["containers"][0]["image"] == ctl.config.cluster.jobs_image


def test_the_running_migrations_target_is_the_oldest_unfinished_ones() -> None:
    """What the index timer passes as ``migration_target`` (kopf's index of migrations)."""
    from index_operator.handlers import _running_target, migration_targets

    def entry(name: str, created: str, target: str) -> Any:
        body: Any = type("B", (), {"metadata": {"name": name, "creationTimestamp": created}})
        spec = {"indexRef": {"name": "b"}, "targetModelRef": {"name": target}}
        return migration_targets(body, spec, "search")

    index: dict[Any, list[Any]] = {}
    for name, created, target in (("second", "2026-01-02", "e5"), ("first", "2026-01-01", "bge")):
        for key, value in entry(name, created, target).items():
            index.setdefault(key, []).append(value)
    kwargs = {"migration_targets": index}
    assert _running_target(kwargs, "search", "b") == "bge"
    assert _running_target(kwargs, "search", "other") == ""


class WriterStatus:
    """The writer's status as the runtime reports it, with the encoders it was started with."""

    def __init__(self, encoders: list[str]) -> None:
        self.encoders = encoders

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        return {"model": "model-b", "encoders": list(self.encoders)}

    async def close(self) -> None:
        return None


def test_the_gate_waits_until_the_writer_has_the_targets_encoder() -> None:
    """The target joins the index's ConfigMap when the migration appears and the writer rolls
    onto it: a gate started on the old writer would be refused (no encoder) and fail."""
    ctl = _controller()
    kube: Any = ctl.kube
    asyncio.run(kube.apply(_index("b", "model-b")))
    mig = {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "ModelMigration",
        "metadata": {"name": "to-e5", "namespace": "search", "uid": "m", "generation": 1},
        "spec": {"indexRef": {"name": "b"}, "targetModelRef": {"name": "e5"}},
    }
    models = _models(**{"model-b": HTTP_B, "e5": HTTP_A})
    runtime = WriterStatus(["model-b"])
    ctl.runtime = runtime  # type: ignore[assignment]
    status, _ = asyncio.run(ctl.reconcile_migration(mig, models, ""))
    assert status["reason"] == "WaitingForEncoder"
    assert not [k for k in kube.objects if k[0] == "Job"]
    runtime.encoders.append("e5")  # the writer restarted with the new ConfigMap
    status, _ = asyncio.run(ctl.reconcile_migration(mig, models, ""))
    assert status["reason"] != "WaitingForEncoder"
    assert [k for k in kube.objects if k[0] == "Job"] == [("Job", "to-e5-migrate")]


class MergedRuntime(NoRuntime):
    """The writer reports a migration that ended keeping both models merged."""

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        record = {"id": "m", "from": "model-b", "to": "e5", "phase": "Succeeded",
                  "cutover": {"reason": "KeptMerged", "merged": True}}  # fmt: skip
        return {"migration": {"record": record}}


def test_a_migration_that_ended_kept_merged_keeps_both_encoders() -> None:
    """No migration runs any more, but every write and text query still encodes with both
    models: the target's encoder stays in the ConfigMap (a plain cutover's would not)."""
    ctl = _controller()
    ctl.runtime = MergedRuntime()  # type: ignore[assignment]
    models = _models(**{"model-b": HTTP_B, "e5": "e5-small-v2", "other": HTTP_A})
    try:
        after = _pod_templates(ctl, _index("b", "model-b"), models)
    except KeyError:  # the partial writer status stops the status projection (after apply)
        after = {"config": ctl.kube.objects[("ConfigMap", config_name("b"))]}  # type: ignore[attr-defined]
    assert json.loads(after["config"]["data"][ENCODERS_KEY]) == {
        "e5": "e5-small-v2",
        "model-b": HTTP_B,
    }


class ShardWriters:
    """A sharded index: ``b-writer`` is its router (its status lists no encoders of its own),
    ``b-s<i>-writer`` its shards' writers, each with the encoders it was started with; the
    shards' records (one per shard) hold a cutover window on shard 1 only."""

    def __init__(self, encoders: list[list[str]]) -> None:
        self.encoders = encoders
        self.asked: list[str] = []

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        self.asked.append(url)
        for i, enc in enumerate(self.encoders):
            if f"//{index}-s{i}-writer." in url:
                phase = "Backfilled" if i == 1 else "Backfilling"
                rec = {"id": "m", "from": "model-b", "to": "e5", "phase": phase}
                st = writer(model="model-b")
                return {**st, "encoders": list(enc), "migration": {"record": rec}}
        if f"//{index}-writer." in url:  # the router
            return {"model": "model-b", "sharded": True}
        return None  # a shard's shadow: not answering

    async def admin(self, *args: Any, **kw: Any) -> Any:
        return {}

    async def close(self) -> None:
        return None


def _sharded(name: str, model: str, shards: int) -> dict[str, Any]:
    body = _index(name, model)
    body["spec"]["shards"] = shards
    return body


def test_a_sharded_index_gates_on_every_shards_writer_and_its_configmap_gains_the_target() -> None:
    """The router's status has no encoders: the gate Job waits until every shard's writer
    lists the target (each runs the gate on its rows); the index's one ConfigMap, mounted by
    every shard's pods, gains it; each shard's CronJob is suspended in its own cutover window."""
    ctl = _controller()
    kube: Any = ctl.kube
    b = _sharded("b", "model-b", 3)
    models = _models(**{"model-b": HTTP_B, "e5": HTTP_A})
    runtime = ShardWriters([["model-b", "e5"], ["model-b"], ["model-b", "e5"]])
    ctl.runtime = runtime  # type: ignore[assignment]
    asyncio.run(ctl.reconcile_index(b, models, "to-e5", "e5"))
    config = kube.objects[("ConfigMap", config_name("b"))]
    assert json.loads(config["data"][ENCODERS_KEY]) == {"e5": HTTP_A, "model-b": HTTP_B}
    suspended = [kube.objects[("CronJob", f"b-s{i}-compact")]["spec"]["suspend"] for i in range(3)]
    assert suspended == [False, True, False]

    asyncio.run(kube.apply(b))
    mig = {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "ModelMigration",
        "metadata": {"name": "to-e5", "namespace": "search", "uid": "m2", "generation": 1},
        "spec": {"indexRef": {"name": "b"}, "targetModelRef": {"name": "e5"}},
    }
    status, _ = asyncio.run(ctl.reconcile_migration(mig, models, ""))
    assert status["reason"] == "WaitingForEncoder" and "shards 1" in status["message"]
    assert not [k for k in kube.objects if k[0] == "Job"]
    runtime.encoders[1].append("e5")  # shard 1's writer restarted with the new ConfigMap
    status, _ = asyncio.run(ctl.reconcile_migration(mig, models, ""))
    assert status["reason"] == "GateJobCreated"
    assert [k for k in kube.objects if k[0] == "Job"] == [("Job", "to-e5-migrate")]
    assert runtime.asked[-4].startswith("http://b-writer.")  # the record: from the router


class CutOverRuntime(NoRuntime):
    """The writer serves the migration's target: it cut over (a plain cutover, no merge)."""

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        record = {"id": "m", "from": "model-b", "to": "e5", "phase": "Succeeded"}
        return {**writer(model="e5"), "migration": {"record": record}}

    async def admin(self, *args: Any, **kw: Any) -> Any:
        return {}


def test_a_migrations_end_rolls_nothing_while_the_status_still_names_the_old_model() -> None:
    """The pass after a migration's end: no migration runs any more (no target), and the
    index's status still names the old model (written by the pass before the cutover), but
    the writer serves the new one. The ConfigMap keeps both encoders, so the pod templates
    are those of the migration (the CI campaign's run: every pod rolled at Succeeded onto a
    ConfigMap without the new model, and back 17 s later)."""
    ctl = _controller()
    models = _models(**{"model-b": HTTP_B, "e5": HTTP_A})
    during = _pod_templates(ctl, _index("b", "model-b"), models, target="e5")
    ctl.runtime = CutOverRuntime()  # type: ignore[assignment]
    ended = _index("b", "model-b")
    ended["status"] = {"model": "model-b", "phase": "Serving"}
    after = _pod_templates(ctl, ended, models)
    assert json.loads(after["config"]["data"][ENCODERS_KEY]) == {"e5": HTTP_A, "model-b": HTTP_B}
    assert after == during  # no rollout


class KubeCache:
    """A watch cache that knows what the recording client holds (synced for every kind)."""

    def __init__(self, kube: RecordingKube) -> None:
        self.store, self.kube = self, kube

    def lookup(self, kind: str, namespace: str, name: str) -> tuple[bool, Any]:
        return True, self.kube.objects.get((kind, name))

    def children(self, namespace: str, uid: str) -> list[tuple[str, dict[str, Any]]]:
        return []

    def kinds_known(self, namespace: str) -> set[str]:
        return set()

    async def wait_synced(self, timeout_s: float) -> bool:
        return True


def test_an_unread_writer_keeps_the_configmap_as_it_is_not_the_lagging_status_model() -> None:
    """An operator restarted at a migration's end (e5 -> model-b): the ConfigMap already lost
    e5 (the old operator's last pass, the writer read), the writer rolls onto it (unread
    now), and the index's status still names e5. The ConfigMap stays as it is: adding the
    status's model rolled the rolling writer back onto e5, and the next pass, the writer
    read, rolled it once more (a rehearsal's campaign: the writer restarted three times in
    30 s)."""
    ctl = _controller()
    kube: Any = ctl.kube
    ctl.cache = KubeCache(kube)  # type: ignore[assignment]
    # the ConfigMap as the last pass applied it
    kube.objects[("ConfigMap", config_name("b"))] = {
        "kind": "ConfigMap",
        "metadata": {"name": config_name("b"), "namespace": "search"},
        "data": {ENCODERS_KEY: json.dumps({"model-b": HTTP_B})},
    }
    body = _index("b", "model-b")
    body["status"] = {"model": "e5", "phase": "Serving"}
    models = _models(**{"model-b": HTTP_B, "e5": HTTP_A})
    try:
        after = _pod_templates(ctl, body, models)
    except KeyError:  # no writer status: the status projection stops (after apply)
        after = {"config": kube.objects[("ConfigMap", config_name("b"))]}
    assert json.loads(after["config"]["data"][ENCODERS_KEY]) == {"model-b": HTTP_B}
