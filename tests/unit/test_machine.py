"""The migration's pure state machine and its typed record (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from index_runtime.contract import (
    MIGRATION_ACTIVE,
    MIGRATION_PHASES,
    MIGRATION_TERMINAL,
    MigrationPause,
    MigrationRecord,
    MigrationTarget,
)
from index_runtime.machine import Observed, Step, next_step, same_migration, summary

BASE = MigrationRecord(id="m1", from_model="old", to_model="new", options={"backfill": True})


def rec(**kw: Any) -> MigrationRecord:
    return BASE.replace(**kw)


# --- the record ----------------------------------------------------------------------------


def test_a_record_of_the_previous_release_reads_and_round_trips() -> None:
    old = {
        "from": "old",
        "to": "new",
        "phase": "Backfilling",
        "selected": "adapter:procrustes",
        "adapter_key": "adapters/a.safetensors",
        "sampled_rows": 600,  # a key the model has no field for: kept
        "backfill": {"todo": 3},
        "options": {"backfill": True},
    }
    r = MigrationRecord.from_json(old)
    assert r is not None
    assert (r.id, r.target, r.paused, r.phase) == ("", None, None, "Backfilling")
    assert r.object_keys == ("adapters/a.safetensors",) and r.active and not r.terminal
    again = MigrationRecord.from_json(r.to_json())
    assert again == r and again.extra == {"sampled_rows": 600}
    assert MigrationRecord.from_json({}) is None


def test_every_field_survives_a_round_trip() -> None:
    r = MigrationRecord(
        id="id7",
        from_model="a",
        to_model="b",
        target=MigrationTarget(24, "l2"),
        phase="Evaluating",
        paused=MigrationPause("EncoderFailed", "422 from the encoder", 5.0, True),
        started_at=1.0,
        updated_at=2.0,
        options={"backfill_mode": "external", "backfill_shares": 4},
        labelled_key="adapters/l.json",
        pairs_key="adapters/p.npz",
        fitted={"adapter:procrustes": "adapters/f.safetensors"},
        backfill={"todo": 1},
        cutover={"reason": "X"},
        error="boom",
        extra={"queries": 30},
    )
    assert MigrationRecord.from_json(r.to_json()) == r
    assert r.backfill_mode == "external"
    assert r.object_keys == ("adapters/l.json", "adapters/p.npz", "adapters/f.safetensors")
    assert r.to_json()["target"] == {"dim": 24, "metric": "l2"}


def test_phase_sets_partition_the_phases() -> None:
    assert set(MIGRATION_ACTIVE) | set(MIGRATION_TERMINAL) == set(MIGRATION_PHASES)
    assert not set(MIGRATION_ACTIVE) & set(MIGRATION_TERMINAL)


# --- next_step: every phase ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "obs", "step"),
    [
        (None, Observed(), Step.NOTHING),
        (rec(phase="Pending"), Observed(dual_writes=False), Step.DUAL_WRITES),
        (rec(phase="Pending"), Observed(), Step.SAMPLE),
        (rec(phase="SamplingPairs"), Observed(), Step.SAMPLE),
        (rec(phase="TrainingAdapter", pairs_key="p"), Observed(), Step.FIT),
        (rec(phase="Evaluating", pairs_key="p", fitted={"a": "f"}), Observed(), Step.EVALUATE),
        # a gate that crashed after FIT's commit resumes with EVALUATE, not a second FIT
        (rec(phase="TrainingAdapter", pairs_key="p", fitted={"a": "f"}), Observed(), Step.EVALUATE),
        (rec(phase="Bridged"), Observed(todo=10), Step.CHECKPOINT),
        (rec(phase="Backfilling"), Observed(todo=10), Step.BACKFILL),
        (rec(phase="Backfilling"), Observed(todo=10, checkpoint_due=True), Step.CHECKPOINT),
        (rec(phase="Backfilling"), Observed(), Step.CHECKPOINT),
        # the last rows were re-encoded: one final checkpoint, then the cutover decision
        (rec(phase="Backfilling", backfill={"todo": 5}), Observed(todo=0), Step.CHECKPOINT),
        (
            rec(phase="Backfilling", backfill={"todo": 0}),
            Observed(todo=0, cutover_go=True, cutover_reason="CutOver"),
            Step.CUTOVER,
        ),
        (
            rec(phase="Backfilling", backfill={"todo": 0}),
            Observed(todo=0, cutover_reason="NativeWorse"),
            Step.HOLD,
        ),
        (rec(phase="CuttingOver"), Observed(todo=0, cutover_go=True), Step.CUTOVER),
        # rows without a new vector appeared after Backfilled (e.g. a restore): back to work
        (rec(phase="Backfilled", cutover={"reason": "AwaitingCutover"}), Observed(todo=3), Step.BACKFILL),
        (rec(phase="Succeeded"), Observed(todo=0, cutover_go=True), Step.NOTHING),
        (rec(phase="Failed"), Observed(), Step.NOTHING),
        (rec(phase="RolledBack"), Observed(), Step.NOTHING),
    ],
)  # fmt: skip
def test_next_step(record: MigrationRecord | None, obs: Observed, step: Step) -> None:
    assert next_step(record, obs).step is step


def test_a_held_cutover_is_committed_once_per_reason() -> None:
    held = rec(phase="Backfilled", cutover={"reason": "AwaitingCutover", "message": "m"})
    same = next_step(held, Observed(todo=0, cutover_reason="AwaitingCutover"))
    assert same.step is Step.WAIT and same.rest
    # ...and again when the reason changes (rows without text got their vectors)
    changed = next_step(held, Observed(todo=0, cutover_reason="NativeWorse"))
    assert changed.step is Step.HOLD


def test_external_backfill_waits_for_workers_and_checkpoints_when_due() -> None:
    r = rec(phase="Backfilling", options={"backfill": True, "backfill_mode": "external"})
    assert next_step(r, Observed(todo=100)).step is Step.WAIT
    assert not next_step(r, Observed(todo=100)).rest
    assert next_step(r, Observed(todo=100, checkpoint_due=True)).step is Step.CHECKPOINT


def test_bridged_without_a_backfill_request_rests() -> None:
    r = rec(phase="Bridged", options={"backfill": False})
    assert next_step(r, Observed(todo=100)).step is Step.WAIT
    assert next_step(r, Observed(todo=100)).rest


def test_a_permanent_pause_waits_in_every_active_phase_and_a_transient_one_does_not() -> None:
    pause = MigrationPause("EncoderFailed", "model gone", 1.0, permanent=True)
    for phase in MIGRATION_ACTIVE:
        n = next_step(rec(phase=phase, paused=pause), Observed(todo=5))
        assert (n.step, n.rest) == (Step.WAIT, True), phase
    transient = MigrationPause("EncoderUnavailable", "timeout", 1.0, permanent=False)
    assert next_step(rec(phase="Backfilling", paused=transient), Observed(todo=5)).step is (
        Step.BACKFILL
    )


# --- summary and identity --------------------------------------------------------------------


def test_summary_for_the_operator() -> None:
    assert summary(None).reason == "NoMigration"
    gate = summary(rec(phase="Evaluating"))
    assert gate.progressing and not gate.terminal and gate.reason == "GateRunning"
    bf = summary(rec(phase="Backfilling", backfill={"backfilled": 3, "live": 9}))
    assert bf.progressing and "3/9" in bf.message
    p = MigrationPause("EncoderFailed", "model gone", 1.0, permanent=True)
    paused = summary(rec(phase="Backfilling", paused=p))
    assert paused.paused and not paused.progressing and paused.message == "model gone"
    held = summary(rec(phase="Backfilled", cutover={"reason": "NativeWorse", "message": "w"}))
    assert (held.progressing, held.reason) == (False, "NativeWorse")
    done = summary(rec(phase="Succeeded", cutover={"reason": "CutOver", "message": "ok"}))
    assert done.terminal and done.message == "ok"
    assert summary(rec(phase="RolledBack")).reason == "RolledBack"


def test_requests_match_records_by_id() -> None:
    assert same_migration(rec(), "m1") and same_migration(rec(), None)
    assert not same_migration(rec(), "m2") and not same_migration(None, "m1")
    legacy = rec(id="")  # a record of the previous release has no id: any request addresses it
    assert same_migration(legacy, "m2")
