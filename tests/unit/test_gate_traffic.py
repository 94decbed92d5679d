"""The gate's use of query traffic, without a server: the sampled queries' vectors travel in
the pairs object (texts do not), half of them is fitted on by every kind and named in the
adapter's provenance and the operator's status, and a pairs object of the previous release
(no traffic) still loads."""

from __future__ import annotations

import numpy as np

from index_operator.reconcile.migration import _strategies
from index_runtime.contract import MigrationRecord
from index_runtime.corpus import split_of
from index_runtime.service.migrate import (
    MigrationRequest,
    Pairs,
    encode_traffic,
    fit_adapters,
    traffic_split,
)


def _norm(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _pairs(n: int = 400) -> Pairs:
    rng = np.random.default_rng(0)
    old = _norm(rng.standard_normal((n, 12)))
    return Pairs([f"k{i}" for i in range(n)], [f"t{i}" for i in range(n)], old,
                 _norm(old[:, :8].copy()), 1.0, 7, [])  # fmt: skip


def _encoder(dim: int):  # type: ignore[no-untyped-def]
    def encode(texts: list[str], kind: str) -> np.ndarray:
        seeds = [sum(t.encode()) for t in texts]
        return np.stack([np.random.default_rng(s).standard_normal(dim) for s in seeds]).astype(np.float32)

    return encode


def test_traffic_is_encoded_by_both_models_split_in_halves_and_stored_without_texts() -> None:
    texts = [f"how do I query number {i}" for i in range(120)]
    p = encode_traffic(_pairs(), texts, _encoder(12), _encoder(8))
    assert p.q_old.shape == (120, 12) and p.q_new.shape == (120, 8)
    assert 30 < p.q_fit.sum() < 90 and np.array_equal(p.q_fit, traffic_split(texts))
    assert traffic_split(["same"] * 2).tolist() in ([True, True], [False, False])
    # the log keeps both spellings (it dedups exact texts); one in each half would put the
    # same query on both sides of the fit/measure split
    assert len(set(traffic_split(["Bike repair near me", "bike repair  near me"]))) == 1
    data = p.to_bytes()
    assert b"how do I query" not in data  # the texts never reach the object store
    back = Pairs.from_bytes(data)
    assert np.array_equal(back.q_new, p.q_new) and np.array_equal(back.q_fit, p.q_fit)
    fit_q = back.query_pairs(fit=True)
    assert fit_q is not None and len(fit_q[0]) == int(p.q_fit.sum())


def test_without_traffic_nothing_changes_and_old_objects_load() -> None:
    p = encode_traffic(_pairs(), [], _encoder(12), _encoder(8))
    assert p.query_pairs(fit=True) is None and p.query_pairs(fit=False) is None
    back = Pairs.from_bytes(p.to_bytes())
    assert back.query_pairs(fit=True) is None


def test_every_kind_is_fitted_on_the_traffic_half_and_says_so() -> None:
    texts = [f"q{i}" for i in range(80)]
    p = encode_traffic(_pairs(), texts, _encoder(12), _encoder(8))
    req = MigrationRequest("new", kinds=("procrustes", "lowrank"))  # rank: the API test
    fitted = fit_adapters(p, req)
    n_fit = sum(1 for k in p.keys if split_of(k) == "fit")
    for a in fitted.values():
        assert a.provenance["fitted_on"] == [f"pairs:{n_fit}", f"queries:{int(p.q_fit.sum())}"]
        assert a.provenance["query_pairs"] == int(p.q_fit.sum())
    plain = fit_adapters(_pairs(), req)
    assert all(a.provenance["fitted_on"] == [f"pairs:{n_fit}"] for a in plain.values())
    # the operator's status names it per strategy (and not for the status quo)
    rows = [{"name": "status-quo", "metric": {"mean": 0.3}, "gain": {"mean": 0, "low": 0, "high": 0},
             "eligible": True},
            {"name": "adapter:rank", "metric": {"mean": 0.4}, "gain": {"mean": 0.1, "low": 0.05,
             "high": 0.15}, "eligible": True, "fitted_on": ["pairs:240", "queries:41"]}]  # fmt: skip
    out = _strategies(MigrationRecord(strategies=tuple(rows)))
    assert "fittedOn" not in out[0] and out[1]["fittedOn"] == ["pairs:240", "queries:41"]


def test_a_query_an_encoder_refuses_is_left_out_not_fatal_to_the_migration() -> None:
    """Anyone who may search can put a text into the log; one the new model's encoder refuses
    for good (a 4xx) made SAMPLE fail, and the migration paused on an encoder that is fine."""
    from index_runtime.errors import EncoderRejectedError

    base = _encoder(8)

    def picky(texts: list[str], kind: str) -> np.ndarray:
        if any("\u2603" in t for t in texts):
            raise EncoderRejectedError("the encoder refused the input (400)")
        return base(texts, kind)

    texts = [f"q{i}" for i in range(60)]
    texts[17] = "snow \u2603 man"
    p = encode_traffic(_pairs(), texts, _encoder(12), picky)
    good = texts[:17] + texts[18:]
    assert p.q_old.shape == (59, 12) and p.q_new.shape == (59, 8)
    assert np.array_equal(p.q_fit, traffic_split(good))
    assert np.allclose(p.q_new[17], _norm(base([texts[18]], "query"))[0], atol=1e-6)
    # every text refused: no traffic, the rows alone (as with the log off)
    none = encode_traffic(_pairs(), ["\u2603"] * 3, _encoder(12), picky)
    assert none.query_pairs(fit=True) is None and none.query_pairs(fit=False) is None


def test_the_labelled_test_queries_are_not_fitted_on_when_users_also_searched_them() -> None:
    """Users who search with their evaluation queries put them in the query log; the gate
    fitted adapters on them and then measured those same queries as its held-out test."""
    labelled = [("where is the red door", "k1"), ("Bike repair  near me", "k2")]
    p = _pairs()
    p.labelled = list(labelled)
    traffic = [f"q{i}" for i in range(40)] + ["where is the red door", "bike repair near me"]
    out = encode_traffic(p, traffic, _encoder(12), _encoder(8))
    assert out.q_new.shape == (40, 8)
    assert np.array_equal(out.q_fit, traffic_split(traffic[:40]))
