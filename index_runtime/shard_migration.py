"""A model migration of a sharded index, coordinated by the router (pure: no I/O).

Every shard runs the same migration (one id) with ``coordinated: true``: its gate measures,
but the shard serves the status quo until its own cutover, and it never cuts over by itself
(it rests Backfilled with ``cutover.reason`` ``CoordinatedCutover`` when its own decision
would go, or the decision's held reason). So before the cutover every shard answers in the
old model's space, after it in the new model's; the router cuts the shards over one by one.
Between the first and the last shard's cutover the shards answer in different spaces: the
router sees it in the answers' ``model`` and re-asks the shards that are not in the common
space (:func:`mixed_models`, :func:`with_model`); a not-yet-cut shard is Backfilled, so it
answers the new model natively and exactly.

The state is the shards' records (each in its shard's manifest), read at every decision: a
router that restarts, or a second replica, decides the same from them. A cutover that began
(some shard Succeeded) is finished on the remaining shards whatever they hold, since the
index must not stay split between models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

READY = "CoordinatedCutover"  # a shard's held reason when its own decision would go
ACTIVE_ORDER = (  # least advanced first (the index's phase is its least advanced shard's)
    "Pending",
    "SamplingPairs",
    "TrainingAdapter",
    "Evaluating",
    "Bridged",
    "Backfilling",
    "Backfilled",
    "CuttingOver",
    "Succeeded",
)
TERMINAL = ("Succeeded", "Failed", "RolledBack")


def _rec(r: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return r or {}


def status_record(status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The migration record a shard's status document carries (None: it has none)."""
    rec = ((status or {}).get("migration") or {}).get("record")
    return dict(rec) if rec else None


def migration_id(records: Sequence[Mapping[str, Any] | None], mid: str | None) -> str | None:
    """The migration the shards' records name: ``mid`` if given, else the common id."""
    if mid:
        return mid
    ids = {str(r.get("id")) for r in records if r and r.get("id")}
    return ids.pop() if len(ids) == 1 else None


@dataclass(frozen=True)
class CutoverPlan:
    """What a coordinated cutover does now: ``cut`` the shards in order, each with its own
    ``force``; ``refused`` (a 409's message) when it may not; ``done`` when every shard is
    cut over already."""

    mid: str | None
    cut: tuple[tuple[int, bool], ...] = ()
    refused: str | None = None
    done: bool = False
    began: bool = False  # some shard is cut over: the rest must follow


def plan_cutover(
    records: Sequence[Mapping[str, Any] | None],
    mid: str | None = None,
    force: bool = False,
    auto: bool = False,
) -> CutoverPlan:
    """Which shards to cut over. Explicit (``auto`` False): every shard must be this
    migration's and Backfilled; one that holds (a measured regression...) refuses the whole
    cutover unless ``force``. ``auto`` (the router's own pass): only when every shard's record
    asked for an automatic cutover and every shard is ready. Once some shard is cut over, the
    others are cut whatever they hold."""
    m = migration_id(records, mid)
    if m is None:
        ids = sorted({str(_rec(r).get("id")) for r in records if r})
        why = (
            f"the shards run different migrations ({', '.join(ids)})"
            if ids
            else ("no shard has a migration")
        )
        return CutoverPlan(None, refused=why)
    blocked: list[str] = []  # shards no cutover may pass (another migration, not Backfilled)
    holds: list[str] = []  # Backfilled shards that hold for a reason of their own
    cut: list[tuple[int, bool]] = []
    succeeded = 0
    for shard, r in enumerate(records):
        rec = _rec(r)
        phase = str(rec.get("phase") or "")
        if rec.get("id") != m:
            blocked.append(
                f"shard {shard} has {'migration ' + str(rec.get('id')) if rec else 'no migration'}"
            )
        elif phase == "Succeeded":
            succeeded += 1
        elif phase == "Backfilled":
            reason = str((rec.get("cutover") or {}).get("reason") or "")
            cut.append((shard, reason != READY))
            if reason != READY:
                msg = (rec.get("cutover") or {}).get("message") or ""
                holds.append(f"shard {shard} holds: {reason}: {msg}".rstrip(": "))
        else:
            blocked.append(f"shard {shard} is {phase or 'unknown'}")
    began = succeeded > 0
    if succeeded == len(records):
        return CutoverPlan(m, done=True, began=True)
    if blocked:
        return CutoverPlan(m, refused="; ".join(blocked), began=began)
    if began:  # finish it: every remaining shard is Backfilled
        return CutoverPlan(m, cut=tuple((s, True) for s, _ in cut), began=True)
    if auto and not all(_rec(r).get("options", {}).get("auto_cutover", True) for r in records):
        return CutoverPlan(m, refused="the migration waits for an explicit cutover")
    if holds and not force:
        return CutoverPlan(m, refused="; ".join(holds))
    return CutoverPlan(m, cut=tuple((s, held and force) for s, held in cut))


def plan_rollback(records: Sequence[Mapping[str, Any] | None], mid: str | None) -> str | None:
    """Why a rollback is refused (None: forward it to every shard). Once a shard is cut over
    the old model is gone from it: the cutover must be finished instead."""
    m = migration_id(records, mid)
    cut = [
        s for s, r in enumerate(records) if r and r.get("id") == m and r.get("phase") == "Succeeded"
    ]
    if cut and len(cut) < len(records):
        return (
            f"the cutover has begun (shards {', '.join(map(str, cut))} serve the new model): "
            "finish it with a cutover"
        )
    return None


def coordinated_view(
    records: Sequence[Mapping[str, Any] | None], mid: str | None = None
) -> dict[str, Any]:
    """The index's migration from its shards' records: the least advanced shard's phase (a
    terminal phase only when every shard has it), and each shard's phase and reason."""
    m = migration_id(records, mid)
    phases = [str(_rec(r).get("phase") or "") for r in records]
    ended = {p for p in phases if p in TERMINAL}
    if phases and all(p in TERMINAL for p in phases) and len(ended) == 1:
        phase = ended.pop()
    else:
        active = [p for p in phases if p not in TERMINAL or p == "Succeeded"]
        order = {p: i for i, p in enumerate(ACTIVE_ORDER)}
        phase = min(active, key=lambda p: order.get(p, -1)) if active else "Mixed"
        if any(p in ("Failed", "RolledBack") for p in phases):
            phase = "Mixed"
    return {
        "id": m,
        "phase": phase,
        "shards": [
            {
                "shard": s,
                "id": _rec(r).get("id"),
                "phase": _rec(r).get("phase"),
                "reason": (_rec(r).get("cutover") or {}).get("reason") or _rec(r).get("reason"),
            }
            for s, r in enumerate(records)
        ],
    }


SUMMED = ("live", "todo", "blocked", "backfilled", "rewritten", "skipped", "rows_per_second")


def merge_records(records: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """One record for the index, as an unsharded writer's status carries it (what the
    operator reads through the router): the least advanced shard's record with the index's
    phase (:func:`coordinated_view`), the backfill's row counts summed and its share the
    lowest shard's, and every shard's phase under ``shards``. None when no shard has one."""
    if not any(records):
        return None
    view = coordinated_view(records)
    present = [dict(r) for r in records if r]
    base = next((r for r in present if r.get("phase") == view["phase"]), present[0])
    out = {**base, "phase": view["phase"], "shards": view["shards"]}
    fills = [dict(f) for r in records if isinstance(f := _rec(r).get("backfill"), Mapping)]
    if len(fills) == len(records):
        bf = dict(fills[0])
        for key in SUMMED:
            bf[key] = sum(f.get(key) or 0 for f in fills)
        bf["share"] = min(float(f.get("share") or 0.0) for f in fills)
        out["backfill"] = bf
    else:
        out.pop("backfill", None)  # some shard has not measured yet: no index-level figure
    return out


# queries during the cutover ----------------------------------------------------------------


def answer_models(body: Mapping[str, Any], batch: bool) -> tuple[Any, ...]:
    """The models a shard's answer is scored in (one per query)."""
    if batch:
        return tuple(a.get("model") for a in body.get("answers", []))
    return (body.get("model"),)


def mixed_models(
    bodies: Sequence[Mapping[str, Any]], batch: bool
) -> dict[tuple[Any, ...], list[int]] | None:
    """The shards grouped by the models they answered in, when they differ (None: one
    scoring space, the answers merge as they are)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for shard, b in enumerate(bodies):
        groups.setdefault(answer_models(b, batch), []).append(shard)
    if len(groups) < 2:
        return None
    return groups


def with_model(raw: bytes, batch: bool, model: str) -> bytes | None:
    """The query bytes with every *text* query pinned to ``model`` (a vector is of the model
    its client said: it is not re-labelled). None when no query has text (nothing to pin)."""
    doc = json.loads(raw)
    queries = doc.get("queries", []) if batch else [doc]
    pinned = False
    for q in queries:
        if isinstance(q, dict) and q.get("text") is not None and q.get("model") is None:
            q["model"] = model
            pinned = True
    return json.dumps(doc, separators=(",", ":")).encode() if pinned else None


def candidate_models(groups: Mapping[tuple[Any, ...], list[int]]) -> list[str]:
    """The models to pin the query to, most shards first (the later the cutover, the more
    shards are cut; either order is tried)."""
    counts: dict[str, int] = {}
    for models, shards in groups.items():
        for m in set(models):
            if isinstance(m, str):
                counts[m] = counts.get(m, 0) + len(shards)
    return sorted(counts, key=lambda m: -counts[m])
