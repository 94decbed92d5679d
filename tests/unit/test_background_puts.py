"""Compaction's background puts: one in flight, failures surface before any commit."""

from __future__ import annotations

import threading

import pytest

from index_runtime.store.puts import BackgroundPuts


class Recorder:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.fail = fail or set()
        self.done: list[str] = []
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()
        self.gate: dict[str, threading.Event] = {}

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if key in self.gate:
                assert self.gate[key].wait(30)
            if key in self.fail:
                raise OSError(f"put of {key} failed")
            self.done.append(key)
        finally:
            with self.lock:
                self.running -= 1


def test_puts_run_one_at_a_time_in_order() -> None:
    r = Recorder()
    with BackgroundPuts(r.put) as puts:
        for i in range(5):
            puts.submit(f"k{i}", bytes([i]))
        puts.wait()
    assert r.done == [f"k{i}" for i in range(5)]
    assert r.max_running == 1


def test_submit_returns_while_the_put_is_in_flight() -> None:
    r = Recorder()
    r.gate["slow"] = threading.Event()
    with BackgroundPuts(r.put) as puts:
        puts.submit("slow", b"x")  # returns although the put is blocked
        assert r.done == []
        r.gate["slow"].set()
        puts.wait()
    assert r.done == ["slow"]


def test_a_failed_put_fails_wait() -> None:
    r = Recorder(fail={"k1"})
    with BackgroundPuts(r.put) as puts:
        puts.submit("k0", b"")
        puts.submit("k1", b"")
        with pytest.raises(OSError, match="k1"):
            puts.wait()
    assert r.done == ["k0"]


def test_a_failed_put_fails_the_next_submit_which_is_not_started() -> None:
    r = Recorder(fail={"k0"})
    with BackgroundPuts(r.put) as puts:
        puts.submit("k0", b"")
        with pytest.raises(OSError, match="k0"):
            puts.submit("k1", b"")
    assert r.done == []


def test_close_joins_a_put_in_flight() -> None:
    r = Recorder()
    r.gate["k0"] = threading.Event()
    puts = BackgroundPuts(r.put)
    puts.submit("k0", b"")
    threading.Timer(0.05, r.gate["k0"].set).start()
    puts.close()  # returns only once the put has finished
    assert r.done == ["k0"]
