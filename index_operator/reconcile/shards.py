"""The status of a sharded VectorIndex from its shards' plans (PURE).

Each shard is planned like an unsharded index (``reconcile.index.plan_index`` over its own
writer and shadow, with its own entry of ``status.shards`` as the prior: its phase and Jobs).
The index's status combines them: the phase is the least advanced shard's (Serving only when
every shard serves), Ready only when every shard is ready, counts summed, and one entry per
shard in ``status.shards``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from index_operator.reconcile.conditions import Condition, merge_conditions
from index_operator.reconcile.index import Event, IndexPlan
from index_operator.spec import Index
from index_runtime.routing import pool_windows

# the index's phase is the first of these that any shard is in: a shard that cannot answer
# (Pending) or answers worse than it should (Degraded) holds the whole index's answers back
PHASE_ORDER = (
    "Pending",
    "Degraded",
    "ColdStart",
    "Training",
    "Validating",
    "Retraining",
    "Serving",
)


def shard_prior(prior: Mapping[str, Any], shard: int) -> dict[str, Any]:
    """What ``plan_index`` sees of a shard's past: its entry of ``status.shards``."""
    for entry in prior.get("shards") or ():
        if isinstance(entry, Mapping) and entry.get("shard") == shard:
            return dict(entry)
    return {}


def _rank(phase: str) -> int:
    return PHASE_ORDER.index(phase) if phase in PHASE_ORDER else 0


def shard_entry(shard: int, status: Mapping[str, Any]) -> dict[str, Any]:
    """One shard's line of ``status.shards``."""
    ready = next(
        (c.get("status") == "True" for c in status.get("conditions") or () if c["type"] == "Ready"),
        False,
    )
    counts = status.get("counts") or {}
    return {
        "shard": shard,
        "phase": str(status.get("phase") or "Pending"),
        "reason": str(status.get("reason") or ""),
        "message": str(status.get("message") or ""),
        "ready": bool(ready),
        "rows": int(counts.get("vectors") or 0),
        "segments": int(counts.get("segments") or 0),
        "tombstones": int(counts.get("tombstones") or 0),
        "deletedRatio": float(counts.get("deletedRatio") or 0.0),
        "codebookVersion": int(status.get("codebookVersion") or 0),
        "servingIndex": str(status.get("servingIndex") or ""),
        "model": str(status.get("model") or ""),
        "overlap": dict(status.get("overlap") or {}),
        "jobs": dict(status.get("jobs") or {}),
    }


def _overlap(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The index's overlap window: the shards' deciding windows pooled when every shard has
    samples in the same kind of window (``routing.pool_windows``: the count-weighted mean and
    the count-weighted 95% bounds, conservative since each shard's interval is wider than one
    over all samples), else the weakest shard's (a shard without samples first, then the
    lowest lower bound), named: an index answers as well as its worst shard lets it."""
    windows = [e["overlap"] for e in entries if e["overlap"]]
    if not windows:
        return {"window": "serving", "samples": 0, "summary": "-"}
    kinds = {w.get("window") for w in windows}
    if len(windows) == len(entries) and len(kinds) == 1 and all(w.get("samples") for w in windows):
        pooled = pool_windows(
            [
                {"count": w["samples"], "mean": w["mean"], "lower": w["lower"], "upper": w["upper"]}
                for w in windows
            ]
        )
        assert pooled is not None and pooled["mean"] is not None
        mean, lo, hi = float(pooled["mean"]), float(pooled["lower"]), float(pooled["upper"])
        return {
            "window": kinds.pop(),
            "mean": round(mean, 4),
            "lower": round(lo, 4),
            "upper": round(hi, 4),
            "samples": int(pooled["count"]),
            "summary": f"{mean:.3f} [{lo:.3f}, {hi:.3f}] ({len(windows)} shards)",
        }
    worst = min(windows, key=lambda w: (bool(w.get("samples")), float(w.get("lower", 0.0))))
    out = dict(worst)
    if out.get("samples"):
        shard = entries[[e["overlap"] for e in entries].index(worst)]["shard"]
        out["summary"] = f"{out['summary']} (shard {shard})"
    return out


def combine_shards(
    ix: Index,
    plans: Sequence[IndexPlan],
    prior: Mapping[str, Any],
    now: float,
    migrating: str = "",
) -> IndexPlan:
    """The index's status and events from its shards' plans (``plans[i]`` is shard i's). The
    actions stay per shard (the caller carries out each plan's against its shard)."""
    if len(plans) != ix.shards:
        raise ValueError(f"{len(plans)} shard plans for {ix.shards} shards")
    entries = [shard_entry(i, p.status) for i, p in enumerate(plans)]
    worst = min(entries, key=lambda e: (_rank(e["phase"]), e["shard"]))
    phase = worst["phase"]
    same = all(e["phase"] == phase for e in entries)
    reason = worst["reason"] if same else f"Shard{worst['shard']}{phase}"
    message = worst["message"] if same else f"shard {worst['shard']}: {worst['message']}"
    not_ready = [e["shard"] for e in entries if not e["ready"]]
    progressing = [
        e["shard"] for e in entries if e["phase"] in ("Training", "Validating", "Retraining")
    ]
    degraded = [e["shard"] for e in entries if e["phase"] == "Degraded"]
    conds = [
        Condition(
            "Ready",
            not not_ready,
            "AllShardsReady" if not not_ready else reason,
            f"every shard of {ix.shards} answers"
            if not not_ready
            else f"shards {not_ready} do not answer yet: {message}",
        ),
        Condition(
            "Progressing",
            bool(progressing),
            reason,
            f"shards {progressing} train or validate" if progressing else message,
        ),
        Condition(
            "Degraded",
            bool(degraded),
            reason if degraded else "AsExpected",
            f"shards {degraded} are degraded" if degraded else message,
        ),
    ]
    paths = sorted({e["servingIndex"] for e in entries if e["servingIndex"]})
    rows = sum(e["rows"] for e in entries)
    dead = [e["deletedRatio"] for e in entries]
    status: dict[str, Any] = {
        "observedGeneration": ix.ref.generation,
        "phase": phase,
        "reason": reason,
        "message": message,
        "servingIndex": ",".join(paths),
        "codebookVersion": min(e["codebookVersion"] for e in entries),
        "model": entries[0]["model"],
        "overlap": _overlap(entries),
        "counts": {
            "vectors": rows,
            "segments": sum(e["segments"] for e in entries),
            "tombstones": sum(e["tombstones"] for e in entries),
            "deletedRatio": round(max(dead), 4),  # the worst shard's (compaction is per shard)
        },
        "migration": migrating,
        "shards": entries,
        "conditions": merge_conditions(prior.get("conditions"), conds, ix.ref.generation, now),
    }
    events: list[Event] = []
    for i, p in enumerate(plans):
        events += [Event(e.type, e.reason, f"shard {i}: {e.message}") for e in p.events]
    if prior.get("phase") != phase:
        kind = "Warning" if phase in ("Degraded", "Pending") and prior.get("phase") else "Normal"
        events.append(Event(kind, reason, f"{prior.get('phase') or 'New'} -> {phase}: {message}"))
    return IndexPlan((), status, tuple(events))
