"""Compaction's background GC passes: coalesced, never two at a time, failures raised by close."""

from __future__ import annotations

import threading

import pytest

from index_runtime.store.passes import BackgroundPasses


class Pass:
    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.runs = 0
        self.running = 0
        self.max_running = 0
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.runs += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            n = self.runs
        self.started.release()
        try:
            assert self.gate.wait(30)
            if n == self.fail_at:
                raise OSError(f"pass {n} failed")
        finally:
            with self.lock:
                self.running -= 1


def test_requests_during_a_pass_coalesce_into_one_more_pass() -> None:
    p = Pass()
    p.gate.clear()
    with BackgroundPasses(p) as passes:
        passes.request()
        assert p.started.acquire(timeout=30)  # pass 1 is running (held at the gate)
        for _ in range(5):
            passes.request()
        p.gate.set()
        assert p.started.acquire(timeout=30)  # exactly one more pass starts
    assert p.runs == 2 and p.max_running == 1


def test_close_waits_for_the_pass_in_progress_and_drops_one_not_started() -> None:
    p = Pass()
    p.gate.clear()
    passes = BackgroundPasses(p)
    passes.request()
    assert p.started.acquire(timeout=30)
    passes.request()  # asked for while pass 1 runs: dropped by close
    closer = threading.Thread(target=passes.close)
    closer.start()
    with passes._cond:  # close() has told the thread to stop: now let pass 1 end
        assert passes._cond.wait_for(lambda: passes._stopping, 30)
    assert closer.is_alive()  # close() waits for pass 1
    p.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert p.runs == 1 and p.running == 0


def test_a_failed_pass_is_raised_by_close_and_stops_the_passes() -> None:
    p = Pass(fail_at=1)
    passes = BackgroundPasses(p)
    passes.request()
    assert p.started.acquire(timeout=30)
    passes.request()
    with pytest.raises(OSError, match="pass 1 failed"):
        passes.close()
    assert p.runs == 1


def test_the_callers_error_wins_over_a_failed_pass() -> None:
    p = Pass(fail_at=1)
    with pytest.raises(KeyError), BackgroundPasses(p) as passes:
        passes.request()
        assert p.started.acquire(timeout=30)
        raise KeyError("caller")
