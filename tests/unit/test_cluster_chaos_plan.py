"""The chaos campaign's pure rules: plans from seeds, the retry rule, the ledger, verdicts,
the summary (tests/cluster/chaos_plan.py)."""

from __future__ import annotations

import math
import random

import pytest

from tests.cluster import chaos_plan as cp


def test_a_plan_is_a_function_of_fault_and_seed() -> None:
    assert cp.plan("kill-writer", 7) == cp.plan("kill-writer", 7)
    plans = {cp.plan("kill-reader", s) for s in range(20)}
    assert len({(p.delay_s, p.pick) for p in plans}) == 20  # seeds differ


@pytest.mark.parametrize("fault", cp.FAULTS)
def test_every_fault_hits_its_components_inside_its_ranges(fault: str) -> None:
    for seed in range(50):
        p = cp.plan(fault, seed, allowance_s=12.0)
        assert p.component in cp.TARGETS[fault]
        assert 0.5 <= p.delay_s <= 4.0
        if fault == "partition-s3":
            assert 5.0 <= p.duration_s <= 60.0
        elif fault == "sigstop":
            assert p.duration_s > 12.0  # held longer than the liveness probe allows
        else:
            assert p.duration_s == 0.0


def test_partitions_spread_over_the_range_and_sigstops_hit_every_role() -> None:
    durations = [cp.plan("partition-s3", s).duration_s for s in range(200)]
    assert min(durations) < 15 and max(durations) > 50
    assert {cp.plan("sigstop", s).component for s in range(60)} == {"writer", "reader", "shadow"}


def test_a_backfill_kill_needs_a_backfill_and_others_take_what_the_caller_has() -> None:
    assert {cp.plan("kill-backfill", s).moment for s in range(30)} == {"Backfilling"}
    with pytest.raises(ValueError, match="cannot strike"):
        cp.plan("kill-backfill", 1, moments=("steady",))
    assert {cp.plan("kill-writer", s, moments=("steady",)).moment for s in range(30)} == {"steady"}
    assert {cp.plan("kill-writer", s).moment for s in range(60)} == set(cp.MOMENTS)
    with pytest.raises(ValueError, match="unknown fault"):
        cp.plan("kill-everything", 1)
    with pytest.raises(ValueError, match="liveness probe"):
        cp.plan("sigstop", 1, allowance_s=math.inf)


def test_liveness_allowance_follows_the_probe_and_the_kubelets_scale() -> None:
    probe = {"periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5}
    assert cp.liveness_allowance_s(probe) == 35.0
    assert cp.liveness_allowance_s(probe, scale=0.2) == pytest.approx(11.0)  # 6 s + 5 s unscaled
    assert cp.liveness_allowance_s({}) == math.inf
    assert cp.liveness_allowance_s({"periodSeconds": 2}) == 7.0  # defaults: 3 failures, 1 s


def test_the_campaign_covers_every_fault_with_distinct_seeds() -> None:
    trials = cp.campaign(30, first_seed=100)
    assert len({s for _, s in trials}) == 30 and min(s for _, s in trials) == 100
    counts = {f: sum(f == g for g, _ in trials) for f in cp.FAULTS}
    assert min(counts.values()) >= 4


def test_the_schedule_groups_migrating_trials_and_keeps_every_trial() -> None:
    groups = cp.schedule(35, first_seed=0, per_migration=2)
    assert len(cp.schedule(35)) < len(groups)  # three to a migration by default
    trials = [t for g in groups for t in g.trials]
    assert sorted(trials, key=lambda t: t[1]) == cp.campaign(35)
    for g in groups:
        moments = [cp.plan(f, s).moment for f, s in g.trials]
        if g.migrate:
            assert "steady" not in moments and len(g.trials) <= 2
            assert moments == sorted(moments, key=cp.MOMENTS.index)  # the gate comes first
        else:
            assert moments == ["steady"]
    backfill = [g for g in groups if any(f == "kill-backfill" for f, _ in g.trials)]
    assert backfill and all(g.migrate for g in backfill)
    # one backfill kill per migration: a second one finds the backfill over (seen at 4 to a
    # migration, where seeds 3 and 10 shared one)
    for n, per in ((35, 2), (30, 3), (30, 4)):
        for g in cp.schedule(n, per_migration=per):
            assert sum(f == "kill-backfill" for f, _ in g.trials) <= 1, (n, per, g)
            # at most one gate trial ahead of a backfill kill while gate trials are fewer
            # than migrations (behind two, seed 10 found the backfill over)
            gates = sum(cp.plan(f, s).moment == "gate" for f, s in g.trials)
            assert gates <= 1 or not any(f == "kill-backfill" for f, _ in g.trials), (n, per, g)
    with pytest.raises(ValueError, match="backfill kills"):
        cp.schedule(30, per_migration=15)
    steady = sum(not g.migrate for g in groups)
    assert 0 < steady < 30  # roughly half the other trials strike steady


def test_ci_schedule_keeps_the_first_migrations_and_fills_with_steady_trials() -> None:
    full = cp.schedule(30, per_migration=4)
    for migrations in (0, 1, 2):
        groups = cp.ci_schedule(30, migrations)
        trials = [t for g in groups for t in g.trials]
        assert len(trials) == 30 and len({s for _, s in trials}) == 30
        mig = [g for g in groups if g.migrate]
        assert mig == [g for g in full if g.migrate][:migrations]  # the full run's, same seeds
        kills = [f for g in groups for f, _ in g.trials if f == "kill-backfill"]
        assert len(kills) == migrations and all(len(g.trials) == 1 for g in groups if not g.migrate)
        faults = {f for f, _ in trials}
        assert faults == set(cp.FAULTS) - (set() if migrations else {"kill-backfill"})
        assert groups[0].migrate == (migrations > 0)  # a migration first, steady trials between
    # all of the full schedule's migrations: the same trials as the full schedule
    n_full = sum(g.migrate for g in full)
    assert sorted(t for g in cp.ci_schedule(30, n_full) for t in g.trials) == sorted(cp.campaign(30))
    with pytest.raises(ValueError, match="migrations"):
        cp.ci_schedule(30, n_full + 1)


def test_retry_rule_follows_retry_after_and_gives_up_on_final_answers() -> None:
    rng = random.Random(0)
    assert cp.next_wait(503, "1", 0, 0.0, 30.0, rng) == 1.0
    assert cp.next_wait(429, "120", 0, 0.0, 30.0, rng) == 2.0  # capped
    assert cp.next_wait(507, None, 0, 0.0, 30.0, rng) is not None
    waits = [cp.next_wait(None, None, a, 0.0, 30.0, rng) for a in range(8)]
    assert all(w is not None and 0.05 <= w <= 2.0 for w in waits)
    assert (waits[6] or 0) > (waits[0] or 0)  # backs off
    for final in (200, 400, 401, 404, 409, 413, 422, 500):
        assert cp.next_wait(final, "1", 0, 0.0, 30.0, rng) is None
    assert cp.next_wait(503, "1", 3, 29.5, 30.0, rng) is None  # the budget would run out
    assert cp.next_wait(503, "Wed, 21 Oct 2026 07:28:00 GMT", 0, 0.0, 30.0, rng) is not None


def test_ledger_finds_lost_writes_and_resurrected_deletes() -> None:
    ops: list[cp.Op] = [
        ("upsert", {"a": "a0", "b": "b0", "c": "c0"}),
        ("delete", {"b": None}),
        ("upsert", {"a": "a2"}),
        ("upsert", {"c": "c3"}),  # not acknowledged: c may show c0 or c3
    ]
    acked = [True, True, True, False]
    good = {"a": "a2", "c": "c3"}
    assert cp.ledger_check(ops, acked, good) == ([], [])
    assert cp.ledger_check(ops, acked, {"a": "a2", "c": "c0"}) == ([], [])
    assert cp.ledger_check(ops, acked, {"a": "a0", "c": "c0"}) == (["a"], [])  # older version
    assert cp.ledger_check(ops, acked, {"c": "c0"}) == (["a"], [])  # gone
    assert cp.ledger_check(ops, acked, {**good, "b": "b0"}) == ([], ["b"])  # deleted, back


def test_windows_and_first_times() -> None:
    samples = [(0.5, True), (1.0, False), (2.0, True), (3.0, True), (9.0, False)]
    assert cp.success_rate(samples, 1.0, 3.0) == pytest.approx(2 / 3)
    assert cp.success_rate(samples, 4.0, 8.0) is None
    assert cp.first_true([(5.0, True), (1.0, True), (3.0, False), (4.0, True)], 2.0) == 4.0
    assert cp.first_true([(1.0, True)], 2.0) is None
    assert cp.alert_expected(30.0, for_s=10.0) and not cp.alert_expected(11.0, for_s=10.0)
    assert not cp.alert_expected(20.0, for_s=10.0, lag_s=8.0)  # the condition starts late


def _result(**kw: object) -> cp.TrialResult:
    base: dict[str, object] = {
        "fault": "kill-writer",
        "seed": 1,
        "target": "writer",
        "plan": {"component": "writer"},
        "outage_s": 6.0,
        "recovery_s": 4.0,
        "queries": 100,
        "queries_ok": 100,
        "reader_queries_writer_down": 10,
        "reader_ok_writer_down": 10,
    }
    return cp.TrialResult(**{**base, **kw})  # type: ignore[arg-type]


def test_verdict_names_each_failed_check() -> None:
    assert _result().ok
    cases = {
        "lost": _result(lost=["k1"]),
        "back": _result(resurrected=["k2"]),
        "Serving": _result(recovery_s=None),
        "migration ended Failed": _result(migration="Failed"),
        "did not run again": _result(restarted=False),
        "query success 80%": _result(queries_ok=80),
        "readers did not answer": _result(reader_ok_writer_down=0),
        "readers never caught up": _result(readers_lost=["k3"]),
        "did not fire": _result(alert="DriftlessRuntimeDown", alert_expected=True),
        "did not resolve": _result(
            alert="DriftlessRuntimeDown", alert_expected=True, alert_fired_s=12.0
        ),
        "error: boom": _result(error="boom"),
        "replaced 3.0 s into the cut": _result(phase_at_strike="steady", moved_s=3.0),
    }
    for words, r in cases.items():
        assert any(words in f for f in r.failures), (words, r.failures)
    # an alert whose condition was too short to fire is reported, not failed
    assert _result(alert="DriftlessRuntimeDown", alert_expected=False).ok
    assert _result(migration="Succeeded").ok
    # a migration's start or end rolls the writer off the cut host: the cut is over then
    assert _result(phase_at_strike="CuttingOver", moved_s=3.0).ok
    # a writer back within READERS_ALONE_S: a query may just be retried across the outage
    assert _result(reader_ok_writer_down=0, outage_s=1.0).ok
    assert _result(reader_ok_writer_down=0, plan={"component": "shadow"}).ok


def test_summary_percentiles_and_table() -> None:
    rs = [_result(seed=i, recovery_s=float(i)) for i in range(1, 11)]
    rs += [_result(fault="kill-reader", seed=20, recovery_s=None, queries_ok=50)]
    rows = {r.fault: r for r in cp.summarize(rs)}
    assert list(rows) == ["kill-writer", "kill-reader", "all"]
    w = rows["kill-writer"]
    assert (w.trials, w.passed, w.recovery_p50_s, w.recovery_p99_s) == (10, 10, 5.0, 10.0)
    assert rows["kill-reader"].passed == 0 and rows["kill-reader"].recovery_p50_s is None
    assert rows["all"].query_success == pytest.approx(1050 / 1100)
    md = cp.table(rs, "# Chaos")
    assert "| kill-reader | 1 | 0 | 0 | 0 | 50.0% | — | — | 0/0 |" in md
    assert "query success 50%" in md
    assert cp.percentile([], 50) is None and cp.percentile([3.0], 99) == 3.0


def test_results_files(tmp_path: object) -> None:
    from pathlib import Path

    from tests.cluster.chaos_campaign import write_results

    out = Path(str(tmp_path))
    rs = [_result(seed=i, recovery_s=float(i)) for i in range(1, 4)]
    rs += [_result(fault="sigstop", seed=9, recovery_s=None, restarted=False)]
    write_results(rs, out, "the command", {"corpus": "300 docs"})
    import json

    doc = json.loads((out / "cluster_chaos.json").read_text())
    assert [t["ok"] for t in doc["trials"]] == [True, True, True, False]
    assert "did not run again" in " ".join(doc["trials"][3]["failures"])
    assert doc["summary"][-1]["fault"] == "all" and doc["summary"][-1]["trials"] == 4
    md = (out / "cluster_chaos.md").read_text()
    assert "Command: `the command`" in md and "| sigstop | 1 | 0 |" in md
    assert (out / "cluster_chaos.png").read_bytes()[:4] == b"\x89PNG"


def test_a_trial_during_a_migration_recovers_in_a_phase_the_cutover_leads_to() -> None:
    # steady: only the phase of before counts (a Serving index left Validating is not back)
    assert cp.phase_recovered("Serving", "Serving", migrating=False)
    assert not cp.phase_recovered("Validating", "Serving", migrating=False)
    # a migration may cut over during the trial: the new model's codebook is validated again
    assert cp.phase_recovered("Validating", "Serving", migrating=True)
    assert not cp.phase_recovered("Degraded", "Serving", migrating=True)
    assert not cp.phase_recovered("Pending", "Serving", migrating=True)


def test_an_index_not_serving_after_its_migration_fails_the_trial() -> None:
    r = cp.TrialResult(fault="kill-shadow", seed=9, recovery_s=1.0, migration="Succeeded")
    assert r.ok
    r.serving_after_migration = False
    assert r.failures == ["the index did not return to Serving after the migration"]
