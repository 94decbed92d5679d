"""Finalizers only where deletion has work to do, a purge refused in a namespace being
deleted, and the operator's own metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

kopf = pytest.importorskip("kopf")

from index_operator import handlers  # noqa: E402
from index_operator.controller import Controller, OperatorConfig, purge_refused  # noqa: E402
from index_operator.kube import KubeError, namespace_terminating  # noqa: E402
from index_operator.spec import Index  # noqa: E402


def body(reclaim: str = "Delete", prefix: str = "indexes") -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": "docs", "namespace": "search", "uid": "u-1", "generation": 1},
        "spec": {
            "modelRef": {"name": "minilm"},
            "storage": {"bucket": "b", "prefix": prefix, "reclaimPolicy": reclaim},
        },
    }


def test_kopf_timers_need_finalizers_unless_we_say_otherwise() -> None:
    """kopf marks every timer as needing a finalizer (deletes and namespace deletion then wait
    for the operator); ours are re-registered without. Fails if kopf changes either."""
    reg = kopf.OperatorRegistry()

    @kopf.timer("driftless.dev", "v1alpha1", "vectorindexes", interval=10, registry=reg)
    def tick(**_: Any) -> None: ...

    assert [h.requires_finalizer for h in reg._spawning.get_all_handlers()] == [True]
    handlers.timers_without_finalizers(reg, 0.25)
    (h,) = reg._spawning.get_all_handlers()
    assert not h.requires_finalizer and h.interval == 0.25
    # a failed pass keeps kopf's backoff (see timers_without_finalizers: orphaned timers)
    assert h.backoff is None  # kopf's default, 60 s
    assert all(not h.requires_finalizer for h in handlers.registry._spawning.get_all_handlers())


def test_only_an_index_that_purges_gets_a_finalizer() -> None:
    needing = [h for h in handlers.registry._changing.get_all_handlers() if h.requires_finalizer]
    assert [h.id for h in needing] == ["index_deleted"]
    (h,) = needing
    assert h.when is not None
    assert h.when(spec=kopf.Spec(body("Delete"))) is True  # type: ignore[call-arg]
    assert h.when(spec=kopf.Spec(body("Retain"))) is False  # type: ignore[call-arg]


TERMINATING = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
        "message": 'jobs.batch "docs-purge" is forbidden: unable to create new content in '
        "namespace search because it is being terminated",
        "details": {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]},
    }
)
RBAC = json.dumps({"kind": "Status", "reason": "Forbidden", "code": 403, "message": "no"})


def test_namespace_terminating_is_told_from_other_refusals() -> None:
    assert namespace_terminating(KubeError(403, TERMINATING))
    assert not namespace_terminating(KubeError(403, RBAC))  # missing RBAC: an error
    assert not namespace_terminating(KubeError(409, TERMINATING))
    assert KubeError(403, "not json").causes == ()


class FakeKube:
    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.deleted: list[str] = []

    async def delete(self, kind: str, ns: str, name: str) -> bool:
        self.deleted.append(name)
        return True

    async def get(self, kind: str, ns: str, name: str) -> None:
        return None

    async def create(self, obj: dict[str, Any]) -> bool:
        raise KubeError(403, self.refuse)


@pytest.mark.asyncio
async def test_a_purge_refused_in_a_terminating_namespace_releases_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctl = Controller(OperatorConfig())
    ctl.kube = FakeKube(TERMINATING)  # type: ignore[assignment]
    waiting, events = await ctl.finalize_index(body())
    assert waiting == ""  # the finalizer goes
    assert [(e.type, e.reason) for e in events] == [("Warning", "PurgeSkipped")]
    assert "s3://b/indexes/docs/" in events[0].message and "s3://b/indexes/docs/" in caplog.text
    assert ctl.kube.deleted == ["docs-writer", "docs-reader", "docs-shadow"]  # type: ignore[attr-defined]
    assert ctl.metrics.purges_skipped._value.get() == 1
    ctl.kube = FakeKube(RBAC)  # type: ignore[assignment]
    with pytest.raises(KubeError):  # any other refusal keeps the finalizer (kopf retries)
        await ctl.finalize_index(body())


def test_the_prefix_left_behind_is_where_the_runtime_stores_the_index() -> None:
    assert "s3://b/docs/" in purge_refused(Index.parse(body(prefix="")))
    assert "s3://b/a/b/docs/" in purge_refused(Index.parse(body(prefix="/a/b/")))


def test_operator_metrics_count_outcomes_and_pass_promtool(tmp_path: Path) -> None:
    ctl = Controller(OperatorConfig())
    with ctl.metrics.reconcile("VectorIndex"):
        pass
    with pytest.raises(RuntimeError), ctl.metrics.reconcile("VectorIndex"):
        raise RuntimeError("boom")
    ctl.kube.on_request("list", 200)
    ctl.metrics.pruned.labels("PodDisruptionBudget").inc()
    text = ctl.metrics.exposition().decode()
    for line in [
        'driftless_operator_reconciles_total{kind="VectorIndex",outcome="ok"} 1.0',
        'driftless_operator_reconciles_total{kind="VectorIndex",outcome="error"} 1.0',
        'driftless_operator_reconciles_total{kind="ModelMigration",outcome="error"} 0.0',
        'driftless_operator_reconcile_duration_seconds_count{kind="VectorIndex"} 2.0',
        'driftless_operator_api_requests_total{code="200",verb="list"} 1.0',
    ]:
        assert line in text, line
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
