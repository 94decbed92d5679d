"""A model migration inside the runtime, up to *Bridged*: sample rows with text from the
served view, encode them with the new model, fit adapters on the fit split, measure every
strategy on held-out queries, and return the record the manifest publishes. The decision
itself is :func:`index_runtime.migration.select_strategy` (pure); this module is the glue.

Queries: the caller's labelled queries (text + the key they should find) when there are at
least ``min_labelled`` of them (metric Success@k), else the texts of sampled test-split rows
(metric ARR@k, estimated from the sampled rows' new vectors: ``quality.arr.estimate_arr``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.adapters import KINDS, Adapter, FitOptions, fit_adapter
from index_runtime.corpus import split_of
from index_runtime.encoders import Kind
from index_runtime.errors import InvalidInputError
from index_runtime.index.view import View
from index_runtime.migration import (
    STATUS_QUO,
    decision_metric,
    select_from_intervals,
    select_strategy,
)
from index_runtime.quality.arr import estimate_arr, success, topk

Encode = Callable[[list[str], Kind], npt.NDArray[np.float32]]
Progress = Callable[[str, str], None]  # (phase, message)


@dataclass(frozen=True)
class MigrationRequest:
    to_model: str
    kinds: tuple[str, ...] = KINDS
    diagonal: bool = False
    pairs: int = 20_000
    min_labelled: int = 200
    k: int = 10
    seed: int = 0
    labelled: tuple[tuple[str, int | str], ...] = field(default=())

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> MigrationRequest:
        known = {"to_model", "kinds", "diagonal", "pairs", "min_labelled", "k", "seed", "labelled"}
        extra = set(d) - known
        if extra:
            raise InvalidInputError(f"unknown migration fields: {sorted(extra)}")
        if not isinstance(d.get("to_model"), str) or not d["to_model"]:
            raise InvalidInputError("to_model (the new model's name) is required")
        kinds = tuple(d.get("kinds", KINDS))
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise InvalidInputError(
                f"kinds must be a non-empty subset of {list(KINDS)}, got {bad or kinds}"
            )
        pairs, min_l, k = (
            int(d.get("pairs", 20_000)),
            int(d.get("min_labelled", 200)),
            int(d.get("k", 10)),
        )
        if pairs < 50:
            raise InvalidInputError(f"pairs must be at least 50, got {pairs}")
        if not 1 <= k <= 100 or min_l < 1:
            raise InvalidInputError("k must be 1..100 and min_labelled at least 1")
        labelled = []
        for item in d.get("labelled", ()):
            if (
                not isinstance(item, Mapping)
                or not isinstance(item.get("text"), str)
                or "key" not in item
            ):
                raise InvalidInputError("each labelled query is {'text': str, 'key': <row key>}")
            labelled.append((item["text"], item["key"]))
        return MigrationRequest(
            d["to_model"],
            kinds,
            bool(d.get("diagonal", False)),
            pairs,
            min_l,
            k,
            int(d.get("seed", 0)),
            tuple(labelled),
        )


def adapter_name(kind: str, diagonal: bool) -> str:
    return f"adapter:{kind}{'+diag' if diagonal else ''}"


def _normalized(m: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12), np.float32)


def sample_rows(
    view: View, want: int, rng: np.random.Generator
) -> tuple[list[int], list[str], float]:
    """Up to ``want`` random live positions that have text, their texts, and the share of
    inspected live rows that had text (the backfill's coverage estimate)."""
    alive = np.flatnonzero(view.alive)
    rng.shuffle(alive)
    pos: list[int] = []
    texts: list[str] = []
    seen = 0
    for p in alive.tolist():
        seen += 1
        t = view.row(p, payload=True)["text"]
        if t:
            pos.append(p)
            texts.append(t)
            if len(pos) >= want:
                break
    return pos, texts, (len(pos) / seen if seen else 0.0)


def run_gate(
    view: View,
    from_model: str,
    encode_old: Encode,
    encode_new: Encode,
    req: MigrationRequest,
    progress: Progress = lambda phase, msg: None,
) -> tuple[dict[str, Any], Adapter | None]:
    rng = np.random.default_rng(req.seed)
    t0 = time.time()
    progress("SamplingPairs", f"sampling up to {req.pairs} rows with text")
    pos, texts, coverage = sample_rows(view, req.pairs, rng)
    if len(pos) < 50:
        raise InvalidInputError(
            f"only {len(pos)} live rows have text; a migration needs at least 50 to measure"
        )
    keys = [view.row(p)["key"] for p in pos]
    split = np.array([split_of(str(k)) for k in keys])
    new = _normalized(encode_new(texts, "passage"))
    old = view.vectors_at(np.array(pos))
    fit = np.flatnonzero(split == "fit")
    progress("TrainingAdapter", f"fitting {len(req.kinds)} adapter kind(s) on {len(fit)} pairs")
    adapters = {}
    for kind in req.kinds:
        for diag in (False, True) if req.diagonal else (False,):
            adapters[adapter_name(kind, diag)] = fit_adapter(
                new[fit], old[fit], FitOptions(kind=kind, diagonal=diag, seed=req.seed)
            )

    progress("Evaluating", "measuring strategies on held-out queries")
    alive = np.flatnonzero(view.alive)
    index_of = {int(p): i for i, p in enumerate(alive.tolist())}
    labelled: list[tuple[str, int]] = []
    for text, key in req.labelled:
        p = view.position_of(key) if isinstance(key, int | str) else None
        if p is not None and int(p) in index_of:  # labels of deleted rows are dropped
            labelled.append((text, index_of[int(p)]))
    metric = decision_metric(len(labelled), req.min_labelled, req.k)
    if metric.startswith("success"):
        qtexts = [t for t, _ in labelled]
        labels = np.array([i for _, i in labelled], np.int64)
    else:
        test = np.flatnonzero(split == "test")
        qtexts = [texts[i] for i in test]
        labels = np.full(len(qtexts), -1, np.int64)
    if len(qtexts) < 10:
        raise InvalidInputError(
            f"only {len(qtexts)} held-out queries; sample more rows or label queries"
        )
    q_old = _normalized(encode_old(qtexts, "query"))
    q_new = _normalized(encode_new(qtexts, "query"))
    base = view.vectors_at(alive)
    retrieved = {STATUS_QUO: topk(q_old, base, req.k)[0]}
    for name, a in adapters.items():
        retrieved[name] = topk(a.apply(q_new), base, req.k)[0]
    sample_idx = np.array([index_of[p] for p in pos], np.int64)
    arr = estimate_arr(
        q_new, new, sample_idx, retrieved, len(alive), req.k, STATUS_QUO, seed=req.seed
    )
    if metric.startswith("arr"):
        sel = select_from_intervals(arr, metric)
    else:
        sel = select_strategy(
            {n: success(ids, labels, req.k) for n, ids in retrieved.items()}, metric, seed=req.seed
        )
    table = sel.as_dict()
    for row in table["strategies"]:
        row["arr"] = arr[row["name"]][0].as_dict()
    chosen = adapters.get(sel.selected)
    if chosen is not None:
        chosen.provenance.update(
            old_model=from_model,
            new_model=req.to_model,
            metric=metric,
            estimated_arr=arr[sel.selected][0].as_dict(),
            manifest_version=view.version,
        )
    record = {
        "from": from_model,
        "to": req.to_model,
        "phase": "Bridged",
        "metric": metric,
        "selected": sel.selected,
        "reason": sel.reason,
        "strategies": table["strategies"],
        "pairs": len(fit),
        "sampled_rows": len(pos),
        "queries": len(qtexts),
        "labelled": metric.startswith("success"),
        "text_coverage": coverage,
        "measured_on_version": view.version,
        "started_at": t0,
        "finished_at": time.time(),
    }
    return record, chosen


def strategy_for(record: Mapping[str, Any] | None, has_text: bool, model: str | None) -> str:
    """How a query is served during a bridged migration (pure): text follows the selected
    strategy; a new-model vector needs the adapter; anything else is the status quo."""
    if not record or record.get("phase") not in ("Bridged",):
        return STATUS_QUO
    selected = str(record["selected"])
    if model == record["to"]:
        return selected if selected != STATUS_QUO else "refused"
    return selected if has_text else STATUS_QUO


def summarize(record: Mapping[str, Any]) -> Sequence[str]:
    """The strategy table as text lines (for the demo and logs)."""
    lines = [
        f"{'strategy':<26} {record['metric']:>22} {'gain vs status quo':>26} {'ARR@k (est.)':>22}"
    ]
    for r in record["strategies"]:
        m, g, a = r["metric"], r["gain"], r["arr"]
        mark = "*" if r["name"] == record["selected"] else " "
        lines.append(
            f"{mark}{r['name']:<25} {m['mean']:.3f} [{m['low']:.3f},{m['high']:.3f}] "
            f"{g['mean']:+.3f} [{g['low']:+.3f},{g['high']:+.3f}]   {a['mean']:.3f} [{a['low']:.3f},{a['high']:.3f}]"
        )
    return lines
