"""Table-driven tests of the lifecycle policy: every transition, the hysteresis, the bounds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from index_runtime import lifecycle
from index_runtime.lifecycle import Action, Observed, Phase, Thresholds, Window, decide

TH = Thresholds(tau=1000, theta=0.9, delta=0.05, min_samples=50, growth_factor=4.0,
                backoff_s=10, backoff_max_s=40)


def w(count: int, lower: float, upper: float) -> Window:
    return Window(count, (lower + upper) / 2, lower, upper)


CASES = [
    # (name, observed, phase, actions, reason)
    ("cold start below tau", Observed(0, 999), Phase.COLD_START, (), "CollectingRows"),
    ("tau reached -> train", Observed(0, 1000), Phase.TRAINING, (Action.TRAIN,), "EnoughRows"),
    ("training runs", Observed(0, 5000, training=True), Phase.TRAINING, (), "TrainingInProgress"),
    ("candidate encoding", Observed(0, 5000, candidate=1), Phase.VALIDATING, (), "EncodingSegments"),
    ("too few samples", Observed(0, 5000, candidate=1, candidate_ready=True, candidate_window=w(49, 0.95, 1.0)),
     Phase.VALIDATING, (), "Validating"),
    ("lower >= theta -> cutover", Observed(0, 5000, candidate=1, candidate_ready=True, candidate_window=w(50, 0.9, 1.0)),
     Phase.VALIDATING, (Action.PROMOTE,), "Validated"),
    ("lower just below theta waits", Observed(0, 5000, candidate=1, candidate_ready=True, candidate_window=w(500, 0.899, 0.95)),
     Phase.VALIDATING, (), "Validating"),
    ("upper < theta -> rejected", Observed(0, 5000, candidate=1, candidate_ready=True, candidate_window=w(50, 0.5, 0.899)),
     Phase.VALIDATING, (Action.DISCARD,), "CandidateRejected"),
    ("backoff after a failure", Observed(15, 5000, failures=1, last_failure_at=10), Phase.COLD_START, (), "TrainingBackoff"),
    ("backoff over -> train again", Observed(20, 5000, failures=1, last_failure_at=10), Phase.TRAINING, (Action.TRAIN,), "EnoughRows"),
    ("backoff doubles", Observed(39, 5000, failures=3, last_failure_at=0), Phase.COLD_START, (), "TrainingBackoff"),
    ("backoff is capped", Observed(41, 5000, failures=9, last_failure_at=0), Phase.TRAINING, (Action.TRAIN,), "EnoughRows"),
    ("serving, healthy", Observed(0, 5000, serving=1, serving_trained_rows=5000, serving_window=w(400, 0.92, 0.97)),
     Phase.SERVING, (), "Serving"),
    ("hysteresis: between theta-delta and theta", Observed(0, 5000, serving=1, serving_trained_rows=5000, serving_window=w(400, 0.86, 0.88)),
     Phase.SERVING, (), "Serving"),
    ("upper exactly theta-delta stays", Observed(0, 5000, serving=1, serving_trained_rows=5000, serving_window=w(400, 0.8, 0.85)),
     Phase.SERVING, (), "Serving"),
    ("degraded: upper < theta-delta", Observed(0, 5000, serving=1, serving_trained_rows=5000, serving_window=w(400, 0.8, 0.849)),
     Phase.DEGRADED, (Action.TRAIN,), "OverlapBelowThreshold"),
    ("degraded needs min samples", Observed(0, 5000, serving=1, serving_trained_rows=5000, serving_window=w(49, 0.1, 0.2)),
     Phase.SERVING, (), "Serving"),
    ("growth by factor", Observed(0, 20000, serving=1, serving_trained_rows=5000), Phase.DEGRADED, (Action.TRAIN,), "DataGrew"),
    ("growth just below factor", Observed(0, 19999, serving=1, serving_trained_rows=5000), Phase.SERVING, (), "Serving"),
    ("degraded while backing off", Observed(1, 20000, serving=1, serving_trained_rows=5000, failures=1, last_failure_at=0),
     Phase.DEGRADED, (), "DataGrew"),
    ("retraining runs", Observed(0, 20000, serving=1, training=True), Phase.RETRAINING, (), "TrainingInProgress"),
    ("retrained candidate validating", Observed(0, 20000, serving=1, candidate=2, candidate_ready=True, candidate_window=w(10, 0.5, 1)),
     Phase.RETRAINING, (), "Validating"),
    ("retrained candidate promoted", Observed(0, 20000, serving=1, candidate=2, candidate_ready=True, candidate_window=w(60, 0.93, 0.99)),
     Phase.RETRAINING, (Action.PROMOTE,), "Validated"),
    ("retrained candidate rejected", Observed(0, 20000, serving=1, candidate=2, candidate_ready=True, candidate_window=w(60, 0.5, 0.7)),
     Phase.RETRAINING, (Action.DISCARD,), "CandidateRejected"),
    ("compaction due is added", Observed(0, 5000, serving=1, serving_trained_rows=5000, compaction_due=True),
     Phase.SERVING, (Action.COMPACT,), "Serving"),
    ("compaction during cold start", Observed(0, 10, compaction_due=True), Phase.COLD_START, (Action.COMPACT,), "CollectingRows"),
]


@pytest.mark.parametrize(("name", "obs", "phase", "actions", "reason"), CASES, ids=[c[0] for c in CASES])
def test_transition(name: str, obs: Observed, phase: Phase, actions: tuple[Action, ...], reason: str) -> None:
    d = decide(obs, TH)
    assert (d.phase, d.actions, d.reason) == (phase, actions, reason), d.message
    assert d.message


def test_every_phase_and_action_is_reachable() -> None:
    phases = {decide(c[1], TH).phase for c in CASES}
    actions = {a for c in CASES for a in decide(c[1], TH).actions}
    assert phases == set(Phase) and actions == set(Action)


def test_policy_module_is_pure() -> None:
    tree = ast.parse(Path(lifecycle.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert imported <= {"__future__", "dataclasses", "enum", "index_runtime.quality.window"}, imported
    window_src = Path(lifecycle.__file__).parent / "quality" / "window.py"
    wtree = ast.parse(window_src.read_text())
    wimports = {a.name for n in ast.walk(wtree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(wtree) if isinstance(n, ast.ImportFrom)
    }
    assert wimports <= {"__future__", "math", "collections", "dataclasses"}, wimports
