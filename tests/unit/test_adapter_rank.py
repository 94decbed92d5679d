"""The ranking-distilled adapter (kind ``rank``): where the old space is a known non-orthogonal
linear image of the new one, the map that preserves the new model's *ranking* is ``B^{-T}``,
not the vector-reproducing ``B`` (what least squares finds) nor its nearest isometry (what
Procrustes finds). The listwise fit must move from Procrustes towards it."""

from __future__ import annotations

import numpy as np
import pytest

from index_runtime.adapters import FitOptions, fit_adapter
from index_runtime.adapters.artifact import from_bytes, to_bytes
from index_runtime.adapters.rank import agreement, candidates

D, N = 32, 1500


def _norm(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = _norm(rng.standard_normal((N, D)))
    u, _ = np.linalg.qr(rng.standard_normal((D, D)))
    v, _ = np.linalg.qr(rng.standard_normal((D, D)))
    b = (u * np.geomspace(0.3, 3, D)) @ v.T  # condition number 10
    y = _norm(x @ b)
    q = _norm(x[:300] + 0.3 * rng.standard_normal((300, D)).astype(np.float32))
    return {"x": x, "y": y, "q": q, "b": b, "targets": candidates(q, x, 10, 10)}


@pytest.fixture(scope="module")
def fitted(world: dict[str, np.ndarray]) -> dict[str, object]:
    small = FitOptions(kind="rank", seed=3, rank_epochs=3)
    return {
        "procrustes": fit_adapter(world["x"], world["y"]),
        "rank": fit_adapter(
            world["x"], world["y"], FitOptions(kind="rank", seed=3, rank_epochs=20, lr=1e-2)
        ),
        "small": fit_adapter(world["x"][:400], world["y"][:400], small),
        "small-again": fit_adapter(world["x"][:400], world["y"][:400], small),
    }


def _agree(world: dict[str, np.ndarray], mapped: np.ndarray) -> float:
    return agreement(mapped, world["y"], world["targets"])


def test_rank_beats_procrustes_on_top_k_agreement(world: dict, fitted: dict) -> None:
    procrustes = _agree(world, fitted["procrustes"].apply(world["q"]))
    rank = _agree(world, fitted["rank"].apply(world["q"]))
    oracle = _agree(world, _norm(world["q"] @ np.linalg.inv(world["b"]).T))
    # measured: procrustes 0.48, rank 0.55, oracle 0.60 (held-out queries: noisy rows)
    assert rank > procrustes + 0.04
    assert rank <= oracle + 0.02
    info = fitted["rank"].provenance
    assert info["held_out_agreement"]["best"] > info["held_out_agreement"]["start"]
    assert info["temperature"] != pytest.approx(0.05)  # learned, not the initial value


def test_least_squares_is_the_wrong_target_for_ranking(world: dict) -> None:
    """Why the kind exists: the MSE-optimal linear map ranks worse than Procrustes here."""
    ls = fit_adapter(world["x"], world["y"], FitOptions(kind="lowrank", rank=D))
    procrustes = fit_adapter(world["x"], world["y"])
    assert _agree(world, ls.apply(world["q"])) < _agree(world, procrustes.apply(world["q"]))


def test_rank_fit_is_deterministic_and_serves_like_procrustes(fitted: dict) -> None:
    a, b = fitted["small"], fitted["small-again"]
    assert np.array_equal(a.M, b.M) and np.array_equal(a.c, b.c)
    assert a.kind == "rank" and a.W1 is None and a.A is None  # one dense map: y = x·M + c
    back = from_bytes(to_bytes(a))
    assert back.kind == "rank" and np.array_equal(back.M, a.M)
    assert back.provenance["epochs"] == a.provenance["epochs"]


def test_a_fit_that_cannot_improve_returns_procrustes() -> None:
    """Old = an exact rotation of new: Procrustes is already perfect, early stopping keeps it
    (the held-out loss is measured at the start, epoch 0)."""
    rng = np.random.default_rng(5)
    x = _norm(rng.standard_normal((600, 16)))
    r, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    y = _norm(x @ r)
    a = fit_adapter(x, y, FitOptions(kind="rank", rank_epochs=8))
    p = fit_adapter(x, y)
    q = _norm(x[:100] + 0.2 * rng.standard_normal((100, 16)).astype(np.float32))
    t = candidates(q, x, 10, 10)
    assert agreement(a.apply(q), y, t) >= agreement(p.apply(q), y, t) - 0.01


def test_query_pairs_are_fitted_on_and_counted() -> None:
    rng = np.random.default_rng(6)
    x = _norm(rng.standard_normal((300, 8)))
    y = _norm(x[:, ::-1].copy())
    qx = _norm(rng.standard_normal((40, 8)))
    a = fit_adapter(x, y, FitOptions(kind="rank", rank_epochs=2), query_pairs=(qx, _norm(qx[:, ::-1].copy())))
    assert a.provenance["pairs"] == 300 and a.provenance["query_pairs"] == 40
    assert a.provenance["queries"] == 300 + 40  # few real queries: the rows' vectors too
    many = _norm(rng.standard_normal((60, 8)))
    b = fit_adapter(x, y, FitOptions(kind="rank", rank_epochs=2), query_pairs=(many, _norm(many[:, ::-1].copy())))
    assert b.provenance["queries"] == 60  # enough real queries: only those
    with pytest.raises(ValueError, match="same rows"):
        fit_adapter(x, y, query_pairs=(qx, qx[:5]))


@pytest.mark.parametrize("kind", ["procrustes", "rank"])
def test_query_pairs_of_another_dimension_are_refused_not_reshaped(kind: str) -> None:
    """(10, 8) query vectors against 4-dimensional rows were reshaped into 20 pairs of
    4-dimensional garbage and fitted on."""
    rng = np.random.default_rng(8)
    x, y = _norm(rng.standard_normal((120, 4))), _norm(rng.standard_normal((120, 5)))
    bad = (rng.standard_normal((10, 8)), rng.standard_normal((10, 10)))
    with pytest.raises(ValueError, match=r"\(n, 4\) and \(n, 5\)"):
        fit_adapter(x, y, FitOptions(kind=kind, rank_epochs=1), query_pairs=bad)
    with pytest.raises(ValueError, match="same rows"):
        fit_adapter(x, y, FitOptions(kind=kind, rank_epochs=1), query_pairs=(bad[0][:, :4], y[:7]))
