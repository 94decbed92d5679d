"""The router's decisions for a migration of a sharded index (index_runtime.shard_migration):
when the shards may be cut over, which shards, with what force; when a rollback is too late;
the index's phase from its shards'; a fan-out answered in two scoring spaces."""

from __future__ import annotations

import json
from typing import Any

from index_runtime.shard_migration import (
    READY,
    candidate_models,
    coordinated_view,
    merge_records,
    mixed_models,
    plan_cutover,
    plan_rollback,
    with_model,
)


def rec(
    phase: str, mid: str = "m1", reason: str | None = None, auto: bool = True
) -> dict[str, Any]:
    r: dict[str, Any] = {"id": mid, "phase": phase, "options": {"auto_cutover": auto}}
    if reason is not None:
        r["cutover"] = {"reason": reason, "message": f"{reason} message"}
    return r


READY_REC = rec("Backfilled", reason=READY)
HELD = rec("Backfilled", reason="NativeWorse")


def test_every_shard_ready_cuts_all_in_order_without_force() -> None:
    plan = plan_cutover([READY_REC, READY_REC, READY_REC])
    assert plan.refused is None and plan.mid == "m1"
    assert plan.cut == ((0, False), (1, False), (2, False))


def test_a_shard_still_backfilling_refuses_and_names_it() -> None:
    plan = plan_cutover([READY_REC, rec("Backfilling"), READY_REC])
    assert plan.cut == () and plan.refused == "shard 1 is Backfilling"


def test_a_held_shard_refuses_unless_forced_and_only_it_is_forced() -> None:
    plan = plan_cutover([READY_REC, HELD])
    assert plan.cut == () and "shard 1 holds: NativeWorse" in str(plan.refused)
    forced = plan_cutover([READY_REC, HELD], force=True)
    assert forced.refused is None and forced.cut == ((0, False), (1, True))


def test_force_does_not_pass_a_shard_that_is_not_backfilled() -> None:
    plan = plan_cutover([READY_REC, rec("Bridged")], force=True)
    assert plan.cut == () and "shard 1 is Bridged" in str(plan.refused)


def test_a_begun_cutover_is_finished_on_every_remaining_shard_whatever_it_holds() -> None:
    plan = plan_cutover([rec("Succeeded"), HELD, READY_REC])
    assert plan.began and plan.refused is None
    assert plan.cut == ((1, True), (2, True))
    auto = plan_cutover([rec("Succeeded"), rec("Backfilled", reason=READY, auto=False)], auto=True)
    assert auto.cut == ((1, True),)  # even when the migration waits for an explicit cutover


def test_every_shard_cut_over_is_done() -> None:
    plan = plan_cutover([rec("Succeeded"), rec("Succeeded")])
    assert plan.done and plan.cut == () and plan.refused is None


def test_the_automatic_pass_waits_for_an_explicit_cutover_when_asked_to() -> None:
    manual = rec("Backfilled", reason=READY, auto=False)
    assert plan_cutover([READY_REC, manual], auto=True).refused is not None
    assert plan_cutover([READY_REC, manual]).cut == ((0, False), (1, False))  # explicit
    assert plan_cutover([READY_REC, READY_REC], auto=True).cut == ((0, False), (1, False))


def test_shards_of_different_migrations_or_none_refuse() -> None:
    assert "different migrations" in str(plan_cutover([READY_REC, rec("Backfilled", "m2")]).refused)
    assert plan_cutover([None, None]).refused == "no shard has a migration"
    plan = plan_cutover([READY_REC, None])  # the common id is m1; shard 1 lacks it
    assert plan.cut == () and "shard 1 has no migration" in str(plan.refused)
    asked = plan_cutover([READY_REC, READY_REC], mid="other")
    assert "shard 0 has migration m1" in str(asked.refused)


def test_a_rollback_is_refused_once_some_shard_is_cut_over() -> None:
    assert plan_rollback([rec("Backfilled"), rec("Backfilling")], None) is None
    why = plan_rollback([rec("Succeeded"), READY_REC], None)
    assert why is not None and "shards 0" in why and "finish it with a cutover" in why
    assert plan_rollback([rec("Succeeded"), rec("Succeeded")], None) is None  # the shards say


def test_the_index_phase_is_the_least_advanced_shards() -> None:
    assert coordinated_view([READY_REC, rec("Backfilling")])["phase"] == "Backfilling"
    assert coordinated_view([rec("Succeeded"), READY_REC])["phase"] == "Backfilled"
    assert coordinated_view([rec("Succeeded"), rec("Succeeded")])["phase"] == "Succeeded"
    assert coordinated_view([rec("RolledBack"), rec("RolledBack")])["phase"] == "RolledBack"
    assert coordinated_view([rec("RolledBack"), READY_REC])["phase"] == "Mixed"
    view = coordinated_view([READY_REC, HELD])
    assert [s["reason"] for s in view["shards"]] == [READY, "NativeWorse"] and view["id"] == "m1"


def test_answers_in_two_scoring_spaces_are_grouped_and_text_is_pinned() -> None:
    one = [{"model": "new", "results": []}, {"model": "new", "results": []}]
    assert mixed_models(one, batch=False) is None
    two = [{"model": "new"}, {"model": "old"}, {"model": "new"}]
    groups = mixed_models(two, batch=False)
    assert groups == {("new",): [0, 2], ("old",): [1]}
    assert candidate_models(groups) == ["new", "old"]  # most shards' first
    batch = [{"answers": [{"model": "old"}, {"model": "old"}]}, {"answers": [{"model": "new"}] * 2}]
    assert mixed_models(batch, batch=True) == {("old", "old"): [0], ("new", "new"): [1]}
    raw = json.dumps({"text": "a query", "k": 3}).encode()
    assert json.loads(with_model(raw, False, "new") or b"") == {
        "text": "a query",
        "k": 3,
        "model": "new",
    }
    # a vector is of the model its client said, and a text the client pinned stays pinned
    assert with_model(json.dumps({"vector": [1.0], "k": 3}).encode(), False, "new") is None
    b = {"queries": [{"text": "x"}, {"vector": [1.0]}, {"text": "y", "model": "old"}]}
    pinned = json.loads(with_model(json.dumps(b).encode(), True, "new") or b"")
    assert [q.get("model") for q in pinned["queries"]] == ["new", None, "old"]


def test_the_index_record_is_the_least_advanced_shards_with_the_backfill_summed() -> None:
    a = {**rec("Backfilled", reason=READY), "backfill": {"live": 10, "todo": 0, "share": 1.0}}
    b = {**rec("Backfilling"), "backfill": {"live": 30, "todo": 12, "share": 0.6}}
    out = merge_records([a, b])
    assert out is not None and out["phase"] == "Backfilling" and out["id"] == "m1"
    assert out["backfill"]["live"] == 40 and out["backfill"]["todo"] == 12
    assert out["backfill"]["share"] == 0.6
    assert [s["phase"] for s in out["shards"]] == ["Backfilled", "Backfilling"]
    # a shard that has not measured its backfill yet: no index-level figure
    assert "backfill" not in (merge_records([a, rec("Bridged")]) or {})
    assert merge_records([None, None]) is None
