"""A sharded index's reconcile carries out every shard's actions even when one shard's
writer fails: a create that timed out on shard 0 (a loaded node) must not hold shard 1's
create back until a later pass (found on the local cluster: the index stayed Pending)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("kopf")

from index_operator.controller import Controller, OperatorConfig
from index_operator.runtime_client import MISSING
from tests.unit.test_model_configmaps import RecordingKube, _index, _models


class SlowShard0:
    """Every writer lacks the index; shard 0's create times out, the others' succeed."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def status(self, url: str, index: str, token: str) -> dict[str, Any] | None:
        return MISSING if "-writer." in url else None

    async def create_index(self, base: str, *args: Any) -> dict[str, Any]:
        if "-s0-" in base:
            raise TimeoutError
        self.created.append(base)
        return {}

    async def close(self) -> None:
        return None


def test_one_shards_failed_create_does_not_stop_the_others() -> None:
    ctl = Controller(OperatorConfig())
    ctl.kube = RecordingKube()  # type: ignore[assignment]
    runtime = SlowShard0()
    ctl.runtime = runtime  # type: ignore[assignment]
    body = _index("docs", "minilm")
    body["spec"]["shards"] = 3
    with pytest.raises(TimeoutError):  # the pass still fails (retried at the interval)
        asyncio.run(ctl.reconcile_index(body, _models(minilm="local:minilm"), "", ""))
    assert sorted(runtime.created) == [
        "http://docs-s1-writer.search.svc:8080",
        "http://docs-s2-writer.search.svc:8080",
    ]
