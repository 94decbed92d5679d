"""Fitting drift adapters on (new, old) vector pairs of the same items.

All three maps are fitted on centered data, and ``y`` is rebuilt in the old space's own
location and spread, so an anisotropic model (E5's vectors share a large common component)
does not defeat the map:

* **procrustes** — ``y = μ_old + s·R·(x − μ_new)``, ``s = σ_old/σ_new`` (RMS spread) and ``R``
  the orthogonal Procrustes solution ``U·Vᵀ`` of ``svd(Xcᵀ·Yc)``. For different dimensions
  (the paper defines only the square case) ``R`` is the closest *partial isometry*: a
  ``d_new × d_old`` matrix with orthonormal columns (``d_new ≥ d_old``: a rotation followed
  by a projection) or orthonormal rows (``d_new < d_old``: a rotation into a subspace). It
  is the same closed form, ``U·Vᵀ`` of the thin SVD.
* **lowrank** — an affine map of rank ``r``: reduced-rank ridge regression (ridge solution,
  projected on the top-``r`` principal directions of its fitted values), the exact MSE
  optimum among rank-``r`` maps for the ridge-regularized problem. Deterministic, no SGD.
* **mlp** — the Procrustes map plus a residual ``W2·GELU(W1·x + b1) + b2`` (256 hidden),
  trained with Adam on MSE (torch, fixed seed, early stopping on 10% of the pairs). The
  paper's skip is the identity, which presumes the two spaces are already aligned; between
  unrelated models (and for different dimensions) the skip here is the Procrustes map, of
  which the identity is the special case. ``W2`` starts at zero, so training starts at
  Procrustes and can only move where the data say so.
* **rank** — the Procrustes map trained further with a listwise loss so the new model's
  top-k over the sampled rows comes first in the old space (:mod:`.rank`; torch, fixed seed).
* **query pairs** (any kind): texts of real queries encoded by both models are fitted on
  alongside the row pairs; for ``rank`` they are also training queries (query-side vectors,
  which the rows' passage vectors are not).
* **diagonal scaling** (any kind): per-output-dimension gains fitted by least squares after
  the map, folded into the map.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.adapters.model import F32, Adapter

KINDS = ("procrustes", "lowrank", "mlp", "rank")
DEFAULT_KINDS = ("procrustes", "lowrank", "mlp")  # what a migration fits unless asked
RANK_MIN_QUERIES = 50  # query pairs from which rank trains on real queries only


@dataclass(frozen=True)
class FitOptions:
    kind: str = "procrustes"
    diagonal: bool = False
    rank: int = 64
    hidden: int = 256
    ridge: float = 1e-3  # relative to the mean eigenvalue of XᵀX
    seed: int = 0
    epochs: int = 200
    patience: int = 10
    batch: int = 256
    lr: float = 1e-3  # Adam, mlp and rank
    normalize: bool = True  # cosine old space: outputs re-normalized
    rank_queries: int = 4000  # rank: training queries drawn from the rows (+ all query pairs)
    rank_epochs: int = 60  # rank: epochs at most (early stopping on held-out queries)
    rank_k: int = 10  # rank: the top-k that should agree (the gate passes its k)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if self.rank < 1 or self.hidden < 1:
            raise ValueError("rank and hidden must be positive")
        if min(self.rank_queries, self.rank_epochs, self.rank_k) < 1:
            raise ValueError("rank_queries, rank_epochs and rank_k must be positive")


def _centered(m: F32) -> tuple[F32, F32, float]:
    mu = m.mean(axis=0)
    mc = m - mu
    spread = float(np.sqrt((mc * mc).sum(axis=1).mean())) or 1.0
    return mc, mu, spread


def procrustes(x: F32, y: F32) -> tuple[F32, F32]:
    """(M, c) with y ≈ x·M + c; M = (σ_y/σ_x)·R, R a (partial) isometry."""
    xc, mx, sx = _centered(x)
    yc, my, sy = _centered(y)
    u, _, vt = np.linalg.svd(xc.T.astype(np.float64) @ yc.astype(np.float64), full_matrices=False)
    m = (u @ vt * (sy / sx)).astype(np.float32)
    return m, (my - mx @ m).astype(np.float32)


def lowrank(x: F32, y: F32, rank: int, ridge: float) -> tuple[F32, F32, F32]:
    """(A, B, c) with y ≈ x·A·B + c, rank(A·B) ≤ rank."""
    xc, mx, _ = _centered(x)
    yc, my, _ = _centered(y)
    x64, y64 = xc.astype(np.float64), yc.astype(np.float64)
    gram = x64.T @ x64
    lam = ridge * float(np.trace(gram)) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x64.T @ y64)
    _, _, vt = np.linalg.svd(x64 @ w, full_matrices=False)
    v = vt[: min(rank, vt.shape[0])].T
    a = (w @ v).astype(np.float32)
    b = v.T.astype(np.float32)
    return a, b, (my - (mx @ a) @ b).astype(np.float32)


def _residual_mlp(
    x: F32, y: F32, base: F32, opts: FitOptions
) -> tuple[F32, F32, F32, F32, dict[str, Any]]:
    """Fit ``W2·GELU(W1·x + b1) + b2`` to ``y − base`` (torch is imported here only)."""
    import torch

    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(x))
    n_val = max(1, len(x) // 10)
    val, tr = order[:n_val], order[n_val:]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y - base)
    w1 = torch.nn.Linear(x.shape[1], opts.hidden)
    w2 = torch.nn.Linear(opts.hidden, y.shape[1])
    torch.nn.init.zeros_(w2.weight)
    torch.nn.init.zeros_(w2.bias)
    net = torch.nn.Sequential(w1, torch.nn.GELU(approximate="tanh"), w2)
    opt = torch.optim.Adam(net.parameters(), lr=opts.lr)
    best, best_state, bad, ran = float("inf"), None, 0, 0
    gen = torch.Generator().manual_seed(opts.seed)
    tr_t = torch.from_numpy(tr)
    for epoch in range(1, opts.epochs + 1):
        ran = epoch
        net.train()
        for idx in tr_t[torch.randperm(len(tr_t), generator=gen)].split(opts.batch):  # type: ignore[no-untyped-call]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(tx[idx]), ty[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float(torch.nn.functional.mse_loss(net(tx[val]), ty[val]))
        if v < best - 1e-7:
            best, bad = v, 0
            best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
        else:
            bad += 1
            if bad >= opts.patience:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    info = {"epochs": ran, "val_mse": best, "torch": torch.__version__}
    return (
        w1.weight.detach().numpy().T.copy(),
        w1.bias.detach().numpy().copy(),
        w2.weight.detach().numpy().T.copy(),
        w2.bias.detach().numpy().copy(),
        info,
    )


def _versions() -> dict[str, str]:
    out = {"numpy": np.__version__}
    for pkg in ("driftless", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def fit_adapter(
    new: npt.ArrayLike,
    old: npt.ArrayLike,
    opts: FitOptions | None = None,
    query_pairs: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> Adapter:
    """Fit a map from ``new`` vectors (n, d_new) to ``old`` vectors (n, d_old) of the same items
    (rows), plus optionally ``query_pairs``: (new, old) vectors of the same query texts."""
    opts = opts or FitOptions()
    rows_x = np.ascontiguousarray(new, dtype=np.float32)
    rows_y = np.ascontiguousarray(old, dtype=np.float32)
    qx = np.zeros((0, rows_x.shape[-1]), np.float32)
    qy = np.zeros((0, rows_y.shape[-1]), np.float32)
    if query_pairs is not None:
        qx = np.ascontiguousarray(query_pairs[0], dtype=np.float32)
        qy = np.ascontiguousarray(query_pairs[1], dtype=np.float32)
        # each space's dimension must match the rows' (a reshape would silently turn
        # vectors of another dimension into more, wrong, pairs)
        dx, dy = rows_x.shape[-1], rows_y.shape[-1]
        if qx.shape[1:] != (dx,) or qy.shape[1:] != (dy,) or len(qx) != len(qy):
            raise ValueError(
                f"query pairs must be (n, {dx}) and (n, {dy}) matrices with the same rows, "
                f"got {qx.shape} and {qy.shape}"
            )
    x, y = np.vstack([rows_x, qx]), np.vstack([rows_y, qy])
    if x.ndim != 2 or y.ndim != 2 or len(rows_x) != len(rows_y):
        raise ValueError(
            f"pairs must be two matrices with the same rows, got {rows_x.shape} and {rows_y.shape}"
        )
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("need at least 2 finite pairs")
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    params: dict[str, Any] = {}
    pred: F32
    if opts.kind == "lowrank":
        a, b, c = lowrank(x, y, opts.rank, opts.ridge)
        params.update(A=a, B=b, c=c)
        pred = np.asarray((x @ a) @ b + c, dtype=np.float32)
    else:
        m, c = procrustes(x, y)
        params.update(M=m, c=c)
        pred = np.asarray(x @ m + c, dtype=np.float32)
        if opts.kind == "mlp":
            w1, b1, w2, b2, info = _residual_mlp(x, y, pred, opts)
            params.update(W1=w1, b1=b1, W2=w2, c=(c + b2).astype(np.float32))
            pred = pred + _np_mlp(x, w1, b1, w2, b2)
        elif opts.kind == "rank":
            m, c, info = _rank(rows_x, rows_y, qx, m, c, opts)
            params.update(M=m, c=c)
            pred = np.asarray(x @ m + c, dtype=np.float32)
    if opts.diagonal:
        g = ((pred * y).sum(axis=0) / np.maximum((pred * pred).sum(axis=0), 1e-12)).astype(
            np.float32
        )
        for name in ("M", "B", "W2", "c"):
            if name in params:
                params[name] = (params[name] * g).astype(np.float32)
    provenance = {
        "kind": opts.kind,
        "options": asdict(opts),
        "pairs": len(rows_x),
        "query_pairs": len(qx),
        "fit_seconds": time.perf_counter() - t0,
        "versions": _versions(),
        **info,
    }
    return Adapter(
        kind=opts.kind,
        src_dim=x.shape[1],
        dst_dim=y.shape[1],
        normalize=opts.normalize,
        diagonal=opts.diagonal,
        provenance=provenance,
        **params,
    )


def _rank(rows_x: F32, rows_y: F32, qx: F32, m: F32, c: F32, opts: FitOptions
          ) -> tuple[F32, F32, dict[str, Any]]:  # fmt: skip
    """Training queries: the query pairs' new vectors when there are at least
    ``RANK_MIN_QUERIES`` of them (real queries); else up to ``rank_queries`` rows' own passage
    vectors plus the few query pairs. Measured on the benchmark (MiniLM -> E5, tuning half of
    the calibration queries): rows' passage vectors as queries left ARR@10 at Procrustes' or
    below it (their neighbourhoods are not a query's), real queries alone lifted it."""
    from index_runtime.adapters.rank import RankOptions, fit_rank

    if len(qx) >= RANK_MIN_QUERIES:
        queries = qx
    else:
        rng = np.random.default_rng(opts.seed)
        pick = rng.permutation(len(rows_x))[: opts.rank_queries]
        queries = np.vstack([rows_x[np.sort(pick)], qx])
    ro = RankOptions(k=opts.rank_k, epochs=opts.rank_epochs, lr=opts.lr, seed=opts.seed,
                     normalize=opts.normalize)  # fmt: skip
    return fit_rank(rows_x, rows_y, queries, m, c, ro)


def _np_mlp(x: F32, w1: F32, b1: F32, w2: F32, b2: F32) -> F32:
    from index_runtime.adapters.model import gelu

    return np.asarray(gelu(x @ w1 + b1) @ w2 + b2, dtype=np.float32)
