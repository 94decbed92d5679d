"""The encoder circuit breaker (a pure state machine) and the guard around encoder calls
(tenacity retries, classification, Retry-After, budget), with a fake clock and fake sleep:
no encoder, no waiting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from index_runtime.encoders.breaker import Breaker, State
from index_runtime.encoders.http import classify_status, parse_retry_after
from index_runtime.encoders.resilience import CircuitOpenError, Guard, RetryPolicy, encoder_pause
from index_runtime.errors import (
    EncoderRejectedError,
    EncoderUnavailableError,
    InvalidInputError,
)

# --- breaker -----------------------------------------------------------------------------------


def test_breaker_opens_after_n_consecutive_failures_only() -> None:
    b = Breaker(threshold=3, cooldown_s=10)
    for _ in range(2):
        b = b.failure(0)
    b = b.success()  # a success in between: the count starts over
    for _ in range(2):
        b = b.failure(1)
    assert b.state is State.CLOSED and b.admit(1)[0]
    b = b.failure(2)
    assert b.state is State.OPEN and b.retry_in(5) == 7


def test_open_breaker_admits_one_probe_after_the_cooldown() -> None:
    b = Breaker(threshold=1, cooldown_s=10).failure(100)
    admitted, b = b.admit(109.9)
    assert not admitted and b.state is State.OPEN
    admitted, b = b.admit(110)
    assert admitted and b.state is State.HALF_OPEN
    admitted, same = b.admit(110.5)  # the probe is in flight: others fail fast
    assert not admitted and same == b
    assert b.success().state is State.CLOSED
    reopened = b.failure(111)  # the probe failed: another full cool-down
    assert reopened.state is State.OPEN and reopened.retry_in(111) == 10
    assert b.released().admit(112)[0]  # an abandoned probe lets the next call probe


def test_a_late_failure_does_not_extend_an_open_breaker() -> None:
    b = Breaker(threshold=1, cooldown_s=10).failure(0)
    assert b.failure(5) == b  # admitted before it opened, answered after


def test_breaker_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        Breaker(threshold=0)


# --- HTTP classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [(500, True), (502, True), (503, True), (504, True), (429, True), (408, True),
     (400, False), (401, False), (403, False), (404, False), (413, False), (422, False)],
)
def test_http_status_classification(status: int, transient: bool) -> None:
    err = classify_status("u", status, "d", None, 0.0)
    assert isinstance(err, EncoderUnavailableError if transient else EncoderRejectedError)
    assert err.status == (503 if transient else 424)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("7", 0) == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10
    assert parse_retry_after("1e9", 0) == 300  # capped
    assert parse_retry_after("soon", 0) is None and parse_retry_after(None, 0) is None
    err = classify_status("u", 503, "busy", "4", 0.0)
    assert err.retry_after_s == 4


# --- guard -------------------------------------------------------------------------------------


@dataclass
class Recorder:
    events: list[tuple[str, str]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    def encoder(self, model: str, outcome: str, seconds: float | None) -> None:
        self.events.append((model, outcome))

    def encoder_state(self, model: str, state: str) -> None:
        self.states.append(state)


@dataclass
class FakeTime:
    now: float = 0.0
    slept: list[float] = field(default_factory=list)

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def scripted(*steps: Exception | None) -> tuple[Callable[[], str], list[int]]:
    """A call that raises the scripted errors in turn, then returns "ok"."""
    calls = [0]

    def fn() -> str:
        i = calls[0]
        calls[0] += 1
        if i < len(steps) and steps[i] is not None:
            raise steps[i]  # type: ignore[misc]
        return "ok"

    return fn, calls


POLICY = RetryPolicy(attempts=4, initial_s=0.1, max_s=1.0, jitter_s=0.0, budget_s=60)


def guard(threshold: int = 5, cooldown_s: float = 30) -> tuple[Guard, FakeTime, Recorder]:
    t, rec = FakeTime(), Recorder()
    g = Guard("m", Breaker(threshold, cooldown_s), rec, clock=lambda: t.now, sleep=t.sleep)
    return g, t, rec


def test_transient_failures_are_retried_with_exponential_backoff() -> None:
    g, t, rec = guard()
    fn, calls = scripted(EncoderUnavailableError("x", None), OSError("reset"), None)
    assert g.call(fn, POLICY) == "ok"
    assert calls[0] == 3 and t.slept == [0.1, 0.2]
    assert [o for _, o in rec.events] == ["unavailable", "unavailable", "ok"]


def test_retry_after_lengthens_the_wait() -> None:
    g, t, _ = guard()
    fn, _ = scripted(EncoderUnavailableError("busy", retry_after_s=5.0), None)
    assert g.call(fn, POLICY) == "ok" and t.slept == [5.0]


def test_permanent_failures_are_not_retried() -> None:
    for err in (EncoderRejectedError("model gone"), InvalidInputError("bad")):
        g, t, rec = guard()
        fn, calls = scripted(err)
        with pytest.raises(type(err)):
            g.call(fn, POLICY)
        assert calls[0] == 1 and t.slept == [] and rec.events == [("m", "rejected")]
        assert g.state is State.CLOSED  # the encoder answered: not an outage


def test_other_exceptions_become_transient_and_the_last_one_is_raised() -> None:
    g, _, rec = guard()
    fn, calls = scripted(*[RuntimeError("cuda oom")] * 10)
    with pytest.raises(EncoderUnavailableError, match="cuda oom"):
        g.call(fn, POLICY)
    assert calls[0] == POLICY.attempts and len(rec.events) == POLICY.attempts


def test_budget_stops_before_a_wait_that_would_exceed_it() -> None:
    g, t, _ = guard()
    fn, calls = scripted(*[EncoderUnavailableError("busy", retry_after_s=30.0)] * 3)
    with pytest.raises(EncoderUnavailableError):
        g.call(fn, RetryPolicy(attempts=5, budget_s=10))
    assert calls[0] == 1 and t.slept == []


def test_breaker_opens_fails_fast_then_probes_and_closes() -> None:
    g, t, rec = guard(threshold=3, cooldown_s=30)
    down, calls = scripted(*[EncoderUnavailableError("down", None)] * 100)
    once = RetryPolicy(attempts=1)
    for _ in range(3):
        with pytest.raises(EncoderUnavailableError):
            g.call(down, once)
    assert g.state is State.OPEN and rec.states == ["closed", "open"]
    with pytest.raises(CircuitOpenError) as err:
        g.call(down, once)
    assert calls[0] == 3 and err.value.retry_after_s == 30  # not sent
    assert rec.events[-1] == ("m", "circuit_open")
    t.now += 30
    up, up_calls = scripted()
    assert g.call(up, once) == "ok" and up_calls[0] == 1
    assert g.state is State.CLOSED and rec.states == ["closed", "open", "half_open", "closed"]


def test_a_patient_policy_waits_out_the_cooldown() -> None:
    """A background call meeting an open breaker waits its cool-down and probes."""
    g, t, _ = guard(threshold=2, cooldown_s=20)
    fn, calls = scripted(*[EncoderUnavailableError("down", None)] * 2)
    assert g.call(fn, RetryPolicy(attempts=5, initial_s=0.1, jitter_s=0, budget_s=100)) == "ok"
    assert calls[0] == 3 and t.slept[-1] == pytest.approx(19.8)  # opened after 0.1 s of waiting


def test_only_a_permanent_failure_pauses_a_migration() -> None:
    paused = encoder_pause(EncoderRejectedError("HTTP 404: model gone"), 12.0)
    assert paused == {
        "reason": "EncoderFailed", "message": "HTTP 404: model gone", "at": 12.0, "permanent": True
    }
    for exc in (EncoderUnavailableError("timeout"), CircuitOpenError("open"), RuntimeError("x")):
        assert encoder_pause(exc, 12.0) is None
