"""The lifecycle policy of one index (PURE: no I/O, no clock, no threads).

Given what was observed (rows, codebooks, overlap windows, training state) and the thresholds,
:func:`decide` says which phase the index is in and what should happen next. The standalone
runtime's maintenance loop and the operator both call it; only they act.

Phases::

    ColdStart --rows >= tau--> Training --trained--> Validating --lower >= theta--> Serving
    Serving --upper < theta - delta, or rows >= factor x trained--> Degraded --> Retraining
    Retraining --candidate lower >= theta--> Serving (candidate promoted)

A candidate whose window is conclusively bad (upper < theta) is discarded and counts as a
failed training: the next attempt waits ``backoff_s · 2^(failures−1)`` (capped). Between
theta − delta and theta nothing happens (hysteresis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from index_runtime.quality.window import WindowStats as Window


class Phase(StrEnum):
    COLD_START = "ColdStart"
    TRAINING = "Training"
    VALIDATING = "Validating"
    SERVING = "Serving"
    DEGRADED = "Degraded"
    RETRAINING = "Retraining"


class Action(StrEnum):
    TRAIN = "train"
    PROMOTE = "promote"  # the candidate codebook starts serving
    DISCARD = "discard"  # the candidate codebook is dropped (failed validation)
    COMPACT = "compact"


@dataclass(frozen=True)
class Thresholds:
    tau: int  # live rows before the first training
    theta: float = 0.9
    delta: float = 0.05
    min_samples: int = 50
    growth_factor: float = 4.0
    backoff_s: float = 30.0
    backoff_max_s: float = 900.0


@dataclass(frozen=True)
class Observed:
    now: float
    live_rows: int
    serving: int = 0  # codebook version that serves; 0 = the shadow serves
    serving_trained_rows: int = 0
    serving_window: Window = field(default_factory=Window.empty)
    candidate: int = 0  # codebook being validated; 0 = none
    candidate_ready: bool = False  # its index files cover the committed segments
    candidate_window: Window = field(default_factory=Window.empty)
    training: bool = False  # a training runs now
    failures: int = 0  # consecutive failed or rejected trainings
    last_failure_at: float = 0.0
    compaction_due: bool = False


@dataclass(frozen=True)
class Decision:
    phase: Phase
    actions: tuple[Action, ...]
    reason: str  # CamelCase, for conditions and logs
    message: str


def backoff_until(obs: Observed, th: Thresholds) -> float:
    if obs.failures <= 0:
        return 0.0
    wait = min(th.backoff_max_s, th.backoff_s * 2.0 ** (obs.failures - 1))
    return obs.last_failure_at + wait


def _with_compaction(d: Decision, obs: Observed) -> Decision:
    if obs.compaction_due:
        return Decision(d.phase, (*d.actions, Action.COMPACT), d.reason, d.message)
    return d


def decide(obs: Observed, th: Thresholds) -> Decision:
    return _with_compaction(_decide(obs, th), obs)


def _decide(obs: Observed, th: Thresholds) -> Decision:
    primary = obs.serving != 0
    if obs.training:
        return Decision(
            Phase.RETRAINING if primary else Phase.TRAINING,
            (),
            "TrainingInProgress",
            "a codebook is being trained",
        )
    if obs.candidate:
        w = obs.candidate_window
        waiting = Phase.RETRAINING if primary else Phase.VALIDATING
        if not obs.candidate_ready:
            return Decision(waiting, (), "EncodingSegments", "index files are being built")
        if w.count >= th.min_samples and w.lower >= th.theta:
            return Decision(
                waiting,
                (Action.PROMOTE,),
                "Validated",
                f"candidate overlap lower bound {w.lower:.3f} >= theta {th.theta}",
            )
        if w.count >= th.min_samples and w.upper < th.theta:
            return Decision(
                waiting,
                (Action.DISCARD,),
                "CandidateRejected",
                f"candidate overlap upper bound {w.upper:.3f} < theta {th.theta}",
            )
        return Decision(
            waiting,
            (),
            "Validating",
            f"candidate overlap {w.mean:.3f} [{w.lower:.3f}, {w.upper:.3f}] on {w.count} samples",
        )
    backing_off = obs.now < backoff_until(obs, th)
    if not primary:
        if obs.live_rows < th.tau:
            return Decision(
                Phase.COLD_START, (), "CollectingRows", f"{obs.live_rows} of {th.tau} rows"
            )
        if backing_off:
            return Decision(
                Phase.COLD_START,
                (),
                "TrainingBackoff",
                f"{obs.failures} failed trainings; next attempt later",
            )
        return Decision(Phase.TRAINING, (Action.TRAIN,), "EnoughRows", f"{obs.live_rows} rows")
    w = obs.serving_window
    degraded = w.count >= th.min_samples and w.upper < th.theta - th.delta
    grown = obs.live_rows >= th.growth_factor * max(1, obs.serving_trained_rows)
    if not (degraded or grown):
        return Decision(Phase.SERVING, (), "Serving", f"overlap {w.mean:.3f} on {w.count}")
    why = (
        f"overlap upper bound {w.upper:.3f} < theta - delta {th.theta - th.delta:.3f}"
        if degraded
        else f"{obs.live_rows} rows >= {th.growth_factor} x {obs.serving_trained_rows} trained"
    )
    reason = "OverlapBelowThreshold" if degraded else "DataGrew"
    if backing_off:
        return Decision(Phase.DEGRADED, (), reason, why + "; retraining backs off")
    return Decision(Phase.DEGRADED, (Action.TRAIN,), reason, why)
