"""The controller carrying out its plans' actions against writers that fail: a sharded
index's reconcile carries out every shard's actions even when one shard's writer fails (a
create that timed out on shard 0, a loaded node, must not hold shard 1's create back until a
later pass: found on the local cluster, the index stayed Pending); a migration action the
writer refuses because the migration moved on (409) waits for the next pass."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("kopf")

from index_operator.controller import Controller, OperatorConfig
from index_operator.reconcile.migration import MAct, MAction
from index_operator.runtime_client import MISSING, RuntimeError_
from index_operator.spec import Index
from tests.unit.test_model_configmaps import RecordingKube, _index, _models
from tests.unit.test_operator_reconcile import MIG


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


class EndedMeanwhile:
    """A writer whose migration ended (cut over, or Failed) after the operator read it: a
    rollback, a cutover and a resume are refused with a 409; anything else is a fault."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.asked: list[str] = []

    async def admin(self, base: str, token: str, index: str, path: str, body: Any) -> Any:
        self.asked.append(path)
        raise RuntimeError_(self.status, "Conflict", "no migration to roll back")


@pytest.mark.parametrize("act", [MAct.ROLLBACK, MAct.CUTOVER, MAct.RESUME])
def test_a_migration_action_refused_because_the_migration_moved_on_waits_for_the_next_pass(
    act: MAct,
) -> None:
    ctl = Controller(OperatorConfig())
    mig, ix = MIG, Index.parse(_index("docs", "minilm"))
    status: dict[str, Any] = {"phase": "Backfilling"}
    for code, fails in ((409, False), (500, True)):
        ctl.runtime = runtime = EndedMeanwhile(code)  # type: ignore[assignment]
        run = ctl._migration_actions(mig, ix, None, [MAction(act)], status, 1.0, "t")
        if fails:
            with pytest.raises(RuntimeError_):
                asyncio.run(run)
        else:
            asyncio.run(run)  # the next pass reads where the migration went
        assert len(runtime.asked) == 1
