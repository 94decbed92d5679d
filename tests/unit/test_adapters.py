"""Adapters recover known synthetic maps; artifacts round-trip; serving never imports torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from index_runtime.adapters import Adapter, FitOptions, fit_adapter
from index_runtime.adapters.artifact import from_bytes, to_bytes


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), max(rows, cols))))
    return q[:rows, :cols]


def _rel_err(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(pred - y) / np.linalg.norm(y - y.mean(0)))


def test_procrustes_recovers_a_rotation_with_offset_and_scale() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 48)).astype(np.float32) + 5.0  # far from the origin
    r = _orthonormal(rng, 48, 48)
    y = (x @ r * 0.3 + rng.normal(size=48)).astype(np.float32)
    a = fit_adapter(x[:2000], y[:2000], FitOptions(normalize=False))
    assert _rel_err(a.apply(x[2000:]), y[2000:]) < 1e-4


@pytest.mark.parametrize("d_new,d_old", [(64, 32), (32, 64)])
def test_procrustes_rectangular_is_a_partial_isometry(d_new: int, d_old: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, d_new)).astype(np.float32)
    p = _orthonormal(rng, d_new, d_old)
    y = (x @ p).astype(np.float32)
    if d_new < d_old:  # the old space is bigger: the map is exact
        a = fit_adapter(x, y, FitOptions(normalize=False))
        assert _rel_err(a.apply(x), y) < 1e-4
    else:  # projection: exact up to the RMS-spread rescaling of the dropped variance
        a = fit_adapter(x, y, FitOptions(normalize=False))
        # exact in expectation; with finite samples Xᵀ·X ≠ n·I perturbs the polar factor
        cos = (
            np.sum(a.apply(x) * y, 1)
            / np.linalg.norm(a.apply(x), axis=1)
            / np.linalg.norm(y, axis=1)
        )
        assert np.median(cos) > 0.99 and cos.min() > 0.95
    assert a.M is not None
    s = np.linalg.svd(a.M, compute_uv=False)
    assert np.allclose(s, s[0], rtol=1e-3)  # singular values all equal: a scaled isometry


def test_lowrank_recovers_a_low_rank_affine_map() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 64)).astype(np.float32)
    w = (rng.normal(size=(64, 8)) @ rng.normal(size=(8, 40))).astype(np.float32)
    y = (x @ w + 2.0).astype(np.float32)
    a = fit_adapter(
        x[:3000], y[:3000], FitOptions(kind="lowrank", rank=8, ridge=1e-6, normalize=False)
    )
    assert a.A is not None and a.A.shape == (64, 8)
    assert _rel_err(a.apply(x[3000:]), y[3000:]) < 1e-3
    low = fit_adapter(x[:3000], y[:3000], FitOptions(kind="lowrank", rank=4, normalize=False))
    assert _rel_err(low.apply(x[3000:]), y[3000:]) > 0.1  # rank 4 cannot express a rank-8 map


def test_residual_mlp_recovers_a_nonlinear_warp_procrustes_cannot() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5000, 8)).astype(np.float32)
    r = _orthonormal(rng, 8, 8)
    y = (x @ r + 0.4 * np.tanh(x[:, ::-1])).astype(np.float32)  # rotation + per-axis warp
    tr, te = slice(0, 4000), slice(4000, None)
    lin = fit_adapter(x[tr], y[tr], FitOptions(normalize=False))
    mlp = fit_adapter(x[tr], y[tr], FitOptions(kind="mlp", hidden=64, lr=3e-3, normalize=False))
    e_lin, e_mlp = _rel_err(lin.apply(x[te]), y[te]), _rel_err(mlp.apply(x[te]), y[te])
    assert e_lin > 0.15  # no linear map can express the warp
    assert e_mlp < 0.02  # held-out error of the residual MLP
    assert mlp.provenance["epochs"] >= 1


def test_mlp_fit_is_deterministic_with_a_seed() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = np.sin(x).astype(np.float32)
    opts = FitOptions(kind="mlp", hidden=16, epochs=5)
    a, b = fit_adapter(x, y, opts), fit_adapter(x, y, opts)
    assert a.W1 is not None and b.W1 is not None
    assert np.array_equal(a.W1, b.W1)


def test_diagonal_scaling_fixes_per_dimension_gains() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    gains = np.linspace(0.2, 3.0, 24).astype(np.float32)
    y = (x @ _orthonormal(rng, 24, 24) * gains).astype(np.float32)
    plain = fit_adapter(x, y, FitOptions(normalize=False))
    diag = fit_adapter(x, y, FitOptions(diagonal=True, normalize=False))
    assert _rel_err(diag.apply(x), y) < 0.9 * _rel_err(plain.apply(x), y)
    assert diag.diagonal and not plain.diagonal


def test_cosine_outputs_are_unit_vectors_and_single_rows_work() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    y = rng.normal(size=(500, 20)).astype(np.float32)
    for kind in ("procrustes", "lowrank"):
        a = fit_adapter(x, y, FitOptions(kind=kind, rank=6))
        out = a.apply(x)
        assert out.shape == (500, 20)
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert np.allclose(a.apply(x[3]), out[3], atol=1e-6)


@pytest.mark.parametrize("kind", ["procrustes", "lowrank", "mlp"])
def test_artifact_round_trips_with_provenance(kind: str) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    y = rng.normal(size=(300, 14)).astype(np.float32)
    a = fit_adapter(x, y, FitOptions(kind=kind, rank=4, hidden=8, epochs=3, diagonal=True))
    a.provenance.update(new_model="e5", old_model="minilm", arr={"estimate": 0.4, "low": 0.35})
    b = from_bytes(to_bytes(a))
    assert (b.kind, b.src_dim, b.dst_dim, b.diagonal) == (kind, 10, 14, True)
    assert b.provenance["arr"] == {"estimate": 0.4, "low": 0.35}
    assert b.provenance["pairs"] == 300 and "numpy" in b.provenance["versions"]
    assert np.array_equal(a.apply(x), b.apply(x))


def test_bad_inputs_are_refused() -> None:
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="same rows"):
        fit_adapter(x, np.zeros((9, 4), np.float32))
    with pytest.raises(ValueError, match="finite"):
        fit_adapter(np.full((10, 4), np.nan, np.float32), x)
    with pytest.raises(ValueError, match="kind"):
        FitOptions(kind="transformer")
    a = fit_adapter(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="dimension 4"):
        a.apply(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="not a driftless adapter"):
        from safetensors.numpy import save

        from_bytes(save({"c": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match="either"):
        Adapter("procrustes", 2, 2, True, c=np.zeros(2, np.float32))


def test_loading_and_applying_an_adapter_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from index_runtime.adapters import fit_adapter, FitOptions\n"
        "from index_runtime.adapters.artifact import to_bytes, from_bytes\n"
        "x = np.random.default_rng(0).normal(size=(50, 6)).astype('f4')\n"
        "a = from_bytes(to_bytes(fit_adapter(x, x[:, ::-1].copy(), FitOptions(kind='lowrank', rank=3))))\n"
        "a.apply(x)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
