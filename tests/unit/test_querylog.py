"""The query log's privacy switch and bounds (pure: a fake clock, a seeded sampler)."""

from __future__ import annotations

import pytest

from index_runtime.contract import Env
from index_runtime.querylog import QueryLog, QueryLogSettings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_off_by_default_keeps_nothing() -> None:
    log = QueryLog(seed=0)
    assert not any(log.offer(f"query {i}") for i in range(500))
    assert log.snapshot() == [] and log.stats()["offered"] == 0
    assert log.add(["forwarded by a reader"]) == 0  # a writer that is off refuses forwards too
    assert QueryLogSettings.from_env({}) == QueryLogSettings()
    assert not QueryLogSettings.from_env({Env.QUERY_LOG: "0"}).enabled


def test_sample_rate_is_honoured() -> None:
    log = QueryLog(QueryLogSettings(enabled=True, sample_rate=0.1, max_queries=10_000), seed=1)
    kept = sum(log.offer(f"q{i}") for i in range(5000))
    assert 400 < kept < 600  # binomial(5000, 0.1): ±4.5 sd
    assert len(log.snapshot()) == kept


def test_count_age_and_size_bounds() -> None:
    clock = Clock()
    s = QueryLogSettings(enabled=True, sample_rate=1.0, max_queries=3, retention_s=60, max_text_bytes=8)
    log = QueryLog(s, clock=clock, seed=0)
    for t in ("a", "b", "c", "d"):
        log.offer(t)
    assert log.snapshot() == ["b", "c", "d"]  # oldest evicted by count
    assert not log.offer("x" * 9) and log.stats()["skipped_long"] == 1  # skipped, not cut
    log.offer("c")  # seen again: refreshed, not duplicated
    assert log.snapshot() == ["b", "d", "c"]
    clock.t += 30
    log.offer("e")
    clock.t += 31  # b, d, c are 61 s old now; e is 31 s old
    assert log.snapshot() == ["e"]
    assert log.stats()["bytes"] <= s.max_bytes == 24


def test_switching_off_forgets_everything() -> None:
    log = QueryLog(QueryLogSettings(enabled=True, sample_rate=1.0), seed=0)
    log.offer("a private question")
    log.configure(QueryLogSettings(enabled=False))
    assert log.snapshot() == []
    log.configure(QueryLogSettings(enabled=True, sample_rate=1.0))
    assert log.snapshot() == []  # not resurrected


def test_a_reader_forwards_instead_of_keeping() -> None:
    sent: list[str] = []
    log = QueryLog(QueryLogSettings(enabled=True, sample_rate=1.0), seed=0, forward=sent.append)
    log.offer("hello")
    assert sent == ["hello"] and log.snapshot() == []
    # texts posted to a reader's internal route are not kept there (nothing reads them)
    assert log.add(["posted to the reader"]) == 0
    assert log.snapshot() == [] and log.stats()["kept"] == 0


def test_settings_from_env_and_validation() -> None:
    s = QueryLogSettings.from_env(
        {Env.QUERY_LOG: "1", Env.QUERY_LOG_RATE: "0.25", Env.QUERY_LOG_MAX: "50",
         Env.QUERY_LOG_RETENTION_S: "3600"}
    )
    assert (s.enabled, s.sample_rate, s.max_queries, s.retention_s) == (True, 0.25, 50, 3600.0)
    with pytest.raises(ValueError, match="sample_rate"):
        QueryLogSettings(sample_rate=1.5)
    with pytest.raises(ValueError, match="max_queries"):
        QueryLogSettings(max_queries=0)


def _runtime_env(spec_patch: dict[str, object]) -> dict[str, dict[str, str]]:
    """The plain env values of the writer's and the readers' pods for a VectorIndex."""
    from index_operator import resources as res
    from index_operator.spec import Index
    from index_runtime import contract
    from tests.unit.test_operator_resources import CL, TOKENS, _cr

    cr = _cr("vectorindex.yaml")
    cr["spec"] = {**cr["spec"], **spec_patch}
    objs = res.desired_objects(Index.parse(cr), CL, {"minilm": "all-MiniLM-L6-v2"}, TOKENS)
    out = {}
    for obj in objs:
        role = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if obj["kind"] in ("StatefulSet", "Deployment") and role in ("writer", "reader"):
            env = obj["spec"]["template"]["spec"]["containers"][0]["env"]
            out[role] = {e["name"]: e["value"] for e in env if "value" in e}
    assert set(out) == {contract.Role.WRITER.value, contract.Role.READER.value}
    return out


def test_the_operator_passes_spec_query_log_to_the_pods_and_the_runtime_reads_it() -> None:
    off = _runtime_env({})
    assert not any(k.startswith("DRIFTLESS_QUERY_LOG") for env in off.values() for k in env)
    on = _runtime_env(
        {"queryLog": {"enabled": True, "sampleRate": 0.05, "maxQueries": 500, "retentionHours": 2}}
    )
    for role, env in on.items():
        s = QueryLogSettings.from_env(env)
        assert (s.enabled, s.sample_rate, s.max_queries, s.retention_s) == (True, 0.05, 500, 7200.0)
        # readers forward to the writer's service; the writer keeps the sample itself
        assert (Env.WRITER_URL in env) == (role == "reader")
    assert "-writer" in on["reader"][Env.WRITER_URL]


def test_the_crds_accept_the_rank_kind_and_a_bounded_query_log_only() -> None:
    import copy

    pytest.importorskip("kubernetes_validate")
    pytest.importorskip("celpy")
    from tests.crd_tools import load_crds, merge_patch, validate_cr
    from tests.unit.test_crds import _example

    crds = load_crds()
    mm = merge_patch(copy.deepcopy(_example("ModelMigration")),
                     {"spec": {"adapter": {"types": ["procrustes", "lowrank", "mlp", "rank"]}}})  # fmt: skip
    assert validate_cr(crds["ModelMigration"], mm) == []
    vi = _example("VectorIndex")
    ok = {"enabled": True, "sampleRate": 0.05, "maxQueries": 500, "retentionHours": 2}
    assert validate_cr(crds["VectorIndex"], merge_patch(copy.deepcopy(vi), {"spec": {"queryLog": ok}})) == []
    for bad, reason in (({"sampleRate": 1.5}, "greater than the maximum"),
                        ({"maxQueries": 0}, "less than the minimum"),
                        ({"retentionHours": 0}, "less than or equal to the minimum")):  # fmt: skip
        errors = validate_cr(crds["VectorIndex"], merge_patch(copy.deepcopy(vi), {"spec": {"queryLog": bad}}))
        assert any(reason in e for e in errors), errors


def test_retention_holds_while_nothing_reads_or_writes_the_log() -> None:
    """An index that stops receiving queries must not hold their texts past retention: the
    counts drop them, and ``expire`` (the runtime's maintenance tick) frees them."""
    clock = Clock()
    s = QueryLogSettings(enabled=True, sample_rate=1.0, retention_s=60)
    log = QueryLog(s, clock=clock, seed=0)
    log.offer("alice smith 12 main street")
    log.offer("bob")
    clock.t += 30
    log.offer("carol")
    clock.t += 31  # the first two are past retention, nothing was offered or read since
    st = log.stats()
    assert st["kept"] == 1 and st["bytes"] == len("carol")
    clock.t += 60
    assert log.expire() == 1
    assert log.stats()["kept"] == 0 and log.snapshot() == []
