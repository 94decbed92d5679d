from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from index_runtime.errors import CorruptObjectError, FormatVersionError, InvalidInputError
from index_runtime.store.compaction import CompactionPolicy, plan_compaction
from index_runtime.store.manifest import (
    MANIFEST_FORMAT_VERSION,
    IndexSpec,
    Manifest,
    ModelSpec,
    Pin,
    Retired,
    SegmentInfo,
    StoredPin,
    decode_manifest,
    encode_manifest,
    expired_pins,
    plan_gc,
    referenced_objects,
)
from index_runtime.store.rows import RowBatch
from index_runtime.store.segment import encode_segment, read_segment

SPEC = IndexSpec("i", "str", {"a": ModelSpec(4), "b": ModelSpec(8, "ip")}, ("a",))


def seg(i: int, rows: int = 100, live: int = 100, tombs: int = 0, nbytes: int = 1000) -> SegmentInfo:
    return SegmentInfo(i, f"segments/{i}.arrow", rows, live, tombs, i * 1000, i * 1000 + rows - 1, nbytes)


def manifest(*segments: SegmentInfo, retired: tuple[Retired, ...] = ()) -> Manifest:
    return Manifest(7, SPEC, 3, 500, 10, tuple(segments), retired, 1.5, "flush")


def test_manifest_round_trip() -> None:
    m = manifest(seg(1), seg(2, 10, 4, 1), retired=(Retired("segments/0.arrow", 12.0),))
    assert decode_manifest(encode_manifest(m)) == m


def test_migration_record_round_trips_and_keeps_its_adapter_alive() -> None:
    m = manifest(seg(1)).next(migration={"to": "e5", "adapter_key": "adapters/1-procrustes.safetensors"})
    assert decode_manifest(encode_manifest(m)) == m
    assert "adapters/1-procrustes.safetensors" in referenced_objects(m)


def test_an_older_format_is_written_back_in_the_current_one() -> None:
    d = json.loads(encode_manifest(manifest()))
    d["format_version"] = 2
    del d["migration"]
    old = decode_manifest(json.dumps(d).encode())
    assert old.format_version == 2 and old.migration == {}
    assert old.next(reason="x").format_version == MANIFEST_FORMAT_VERSION


def test_unknown_manifest_version_is_refused() -> None:
    d = json.loads(encode_manifest(manifest()))
    d["format_version"] = MANIFEST_FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError, match=f"format_version {MANIFEST_FORMAT_VERSION + 1} is not"):
        decode_manifest(json.dumps(d).encode())
    with pytest.raises(CorruptObjectError):
        decode_manifest(b"{not json")
    del d["format_version"]
    with pytest.raises(CorruptObjectError, match="no format_version"):
        decode_manifest(json.dumps(d).encode())


def test_unknown_segment_version_is_refused() -> None:
    batch = RowBatch(np.array([1], np.int64), np.array(["k"], object), np.array([False]),
                     {"a": np.ones((1, 4), np.float32)})
    data = encode_segment(batch, "str", {"a": 4})
    assert read_segment(data, "str").keys.tolist() == ["k"]
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = dict(table.schema.metadata)
    meta[b"driftless.format_version"] = b"9"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as w:
        w.write_table(table)
    with pytest.raises(FormatVersionError, match="segment format_version 9"):
        read_segment(sink.getvalue().to_pybytes(), "str")
    with pytest.raises(CorruptObjectError):
        read_segment(b"garbage", "str")


def test_spec_validation() -> None:
    with pytest.raises(InvalidInputError):
        ModelSpec(0)
    with pytest.raises(InvalidInputError):
        ModelSpec(4, "hamming")
    with pytest.raises(InvalidInputError):
        IndexSpec("x", "str", {"a": ModelSpec(4)}, ("b",))
    with pytest.raises(InvalidInputError):
        IndexSpec("x", "float", {"a": ModelSpec(4)}, ("a",))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "listed", "retired", "pinned", "inflight", "now", "delete", "forget"),
    [
        ("referenced objects stay", {"segments/1.arrow": 0.0}, (), [], set(), 1e9, (), ()),
        ("retired within grace stay", {"segments/9.arrow": 0.0}, (Retired("segments/9.arrow", 100.0),), [], set(), 150.0, (), ()),
        ("retired after grace go", {"segments/9.arrow": 0.0}, (Retired("segments/9.arrow", 100.0),), [], set(), 161.0,
         ("segments/9.arrow",), ("segments/9.arrow",)),
        ("pinned retired stay", {"segments/9.arrow": 0.0}, (Retired("segments/9.arrow", 100.0),), [9], set(), 1e9, (), ()),
        ("already-deleted retired are forgotten", {}, (Retired("segments/9.arrow", 100.0),), [], set(), 1e9, (), ("segments/9.arrow",)),
        ("young orphans stay", {"segments/x.arrow": 100.0}, (), [], set(), 150.0, (), ()),
        ("old orphans go", {"segments/x.arrow": 100.0}, (), [], set(), 160.0, ("segments/x.arrow",), ()),
        ("in-flight writes stay", {"segments/x.arrow": 0.0}, (), [], {"segments/x.arrow"}, 1e9, (), ()),
    ],
)
def test_plan_gc(case: str, listed: dict[str, float], retired: tuple[Retired, ...], pinned: list[int],
                 inflight: set[str], now: float, delete: tuple[str, ...], forget: tuple[str, ...]) -> None:
    current = manifest(seg(1), retired=retired)
    pins = [manifest(seg(p)) for p in pinned]
    plan = plan_gc(current, pins, {"segments/1.arrow": 0.0, **listed}, inflight, now, grace_s=60.0)
    assert (plan.delete, plan.forget) == (delete, forget), case


@pytest.mark.parametrize(
    ("case", "expires_at", "now", "grace_s", "deleted"),
    [
        ("a live lease stays", 200.0, 150.0, 0.0, False),
        ("a live lease stays even with a long-past mtime", 1e9, 150.0, 60.0, False),
        ("expired within the grace stays", 100.0, 159.0, 60.0, False),
        ("expired for the grace goes", 100.0, 160.0, 60.0, True),
        ("grace 0: expired goes at once", 100.0, 100.0, 0.0, True),
    ],
)
def test_expired_pins(case: str, expires_at: float, now: float, grace_s: float, deleted: bool) -> None:
    pins = {"pins/a.json": StoredPin(Pin("a", 3, expires_at), mtime=0.0)}
    assert expired_pins(pins, now, grace_s) == (("pins/a.json",) if deleted else ()), case


def test_unreadable_pins_go_after_the_grace() -> None:
    pins = {"pins/x.json": StoredPin(None, mtime=100.0)}
    assert expired_pins(pins, 150.0, 60.0) == ()
    assert expired_pins(pins, 160.0, 60.0) == ("pins/x.json",)


@given(
    st.lists(st.floats(0, 1000), max_size=8),
    st.floats(0, 1000),
    st.floats(-10, 100),
)
def test_a_live_lease_is_never_deleted(expiries: list[float], now: float, grace_s: float) -> None:
    pins = {f"pins/{i}.json": StoredPin(Pin(str(i), 1, e), mtime=0.0) for i, e in enumerate(expiries)}
    for key in expired_pins(pins, now, grace_s):
        pin = pins[key].pin
        assert pin is not None and pin.expires_at <= now


POLICY = CompactionPolicy(deleted_ratio=0.2, small_bytes=100, target_bytes=1000, group_outputs=1)


@pytest.mark.parametrize(
    ("case", "segments", "groups"),
    [
        ("nothing to do", [seg(1, nbytes=500), seg(2, nbytes=500)], []),
        ("one small segment alone is left", [seg(1, nbytes=50), seg(2, nbytes=500)], []),
        ("small segments merge", [seg(1, nbytes=50), seg(2, nbytes=60), seg(3, nbytes=500)], [(1, 2)]),
        ("a deleted-heavy segment is rewritten alone", [seg(1, 100, 79, nbytes=900)], [(1,)]),
        ("just under the ratio is left", [seg(1, 100, 81, nbytes=900)], []),
        ("needed tombstones are not dead", [seg(1, 100, 70, 30, nbytes=900)], []),
        ("a tombstone segment whose tombstones are all needed is left", [seg(1, 30, 0, 30, nbytes=50)], []),
        ("rows next to their needed tombstones are left (the rewrite would give the same two)",
         [seg(1, 100, 100, nbytes=50), seg(2, 30, 0, 30, nbytes=20)], []),
        ("three small ones merge into rows + tombstones", [seg(1, nbytes=50), seg(2, 30, 0, 30, nbytes=20),
                                                           seg(3, nbytes=50)], [(1, 2, 3)]),
        ("dead tombstones are dead", [seg(1, 30, 0, 0, nbytes=900)], [(1,)]),
        ("groups are cut at the target", [seg(i, nbytes=90) for i in range(1, 16)],
         [tuple(range(1, 12)), tuple(range(12, 16))]),
        ("expected output, not input, fills the target", [seg(1, 100, 10, nbytes=900), seg(2, 100, 10, nbytes=900)], [(1, 2)]),
    ],
)
def test_plan_compaction(case: str, segments: list[SegmentInfo], groups: list[tuple[int, ...]]) -> None:
    assert plan_compaction(segments, POLICY) == groups, case


def test_a_group_holds_up_to_group_outputs_outputs() -> None:
    two = CompactionPolicy(deleted_ratio=0.2, small_bytes=100, target_bytes=1000, group_outputs=2)
    # 15 segments of 90 bytes: 1,350 expected bytes, one group (one commit) of two outputs
    segments = [seg(i, nbytes=90) for i in range(1, 16)]
    assert plan_compaction(segments, two) == [tuple(range(1, 16))]
    # 30: cut at 2 × 1,000 expected bytes (22 segments), then the rest
    segments = [seg(i, nbytes=90) for i in range(1, 31)]
    assert plan_compaction(segments, two) == [tuple(range(1, 23)), tuple(range(23, 31))]


def test_commits_write_an_older_manifest_back_in_the_current_format(tmp_path: Path) -> None:
    from dataclasses import replace

    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore

    log = ManifestLog(LocalDirStore(tmp_path))
    old = replace(manifest(), version=1, writer_epoch=3, format_version=2)
    assert log.create(old)
    assert log.latest() is not None and log.latest().format_version == 2  # type: ignore[union-attr]
    new = log.commit(old, lambda m: replace(m, settings={"x": 1}), 3, "edit")
    assert new.format_version == MANIFEST_FORMAT_VERSION
    assert log.latest() == new
