"""Calls to an encoder that ride out faults: retries with exponential back-off and jitter
(tenacity) for transient failures only, a circuit breaker per model, and one observation per
attempt for the metrics.

Classification (see :mod:`index_runtime.errors`): :class:`EncoderUnavailableError` is
transient and retried; :class:`EncoderRejectedError` (and any other ``DriftlessError``) is
permanent and raised at once; any other exception an encoder raises while encoding is taken
as transient (a bundled model that loaded once and failed on a call). A Retry-After from the
encoder, or an open breaker's remaining cool-down, lengthens the next wait; a policy's
``budget_s`` bounds the whole call, so a query never waits as long as a backfill does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from index_runtime.encoders import Encoder, Kind
from index_runtime.encoders.breaker import Breaker, State
from index_runtime.errors import DriftlessError, EncoderRejectedError, EncoderUnavailableError

T = TypeVar("T")
OUTCOMES = ("ok", "unavailable", "rejected", "circuit_open")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts``: tries per call, the first included. Back-off before try n+1:
    ``min(max_s, initial_s·2^(n-1)) + uniform(0, jitter_s)`` seconds, at least the encoder's
    Retry-After or the breaker's cool-down. No retry starts once ``budget_s`` would be
    exceeded (seconds since the first try plus the coming wait)."""

    attempts: int = 3
    initial_s: float = 0.1
    max_s: float = 5.0
    jitter_s: float = 0.1
    budget_s: float = 10.0


# a request (search or upsert with text) waits a little; the client has its own retries
REQUEST = RetryPolicy(attempts=2, initial_s=0.05, max_s=0.5, jitter_s=0.05, budget_s=2.0)
# a migration's encoder calls wait out an outage of minutes (its runner retries beyond that)
BACKGROUND = RetryPolicy(attempts=10, initial_s=0.5, max_s=30.0, jitter_s=0.5, budget_s=180.0)


class EncoderObserver(Protocol):
    """Where a guard reports (the service's metrics)."""

    def encoder(self, model: str, outcome: str, seconds: float | None) -> None:
        """One attempt ended with ``outcome`` (one of OUTCOMES) after ``seconds`` (None: not
        sent, the breaker is open)."""

    def encoder_state(self, model: str, state: str) -> None:
        """The model's breaker is now in ``state`` (closed, open, half_open)."""


class CircuitOpenError(EncoderUnavailableError):
    """The breaker is open: the call was not sent."""


class Guard:
    """Retries and a breaker around the calls to one model's encoder (thread-safe)."""

    def __init__(
        self,
        model: str,
        breaker: Breaker | None = None,
        observer: EncoderObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.model = model
        self.observer = observer
        self.clock = clock
        self.sleep = sleep
        self._breaker = breaker or Breaker()
        self._lock = threading.Lock()
        if observer is not None:
            observer.encoder_state(model, self._breaker.state.value)

    @property
    def state(self) -> State:
        return self._breaker.state

    def call(self, fn: Callable[[], T], policy: RetryPolicy = REQUEST) -> T:
        """``fn()`` with retries of transient failures; raises the last error, classified."""
        backoff = wait_exponential(multiplier=policy.initial_s, max=policy.max_s) + wait_random(
            0, policy.jitter_s
        )

        def wait(rs: RetryCallState) -> float:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            hint = getattr(exc, "retry_after_s", None) or 0.0
            return max(float(backoff(rs)), float(hint))

        retrying = Retrying(
            retry=retry_if_exception_type(EncoderUnavailableError),
            stop=stop_after_attempt(policy.attempts) | stop_before_delay(policy.budget_s),
            wait=wait,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            out: T = retrying(self._attempt, fn)
        except EncoderUnavailableError as exc:
            if exc.retry_after_s is None:  # the 503's Retry-After: at least a second
                exc.retry_after_s = max(1.0, policy.initial_s)
            raise
        return out

    def _attempt(self, fn: Callable[[], T]) -> T:
        with self._lock:
            now = self.clock()
            admitted, after = self._breaker.admit(now)
            self._set(after)
        if not admitted:
            self._observe("circuit_open", None)
            raise CircuitOpenError(
                f"the encoder of {self.model!r} is failing: its circuit breaker is open",
                retry_after_s=max(0.1, after.retry_in(now)),
            )
        started = time.perf_counter()
        try:
            out = fn()
        except EncoderUnavailableError:
            self._end("unavailable", started, ok=False)
            raise
        except DriftlessError:
            self._end("rejected", started, ok=True)  # it answered: permanent, not an outage
            raise
        except Exception as exc:
            self._end("unavailable", started, ok=False)
            raise EncoderUnavailableError(f"the encoder of {self.model!r} failed: {exc}") from exc
        except BaseException:
            with self._lock:  # interrupted (KeyboardInterrupt): free the half-open probe
                self._set(self._breaker.released())
            raise
        self._end("ok", started, ok=True)
        return out

    def _end(self, outcome: str, started: float, ok: bool) -> None:
        seconds = time.perf_counter() - started
        with self._lock:
            self._set(self._breaker.success() if ok else self._breaker.failure(self.clock()))
        self._observe(outcome, seconds)

    def _set(self, new: Breaker) -> None:
        old, self._breaker = self._breaker, new  # caller holds the lock
        if new.state is not old.state and self.observer is not None:
            self.observer.encoder_state(self.model, new.state.value)

    def _observe(self, outcome: str, seconds: float | None) -> None:
        if self.observer is not None:
            self.observer.encoder(self.model, outcome, seconds)


class Resilient:
    """An :class:`~index_runtime.encoders.Encoder` whose calls go through a :class:`Guard`
    (for callers outside the service, such as a backfill worker: the service guards its
    encoders itself)."""

    def __init__(
        self, inner: Encoder, policy: RetryPolicy = BACKGROUND, guard: Guard | None = None
    ) -> None:
        self.inner = inner
        self.policy = policy
        self.guard = guard or Guard(inner.model_id)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def symmetric(self) -> bool:
        return self.inner.symmetric

    @property
    def dim(self) -> int:
        return self.guard.call(lambda: self.inner.dim, self.policy)

    def encode(self, texts: Sequence[str], kind: Kind = "passage") -> npt.NDArray[np.float32]:
        return self.guard.call(lambda: self.inner.encode(texts, kind), self.policy)



def encoder_pause(exc: BaseException, now: float) -> dict[str, Any] | None:
    """The migration record's ``paused`` for an encoder failure (CONTRACT15 §5): a permanent
    one (EncoderRejectedError) pauses with reason ``EncoderFailed`` until someone fixes the
    encoder and resumes; None for anything else (transient: the runner retries with
    back-off, it never ends the migration)."""
    if not isinstance(exc, EncoderRejectedError):
        return None
    return {"reason": "EncoderFailed", "message": str(exc), "at": now, "permanent": True}
