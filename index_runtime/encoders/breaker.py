"""A circuit breaker as a pure state machine (no clock, no I/O: the caller passes ``now``).

closed --(``threshold`` consecutive failures)--> open --(``cooldown_s`` elapsed, next call)-->
half-open (one probe call) --success--> closed | --failure--> open (the cool-down restarts).

While open, calls fail fast instead of waiting for an encoder that is down: the endpoint gets
room to recover and callers learn ``retry_in`` (seconds) for a Retry-After. Every transition
returns a new :class:`Breaker`; the holder keeps it under its own lock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Breaker:
    """``threshold``: consecutive failures that open it (≥ 1); ``cooldown_s``: seconds open
    before one probe is let through. ``failures`` counts consecutive failures while closed;
    ``opened_at`` is when it last opened; ``probing``: the half-open probe is in flight."""

    threshold: int = 5
    cooldown_s: float = 30.0
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.cooldown_s < 0:
            raise ValueError("a breaker needs threshold >= 1 and cooldown_s >= 0")

    def admit(self, now: float) -> tuple[bool, Breaker]:
        """May a call go out at ``now``? (the answer, the breaker after asking). An open
        breaker past its cool-down turns half-open and admits exactly one probe."""
        if self.state is State.OPEN:
            if now - self.opened_at < self.cooldown_s:
                return False, self
            return True, replace(self, state=State.HALF_OPEN, probing=True)
        if self.state is State.HALF_OPEN:
            if self.probing:
                return False, self  # one probe at a time; the others fail fast
            return True, replace(self, probing=True)
        return True, self

    def success(self) -> Breaker:
        """The encoder answered: closed, failures forgotten."""
        return replace(self, state=State.CLOSED, failures=0, probing=False)

    def failure(self, now: float) -> Breaker:
        """A transient failure (timeout, connection error, 429/5xx)."""
        if self.state is State.HALF_OPEN:
            return self._open(now)  # the probe failed: another cool-down
        if self.state is State.OPEN:
            return self  # a call admitted before it opened came back late
        failures = self.failures + 1
        if failures >= self.threshold:
            return self._open(now)
        return replace(self, failures=failures)

    def released(self) -> Breaker:
        """The admitted call was abandoned without an answer (interrupted): the next call
        may probe."""
        return replace(self, probing=False)

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker admits its probe (0 when not open)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - now)

    def _open(self, now: float) -> Breaker:
        return replace(self, state=State.OPEN, failures=0, opened_at=now, probing=False)
