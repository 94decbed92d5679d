"""The migration's pure parts: metrics, the sample-based ARR estimator, the strategy gate,
calibration and the progressive merge — on synthetic two-model data with known structure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from index_runtime.adapters import FitOptions, fit_adapter
from index_runtime.migration import (
    STATUS_QUO,
    Calibration,
    decision_metric,
    fit_calibration,
    merge,
    rank_fusion,
    select_strategy,
)
from index_runtime.quality import evaluate as ev
from index_runtime.quality.arr import (
    _rank_posterior,
    bootstrap,
    fit_rank_hits,
    mrr,
    paired_gain,
    recall,
    success,
    topk,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def two_models(
    n: int = 3000,
    nq: int = 1200,
    d: int = 32,
    old_noise: float = 0.5,
    new_noise: float = 0.3,
    q_old: float = 0.6,
    q_new: float = 0.6,
    seed: int = 0,
) -> ev.Paired:
    """Rows share a latent; the old model sees it through one noisy map, the new through
    another (a different rotation). Each query is a noisy view of one row (its label)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    r_old, _ = np.linalg.qr(rng.normal(size=(d, d)))
    r_new, _ = np.linalg.qr(rng.normal(size=(d, d)))
    labels = rng.choice(n, size=nq, replace=False)
    zq = z[labels] + 0.5 * rng.normal(size=(nq, d))
    return ev.Paired(
        old_rows=_unit((z + old_noise * rng.normal(size=z.shape)) @ r_old),
        new_rows=_unit((z + new_noise * rng.normal(size=z.shape)) @ r_new),
        old_queries=_unit((zq + q_old * rng.normal(size=zq.shape)) @ r_old),
        new_queries=_unit((zq + q_new * rng.normal(size=zq.shape)) @ r_new),
        labels=labels.astype(np.int64),
        calibration=np.arange(nq) % 2 == 0,
    )


def test_topk_and_per_query_metrics() -> None:
    base = _unit(np.random.default_rng(1).normal(size=(200, 8)))
    q = base[:5]
    idx, val = topk(q, base, 3)
    assert (idx[:, 0] == np.arange(5)).all()  # each row is its own nearest
    assert (np.diff(val, axis=1) <= 0).all()
    full = np.argsort(-(q @ base.T), axis=1)[:, :3]
    assert (np.sort(idx, 1) == np.sort(full, 1)).all()
    retrieved = np.array([[1, 2, 3], [4, 5, 6]])
    truth = np.array([[3, 9, 1], [7, 8, 9]])
    assert recall(retrieved, truth).tolist() == pytest.approx([2 / 3, 0.0])
    labels = np.array([2, 6])
    assert success(retrieved, labels, 3).tolist() == [1.0, 1.0]
    assert success(retrieved, labels, 2).tolist() == [1.0, 0.0]
    assert mrr(retrieved, labels, 3).tolist() == pytest.approx([0.5, 1 / 3])


def test_rank_posterior_is_a_distribution_centred_on_x_over_f() -> None:
    w = _rank_posterior(4, 0.2, 400)
    assert np.allclose(w.sum(axis=1), 1.0, atol=1e-6)
    mean = (w * np.arange(400)).sum(axis=1)
    assert np.allclose(mean, (np.arange(4) + 1) / 0.2 - 1, atol=1e-3)  # E[A | x] = (x+1)/f − 1
    assert np.array_equal(_rank_posterior(3, 1.0, 10), np.eye(3, 10))  # all rows sampled: known


def test_rank_hit_model_recovers_a_known_curve() -> None:
    """Simulate sampled rows whose true corpus ranks follow the posterior, hits drawn from a
    known h(r) = sigmoid(1.5 − 1.2·log r); the fit recovers it."""
    rng = np.random.default_rng(0)
    f, xmax = 0.1, 6
    w = _rank_posterior(xmax, f, 600)
    h = 1 / (1 + np.exp(-(1.5 - 1.2 * np.log(np.arange(1, 601)))))
    trials = np.full(xmax, 20000.0)
    hits = rng.binomial(20000, w @ h).astype(float)
    a, b = fit_rank_hits(hits, trials, w)
    assert abs(a - 1.5) < 0.15 and abs(b + 1.2) < 0.1


def test_arr_estimate_from_a_sample_covers_the_full_corpus_value() -> None:
    ds = two_models(n=4000, nq=600)
    q = np.arange(600)
    retrieved = {"status-quo": topk(ds.old_queries[q], ds.old_rows, 10)[0]}
    truth = topk(ds.new_queries[q], ds.new_rows, 10)[0]
    exact = recall(retrieved["status-quo"], truth).mean()
    covered = 0
    for seed in range(3):
        est, gain = ev.estimate_arr(ds, q, retrieved, 0.2, seed=seed, repeats=60)["status-quo"]
        assert gain.mean == 0.0  # the baseline against itself
        assert est.high - est.low < 0.25
        covered += est.low <= exact <= est.high
    assert covered >= 2, "the 95% interval should cover the full-corpus recall"


def test_bootstrap_intervals_and_paired_gains() -> None:
    rng = np.random.default_rng(2)
    a = rng.random(500)
    iv = bootstrap(a)
    assert iv.low < a.mean() < iv.high and iv.n == 500
    assert paired_gain(a + 0.05, a).low > 0.049  # a constant shift is certain
    assert paired_gain(a, a).low == 0.0 == paired_gain(a, a).high
    with pytest.raises(ValueError, match="same queries"):
        paired_gain(a, a[:10])


def test_decision_metric_needs_enough_labels() -> None:
    assert decision_metric(199) == "arr@10"
    assert decision_metric(200) == "success@10"
    assert decision_metric(50, min_labelled=10, k=5) == "success@5"


def test_gate_refuses_a_gain_that_is_not_significant() -> None:
    rng = np.random.default_rng(3)
    base = (rng.random(300) < 0.6).astype(float)
    flips = rng.random(300) < 0.1  # noise around the status quo, no real gain
    noisy = np.where(flips, 1 - base, base)
    sel = select_strategy({STATUS_QUO: base, "adapter:procrustes": noisy}, "success@10")
    assert sel.selected == STATUS_QUO
    assert "no strategy beats the status quo" in sel.reason
    row = {r.name: r for r in sel.rows}["adapter:procrustes"]
    assert not row.eligible and row.gain.low <= 0 <= row.gain.high


def test_gate_takes_the_best_significant_strategy() -> None:
    rng = np.random.default_rng(4)
    base = (rng.random(400) < 0.4).astype(float)
    better = np.maximum(base, (rng.random(400) < 0.3).astype(float))
    best = np.maximum(better, (rng.random(400) < 0.2).astype(float))
    sel = select_strategy({STATUS_QUO: base, "a": better, "b": best}, "success@10")
    assert sel.selected == "b"
    with pytest.raises(ValueError, match="status quo"):
        select_strategy({"a": better}, "success@10")


def test_calibration_is_monotone_in_rank() -> None:
    ranks = np.array([1, 1, 2, 2, 3, 3, 20, 20, 20, 20])
    relevant = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 0])  # rank 2 better than rank 1: pooled
    cal = fit_calibration(ranks, relevant, prior=0.0)
    p = np.array(cal.probs)
    assert (np.diff(p) <= 1e-12).all()
    assert cal.prob([1])[0] == cal.prob([2])[0] == pytest.approx(0.75)


def test_merge_prefers_calibrated_probability_and_is_the_strategy_without_natives() -> None:
    strat = np.array([[10, 11, 12, 13]])
    cal_s = Calibration(tuple(np.linspace(0.5, 0.1, 18)))
    cal_n = Calibration(tuple(np.linspace(0.9, 0.0, 18)))
    empty = np.zeros((1, 0), np.int64)
    assert merge(strat, empty, np.zeros((1, 0)), cal_s, cal_n, 3).tolist() == [[10, 11, 12]]
    nat = np.array([[20, 10, 21]])
    out = merge(strat, nat, np.array([[1.0, 2.0, 40.0]]), cal_s, cal_n, 3)
    assert out.tolist() == [[20, 10, 11]]  # native rank 1 (0.9) first; 10 once; rank-40 native last
    assert rank_fusion(strat, nat, 2).tolist() == [[10, 20]]


def test_migration_refuses_a_weak_adapter_serves_the_status_quo_and_never_falls_below_it() -> None:
    """New-model queries are much noisier than old-model ones (the text path is better), so
    the adapter loses to the status quo and is refused; the new model's *rows* are better, so
    the backfill helps. At every backfill share the served strategy's paired gain over the
    status quo has a lower bound ≥ 0, while the naive rank fusion dips below it."""
    ds = two_models(old_noise=0.9, new_noise=0.2, q_old=0.3, q_new=1.1, seed=5)
    fit = np.arange(0, 3000, 2)  # half of the rows pair up for fitting
    a = fit_adapter(ds.new_rows[fit], ds.old_rows[fit], FitOptions())
    test = ds.queries(False)
    res = ev.strategy_results(ds, test, {"adapter:procrustes": a}, depth=20)
    per = ev.metrics(ds, test, res)
    sel = select_strategy(
        {n: per[n]["success"] for n in (STATUS_QUO, "adapter:procrustes")}, "success@10"
    )
    assert sel.selected == STATUS_QUO

    def serve(q: np.ndarray) -> np.ndarray:
        return ev.strategy_results(ds, q, {}, depth=20)[STATUS_QUO]

    sample = np.zeros(len(ds.new_rows), bool)
    sample[fit] = True
    sample[ds.labels[ds.queries(True)]] = True  # the gate re-embeds the calibration rows too
    cals = ev.calibrate(ds, ds.queries(True), serve(ds.queries(True)), "success", sample, depth=20)
    order = np.random.default_rng(0).permutation(len(ds.new_rows))
    curve = ev.progressive(
        ds, STATUS_QUO, serve, "success", order, (0.0, 0.1, 0.25, 0.5, 1.0), cals, repeats=500
    )
    assert curve[0].served == STATUS_QUO
    for p in curve:
        assert p.gain_vs_status_quo["served"].low >= 0.0, p
    assert curve[-1].served == "merge" and curve[-1].gain_vs_status_quo["served"].low > 0
    assert (
        min(p.gain_vs_status_quo["rank-fusion"].mean for p in curve[1:]) < 0
    )  # what the guard prevents


def test_backfill_progress_counts_live_rows_by_state() -> None:
    from index_runtime.migration import backfill_progress

    alive = np.array([1, 1, 1, 1, 0, 1], bool)
    has_new = np.array([1, 0, 0, 0, 0, 1], bool)
    has_text = np.array([1, 1, 0, 1, 1, 0], bool)
    p, todo = backfill_progress(alive, has_new, has_text)
    assert (p.live, p.backfilled, p.todo, p.blocked) == (5, 2, 2, 1)
    assert todo.tolist() == [False, True, False, True, False, False]
    assert p.share == 0.4 and p.text_coverage == 0.8


@pytest.mark.parametrize(
    ("todo", "blocked", "gain", "auto", "force", "go", "reason"),
    [
        (3, 0, None, True, False, False, "BackfillRunning"),
        (0, 2, None, True, True, False, "RowsWithoutText"),  # force never loses rows
        (0, 0, (-0.2, -0.3, -0.1), True, False, False, "NativeWorse"),
        (0, 0, (-0.2, -0.3, -0.1), True, True, True, "CutOver"),
        (0, 0, (-0.01, -0.05, 0.03), True, False, True, "CutOver"),  # not significantly worse
        (0, 0, None, False, False, False, "AwaitingCutover"),
        (0, 0, None, True, False, True, "CutOver"),  # nothing to measure with (no labels)
    ],
)
def test_cutover_decision(
    todo: int, blocked: int, gain: Any, auto: bool, force: bool, go: bool, reason: str
) -> None:
    from index_runtime.migration import BackfillProgress, cutover_decision
    from index_runtime.quality.arr import Interval

    prog = BackfillProgress(100, 100 - todo - blocked, todo, blocked)
    d = cutover_decision(prog, Interval(*gain, 50) if gain else None, auto, force, "e5")
    assert (d.go, d.reason) == (go, reason), d.message


def test_calibration_round_trips_and_refuses_other_bins() -> None:
    cal = fit_calibration(np.array([1, 1, 2, 5, 30]), np.array([1, 1, 0, 1, 0]))
    assert Calibration.from_dict(cal.as_dict()) == cal
    bad = {**cal.as_dict(), "rank_edges": [1, 2, 3]}
    with pytest.raises(ValueError, match="other rank bins"):
        Calibration.from_dict(bad)


def test_merged_positions_at_share_zero_are_the_served_list() -> None:
    from index_runtime.service.migrate import merged_positions

    cal = fit_calibration(np.arange(1, 21)[None, :].repeat(5, 0), np.eye(5, 20, dtype=bool))
    served = np.arange(40).reshape(2, 20)
    out, _ = merged_positions(
        served,
        np.zeros((2, 0), np.int64),
        0.0,
        {"served": cal.as_dict(), "native": cal.as_dict()},
        10,
    )
    np.testing.assert_array_equal(out, served[:, :10])


# --- coordinated migrations (one shard of a sharded index) ------------------------------------


@pytest.mark.parametrize(
    ("todo", "blocked", "gain", "reason"),
    [
        (0, 0, None, "CoordinatedCutover"),  # would go: ready, held for the router
        (0, 0, (0.1, 0.05, 0.15), "CoordinatedCutover"),
        (3, 0, None, "BackfillRunning"),  # would not go: its own reason (not ready)
        (0, 2, None, "RowsWithoutText"),
        (0, 0, (-0.2, -0.3, -0.1), "NativeWorse"),
    ],
)
def test_a_coordinated_shard_never_cuts_over_on_its_own(
    todo: int, blocked: int, gain: Any, reason: str
) -> None:
    from index_runtime.migration import BackfillProgress, coordinated_cutover, cutover_decision
    from index_runtime.quality.arr import Interval

    prog = BackfillProgress(100, 100 - todo - blocked, todo, blocked)
    own = cutover_decision(prog, Interval(*gain, 50) if gain else None, True, False, "e5")
    d = coordinated_cutover(own)
    assert not d.go and d.reason == reason, d.message
    assert ("router" in d.message) == (reason == "CoordinatedCutover")


@pytest.mark.parametrize(
    ("phase", "selected", "text", "model", "backfilled", "strategy"),
    [
        ("Backfilled", STATUS_QUO, True, "new", True, "native"),
        ("Backfilled", STATUS_QUO, False, "new", True, "native"),
        ("Backfilled", "adapter:procrustes", False, "new", True, "native"),
        ("Backfilled", STATUS_QUO, False, "new", False, "refused"),  # rows still to re-encode
        ("Backfilling", STATUS_QUO, False, "new", True, "refused"),  # not Backfilled yet
        ("Backfilling", "adapter:procrustes", True, "new", True, "adapter:procrustes"),
        ("Backfilled", STATUS_QUO, True, None, True, STATUS_QUO),  # untagged: the index's model
        ("Backfilled", "adapter:procrustes", False, "old", True, STATUS_QUO),
        ("RolledBack", STATUS_QUO, False, "new", True, STATUS_QUO),
    ],
)
def test_strategy_for_answers_natively_once_backfilled(
    phase: str, selected: str, text: bool, model: str | None, backfilled: bool, strategy: str
) -> None:
    from index_runtime.service.migrate import strategy_for

    record = {"phase": phase, "to": "new", "selected": selected}
    assert strategy_for(record, text, model, backfilled) == strategy


def test_the_coordinated_option_is_validated_and_kept_in_the_record() -> None:
    from index_runtime.contract import MigrationRecord
    from index_runtime.errors import InvalidInputError
    from index_runtime.service.migrate import MigrationRequest

    req = MigrationRequest.from_json({"to_model": "new", "coordinated": True})
    assert req.coordinated and req.options()["coordinated"] is True
    rec = MigrationRecord(id="m", to_model="new", options=req.options())
    again = MigrationRecord.from_json(rec.to_json())
    assert again is not None and MigrationRequest.of_record(again).coordinated
    assert not MigrationRequest.from_json({"to_model": "new"}).coordinated
    for bad in ({"coordinated": "true"}, {"coordinated": True, "keep_merged": "if_better"}):
        with pytest.raises(InvalidInputError):
            MigrationRequest.from_json({"to_model": "new", **bad})
