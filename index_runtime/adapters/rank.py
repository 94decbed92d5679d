"""The ranking-distilled adapter (kind ``rank``): a linear map ``y = x·M + c`` (the serving
form of Procrustes, so the query path is unchanged) trained so that the *new* model's ranking
survives in the old space.

For each training query ``q`` (a new-model vector: a sampled row's own passage vector, or the
text of a real query encoded by the new model) the targets are the new model's exact top-k
over a *pool* of the sampled rows (all of them up to ``pool``, else a seeded random subset).
The candidates are every row of the pool — so the new model's nearest rows, random rows, and
the rows the current map wrongly puts on top in the old space (the hard negatives a
neighbours-plus-random candidate list misses: with those alone the loss fell while the
held-out top-k agreement did not move). The loss is the listwise cross-entropy between the
uniform distribution over the targets and ``softmax(cos(normalize(q·M + c), y_j) / T)`` over
the candidates in the old space (``y_j`` the rows' old vectors), with the temperature ``T``
learned (log-parametrised). Training starts at the Procrustes solution; the held-out split of
the queries (10%: rows' own vectors and traffic queries alike) stops it: the kept epoch is the
one with the best held-out top-k agreement over the pool (equal agreement: the lower held-out
loss), patience counted in epochs without a better one. The Procrustes start is epoch 0, so
the fit is never worse than Procrustes on the held-out queries (the loss alone is not enough:
it keeps falling by sharpening lists that already agree).

Cost per epoch: about 3 × queries × pool × d_old multiply-adds (4,000 × 4,000 × 384: ~20
GFLOP, seconds on one core). Deterministic given the seed: the pool, the split and the batch
order come from seeded generators, and the fit runs on one torch thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.quality.arr import topk

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RankOptions:
    k: int = 10  # targets per query: the new model's top-k over the pool
    pool: int = 4000  # candidate rows (all of them are scored for every query)
    epochs: int = 60
    patience: int = 8
    batch: int = 128
    lr: float = 1e-3
    temperature: float = 0.05  # initial T (learned)
    held_out: float = 0.1  # share of the queries that stops the training
    seed: int = 0
    normalize: bool = True  # cosine old space


def candidates(q_new: F32, rows_new: F32, k: int, neighbours: int) -> I64:
    """Per query, the new model's ``max(k, neighbours)`` nearest rows, best first (the first
    ``k`` are the targets)."""
    return topk(q_new, rows_new, max(k, neighbours))[0]


def agreement(mapped: F32, rows_old: F32, targets: I64) -> float:
    """Mean share of each query's targets (new-model top-k over the rows) found in the old
    space's top-k of its mapped vector: the label-free ARR on the sampled rows."""
    k = targets.shape[1]
    got = topk(mapped, rows_old, k)[0]
    return float((got[:, :, None] == targets[:, None, :]).any(axis=2).mean())


def fit_rank(
    rows_new: F32,
    rows_old: F32,
    q_new: F32,
    m0: F32,
    c0: F32,
    opts: RankOptions,
) -> tuple[F32, F32, dict[str, Any]]:
    """Train (M, c) from the Procrustes start (``m0``, ``c0``) on the queries ``q_new`` over the
    rows (``rows_new`` and ``rows_old``: the same items in both spaces). Returns the map and
    what the fit did (epochs, temperature, held-out loss and top-k agreement before/after)."""
    import torch

    rng = np.random.default_rng(opts.seed)
    if len(rows_new) > opts.pool:
        keep = np.sort(rng.choice(len(rows_new), opts.pool, replace=False))
        rows_new, rows_old = rows_new[keep], rows_old[keep]
    n = len(rows_new)
    k = min(opts.k, n - 1)
    if k < 1 or len(q_new) < 4:
        raise ValueError("the rank fit needs at least 2 rows and 4 queries")
    cand = candidates(q_new, rows_new, k, k)  # the targets, best first
    order = rng.permutation(len(q_new))
    n_val = max(2, round(len(q_new) * opts.held_out))
    val, tr = order[:n_val], order[n_val:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions; the gate runs one thread per fit
    try:
        torch.manual_seed(opts.seed)
        gen = torch.Generator().manual_seed(opts.seed)
        tq = torch.from_numpy(np.ascontiguousarray(q_new, np.float32))
        ty = torch.from_numpy(np.ascontiguousarray(rows_old, np.float32))
        tt = torch.from_numpy(cand)
        m = torch.nn.Parameter(torch.from_numpy(m0.astype(np.float32).copy()))
        c = torch.nn.Parameter(torch.from_numpy(c0.astype(np.float32).copy()))
        log_t = torch.nn.Parameter(torch.tensor(float(np.log(opts.temperature))))
        opt = torch.optim.Adam([m, c, log_t], lr=opts.lr)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            y = tq[idx] @ m + c
            if opts.normalize:
                y = torch.nn.functional.normalize(y, dim=1)
            s = (y @ ty.T) / log_t.exp()  # (b, pool)
            logp = s - torch.logsumexp(s, dim=1, keepdim=True)
            return -torch.gather(logp, 1, tt[idx]).mean()

        tval = torch.from_numpy(val)
        val_targets = torch.from_numpy(cand[val])

        def held_out() -> tuple[float, float]:
            """(agreement, -loss) on the held-out queries: larger is better."""
            with torch.no_grad():
                y = tq[tval] @ m + c
                top = torch.topk(y @ ty.T, k, dim=1).indices  # normalizing: same order
                agree = (top[:, :, None] == val_targets[:, None, :]).any(dim=2).float().mean()
                return float(agree), -float(loss_of(tval))

        def state() -> tuple[torch.Tensor, torch.Tensor, float]:
            return m.detach().clone(), c.detach().clone(), float(log_t.detach())

        best = held_out()
        start_loss = best
        best_state = state()
        bad, ran = 0, 0
        ttr = torch.from_numpy(tr)
        for epoch in range(1, opts.epochs + 1):
            ran = epoch
            for idx in ttr[torch.randperm(len(ttr), generator=gen)].split(opts.batch):  # type: ignore[no-untyped-call]
                opt.zero_grad()
                loss = loss_of(idx)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
            v = held_out()
            if v > best:
                best, bad = v, 0
                best_state = state()
            else:
                bad += 1
                if bad >= opts.patience:
                    break
    finally:
        torch.set_num_threads(threads)
    m_out = best_state[0].numpy().copy()
    c_out = best_state[1].numpy().copy()
    targets = cand[val]

    def mapped(mm: F32, cc: F32) -> F32:
        y = np.asarray(q_new[val] @ mm + cc, np.float32)
        if opts.normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    info = {
        "epochs": ran,
        "temperature": float(np.exp(best_state[2])),
        "queries": len(q_new),
        "pool_rows": n,
        "held_out_queries": len(val),
        "held_out_loss": {"start": -start_loss[1], "best": -best[1]},
        "held_out_agreement": {
            "start": agreement(mapped(m0, c0), rows_old, targets),
            "best": agreement(mapped(m_out, c_out), rows_old, targets),
        },
        "torch": torch.__version__,
    }
    return m_out.astype(np.float32), c_out.astype(np.float32), info
