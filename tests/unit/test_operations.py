"""The operations registry (pure) and the Job side's polling and retries (no server)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from index_runtime.contract import ExitCode
from index_runtime.errors import ConflictError, NotFoundError
from index_runtime.jobs import Admin, JobError, wait_operation
from index_runtime.service.operations import Operations, WorkFailed


def test_one_running_operation_per_kind_and_a_second_start_joins_it() -> None:
    ticks = itertools.count(100)
    ops = Operations("docs", clock=lambda: float(next(ticks)))
    a, started = ops.begin("compact")
    assert started and a.state == "running" and len(a.id) == 32
    again, started = ops.begin("compact")
    assert again is a and not started  # joined, not doubled
    t, started = ops.begin("train")  # another kind runs alongside
    assert started and t.id != a.id
    ops.report(a, groups_done=1)
    ops.finish(a, {"input_segments": 3, "output_segments": 1})
    doc = ops.describe(a.id)
    assert doc["state"] == "succeeded" and doc["result"]["output_segments"] == 1
    assert doc["progress"] == {"groups_done": 1}
    assert doc["started_at"] < doc["updated_at"] <= doc["finished_at"]
    b, started = ops.begin("compact")  # the kind is free again
    assert started and b.id != a.id


def test_failures_keep_their_reason_and_finished_operations_are_final() -> None:
    ops = Operations("docs")
    a, _ = ops.begin("train")
    ops.fail(a, ConflictError("no rows"))
    ops.finish(a, {"late": True})  # a finished operation does not change again
    assert ops.describe(a.id)["error"] == {"reason": "Conflict", "message": "no rows"}
    assert ops.describe(a.id)["result"] is None
    m, _ = ops.begin("migration")
    ops.fail(m, WorkFailed("MigrationFailed", "no live rows have text"))
    assert ops.describe(m.id)["error"]["reason"] == "MigrationFailed"
    r, _ = ops.begin("compact")
    ops.fail(r, ValueError("boom"))
    assert ops.describe(r.id)["error"]["reason"] == "ValueError"


def test_history_is_bounded_but_running_operations_are_never_dropped() -> None:
    ops = Operations("docs", keep=2)
    running, _ = ops.begin("migration")
    ids = []
    for _ in range(5):
        op, _ = ops.begin("compact")
        ops.finish(op)
        ids.append(op.id)
    assert [o.id for o in ops.list()] == [ids[4], ids[3], running.id]  # newest first
    with pytest.raises(NotFoundError):
        ops.get(ids[0])
    assert ops.running("migration") is running
    with pytest.raises(ValueError):
        ops.begin("reindex")


def _op(state: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "compact", "state": state, "progress": {}, **extra}


def test_wait_operation_polls_until_done_and_reports_failures() -> None:
    answers = iter([_op("running"), _op("running"), _op("succeeded", result={"n": 1})])
    sleeps: list[float] = []
    assert wait_operation(lambda: next(answers), 2.0, 60, sleeps.append)["result"] == {"n": 1}
    assert sleeps == [2.0, 2.0]
    failed = _op("failed", error={"reason": "StorageFault", "message": "S3 down"})
    with pytest.raises(JobError, match="StorageFault: S3 down") as e:
        wait_operation(lambda: failed, 1.0, 60, sleeps.append)
    assert e.value.code is ExitCode.FAILED
    now = iter([0.0, 0.0, 50.0, 101.0])  # the whole wait is bounded by the Job's deadline
    with pytest.raises(JobError, match="still running after 100 s"):
        wait_operation(lambda: _op("running"), 1.0, 100, lambda s: None, lambda: next(now))


def test_admin_calls_retry_with_backoff_then_fail() -> None:
    sleeps: list[float] = []
    admin = Admin("http://127.0.0.1:9", "docs", "t", timeout_s=1, retries=3, sleep=sleeps.append)
    with pytest.raises(JobError) as e:
        admin.operation("abc")  # nobody listens on port 9
    assert e.value.code is ExitCode.FAILED and "/admin/operations/abc" in str(e.value)
    assert sleeps == [0.5, 1.0, 2.0]
