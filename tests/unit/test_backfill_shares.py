"""The distributed backfill's pure parts: the share of a key, page selection over one view's
arrays, the stored cursor, and the worker loop against a scripted client (no server)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from index_runtime.backfill_worker import NotActive, WorkerConfig, run_worker
from index_runtime.contract import ExitCode, record_id, share_of
from index_runtime.jobs import JobError
from index_runtime.service.backfill import Desk, select_page, share_array, stored_cursor


def test_share_of_is_pinned_and_canonical() -> None:
    # pinned values: workers and writers of different versions must agree on every share
    assert [share_of(k, 1000) for k in ["k1", "doc-42", "é", 7, -3, 2**40]] == [
        33, 210, 326, 346, 214, 833
    ]
    assert share_of(np.int64(7), 1000) == share_of(7, 1000) == share_of("7", 1000)
    with pytest.raises(TypeError):
        share_of(True, 4)
    with pytest.raises(ValueError):
        share_of("k", 0)


def _view(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Seqs (unique, not in position order, like base + delta), a todo mask, keys."""
    rng = np.random.default_rng(seed)
    seqs = rng.permutation(np.arange(1, 3 * n))[:n].astype(np.int64)
    todo = rng.random(n) < 0.7
    keys: list[Any] = [f"k{i}" if i % 2 else i for i in range(n)]
    return seqs, todo, keys


def _drain(
    seqs: np.ndarray, todo: np.ndarray, at: np.ndarray, share: int, limit: int, after: int = 0
) -> tuple[list[int], list[int]]:
    """Every page of a share: (positions in order, cursors)."""
    out: list[int] = []
    cursors: list[int] = []
    while True:
        page = select_page(seqs, todo, at, share, after, limit)
        out += page.positions.tolist()
        assert after <= page.cursor  # the cursor never goes back
        after = page.cursor
        cursors.append(page.cursor)
        if page.done:
            return out, cursors


@pytest.mark.parametrize("shares", [1, 2, 3, 5])
def test_shares_are_disjoint_and_cover_every_todo_row_once(shares: int) -> None:
    seqs, todo, keys = _view(500, shares)
    at = share_array(keys, shares)
    seen: list[int] = []
    for share in range(shares):
        pos, _ = _drain(seqs, todo, at, share, limit=7)
        assert all(at[p] == share for p in pos)
        assert list(seqs[pos]) == sorted(seqs[pos])  # ascending seq within a share
        seen += pos
    assert sorted(seen) == np.flatnonzero(todo).tolist()  # each todo row exactly once


def test_a_cursor_resumes_where_the_pages_stopped() -> None:
    seqs, todo, keys = _view(300, 9)
    at = share_array(keys, 2)
    whole, cursors = _drain(seqs, todo, at, 1, limit=10)
    first_two = select_page(seqs, todo, at, 1, 0, 20)
    rest, _ = _drain(seqs, todo, at, 1, limit=10, after=first_two.cursor)
    assert first_two.positions.tolist() + rest == whole
    assert first_two.cursor == cursors[1]


def test_rows_rewritten_or_deleted_meanwhile_leave_the_todo_set() -> None:
    """Between two pages the backfill rewrote some rows (new seq, new-model vector) and a user
    deleted others: the next page neither repeats nor includes them."""
    seqs, todo, keys = _view(200, 4)
    at = share_array(keys, 1)
    page = select_page(seqs, todo, at, 0, 0, 15)
    later = todo.copy()
    later[page.positions] = False  # rewritten: they have the new vector now
    gone = select_page(seqs, later, at, 0, page.cursor, 5).positions
    later[gone] = False  # deleted before they were read
    nxt = select_page(seqs, later, at, 0, page.cursor, 1000)
    assert not set(nxt.positions.tolist()) & (set(page.positions.tolist()) | set(gone.tolist()))
    assert nxt.done and all(seqs[nxt.positions] > page.cursor)


def test_a_cursor_past_every_row_left_starts_the_share_again() -> None:
    """A cursor ahead of rows still to do (a restore brought old rows back; a client sent a
    cursor past what it read) must not end the share: the page wraps to the lowest seq."""
    seqs, todo, keys = _view(60, 2)
    at = share_array(keys, 2)
    page = select_page(seqs, todo, at, 1, int(seqs.max()) + 10**9, 5)
    mine = np.flatnonzero(todo & (at == 1))
    assert len(page.positions) == min(5, len(mine)) and not page.done
    assert set(page.positions.tolist()) <= set(mine.tolist())
    assert page.cursor == int(seqs[page.positions[-1]])


def test_an_empty_share_is_done_at_once() -> None:
    seqs, _, keys = _view(50, 2)
    page = select_page(seqs, np.zeros(50, bool), share_array(keys, 3), 2, 0, 10)
    assert page.done and page.cursor == 0 and not len(page.positions)


def test_stored_cursor_prefers_memory_then_the_record_of_the_same_split() -> None:
    desk = Desk()
    rec = {
        "id": "m1",
        "options": {"backfill_mode": "external", "backfill_shares": 2},
        "backfill": {"workers": {"1": {"cursor": 40, "rows": 7, "at": 1.0}}},
    }
    assert stored_cursor(desk, rec, "m1", 1, 2) == 40  # a restarted writer: the checkpoint
    assert stored_cursor(desk, rec, "m1", 1, 3) == 0  # another split: from the start
    assert stored_cursor(desk, rec, "m2", 1, 2) == 0  # another migration
    desk.reset_if_other("m1", 2)
    desk.workers["1"] = {"cursor": 90, "rows": 5}
    assert stored_cursor(desk, rec, "m1", 1, 2) == 90  # the writer's memory is newer


def test_record_id_names_legacy_records_stably() -> None:
    assert record_id({"id": "uid-1", "to": "b"}) == "uid-1"
    old = {"to": "b", "started_at": 12.5}
    assert record_id(old) == record_id(dict(old)) != record_id({"to": "b", "started_at": 13.0})


# the worker loop ---------------------------------------------------------------------------------


class Script:
    """A writer with ``n`` rows in one share, failing as told."""

    def __init__(self, n: int, fail_writes: int = 0, fail_all: bool = False) -> None:
        self.todo = list(range(1, n + 1))
        self.fail_writes, self.fail_all = fail_writes, fail_all
        self.phase = "Bridged"
        self.afters: list[int | None] = []

    def record(self) -> dict[str, Any]:
        if self.fail_all:
            raise JobError(ExitCode.FAILED, "connection refused")
        return {"id": "m", "to": "new", "phase": self.phase}

    def rows(self, mid: str, share: int, shares: int, after: int | None, limit: int) -> dict[str, Any]:
        if self.phase != "Bridged":
            raise NotActive("rolled back")
        self.afters.append(after)
        left = [s for s in self.todo if s > (after or 0)]
        page = left[:limit]
        return {
            "rows": [{"key": f"k{s}", "seq": s, "text": f"t{s}"} for s in page],
            "cursor": page[-1] if page else (after or 0),
            "done": len(left) <= limit,
        }

    def write(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail_writes:
            self.fail_writes -= 1
            raise JobError(ExitCode.FAILED, "HTTP 500")
        seqs = {r["seq"] for r in body["rows"]}
        self.todo = [s for s in self.todo if s not in seqs]
        return {"written": len(seqs), "skipped": 0}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_worker_retries_a_failed_write_without_encoding_again() -> None:
    w, clock, encoded = Script(25, fail_writes=3), Clock(), []

    def enc(texts: list[str]) -> np.ndarray:
        encoded.extend(texts)
        return np.ones((len(texts), 4), np.float32)

    res = run_worker(w, lambda m: enc, WorkerConfig(0, 1, batch=10), clock, clock.sleep)
    assert res.code is ExitCode.OK and res.written == 25 and not w.todo
    assert len(encoded) == 25  # each text once, though three writes failed
    assert clock.t == 0.5 + 1.0 + 2.0  # backoff after each failure, no pause after a success
    assert w.afters[0] is None  # the first page asks for the writer's stored cursor


def test_worker_exits_zero_when_the_migration_moved_on() -> None:
    w, clock = Script(10), Clock()
    w.phase = "RolledBack"
    res = run_worker(w, lambda m: lambda t: np.ones((len(t), 4)), WorkerConfig(0, 1), clock, clock.sleep)
    assert res.code is ExitCode.OK and "moved on" in res.message


def test_worker_without_progress_exits_non_zero_after_the_stall_limit() -> None:
    w, clock = Script(10, fail_all=True), Clock()
    res = run_worker(
        w, lambda m: lambda t: np.ones((len(t), 4)), WorkerConfig(0, 1, stall_s=120), clock, clock.sleep
    )
    assert res.code is ExitCode.FAILED and "no progress for 120 s" in res.message
    assert 120 < clock.t <= 120 + 30  # backoff is capped: it gives up soon after the limit


def test_a_slow_but_progressing_worker_is_never_stalled() -> None:
    """Each batch takes longer than half the stall limit, the whole share far longer than it:
    progress resets the clock (no wall-clock deadline)."""
    w, clock = Script(100), Clock()

    def slow(texts: list[str]) -> np.ndarray:
        clock.t += 70
        return np.ones((len(texts), 4), np.float32)

    res = run_worker(w, lambda m: slow, WorkerConfig(0, 1, batch=10, stall_s=100), clock, clock.sleep)
    assert res.code is ExitCode.OK and res.written == 100 and clock.t >= 700


def test_the_backfill_job_with_shares_runs_the_worker_and_checks_its_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from index_runtime.contract import Env, JobKind
    from index_runtime.jobs import run_job

    env = {
        Env.WRITER_URL: "http://127.0.0.1:9",
        Env.ADMIN_TOKEN: "t" * 16,
        Env.INDEX: "docs",
        Env.BACKFILL_SHARES: "2",
        Env.JOB_COMPLETION_INDEX: "2",  # beyond the shares: a configuration error, no retry
    }
    assert run_job(JobKind.BACKFILL, env) == ExitCode.INVALID
    assert "share (2) < shares (2)" in capsys.readouterr().out


def test_the_backfill_rate_is_a_cap_that_counts_the_encoders_time() -> None:
    from index_runtime.migration import pace_s

    assert pace_s(32, 0.0, 0.1) == 0.0  # no rate: as fast as the encoder goes
    assert pace_s(32, 4.0, 0.0) == 8.0  # an instant encoder waits out the batch's 8 s
    assert pace_s(32, 4.0, 6.0) == 2.0  # 6 s of encoding counts toward them
    # an encoder slower than the cap (E5 at ~5 rows/s on the campaign's shared host) is not
    # slowed further; the old sleep after every batch doubled that backfill at rate 2.5
    assert pace_s(32, 2.5, 13.0) == 0.0


@pytest.mark.parametrize(
    ("encode_s", "want_sleeps", "want_t"),
    [(0.0, [2.0, 2.0], 4.0), (1.5, [0.5, 0.5], 5.5), (3.0, [], 9.0)],
)
def test_the_worker_paces_to_the_rate_counting_the_encoders_time(
    encode_s: float, want_sleeps: list[float], want_t: float
) -> None:
    """spec.backfill.rate reaches the Job's pods (it was read only by the runtime's own
    one-process backfill: a user's cap did nothing with backfill pods). 25 rows in pages of
    10 at 5 rows/s: 2 s a full page, the encoder's time counted; no pause after the last."""
    w, clock, sleeps = Script(25), Clock(), []

    def enc(texts: list[str]) -> np.ndarray:
        clock.t += encode_s
        return np.ones((len(texts), 4), np.float32)

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.sleep(s)

    res = run_worker(w, lambda m: enc, WorkerConfig(0, 1, batch=10, rate=5.0), clock, sleep)
    assert res.code is ExitCode.OK and res.written == 25 and not w.todo
    assert sleeps == pytest.approx(want_sleeps) and clock.t == pytest.approx(want_t)
