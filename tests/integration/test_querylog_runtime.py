"""The query log as the runtime wires it: which text queries are sampled must not be
predictable. Every pod ran the same seeded sequence (``RuntimeOptions.seed``, 0 everywhere),
so after a start the same positions were sampled on every reader: a user could tell (or pick)
whether a query of theirs would be kept."""

from __future__ import annotations

from pathlib import Path

from index_runtime.querylog import QueryLogSettings
from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig


def _sampled(tmp_path: Path, name: str) -> list[str]:
    store = LocalDirStore(tmp_path / name)
    w = IndexWriter.open(store, tmp_path / f"wal-{name}", WriterConfig(),
                         create=IndexSpec.single(name, "m", 4, "str"))  # fmt: skip
    opts = RuntimeOptions(
        maintenance=False, query_log=QueryLogSettings(enabled=True, sample_rate=0.5)
    )
    rt = IndexRuntime(name, store, w, opts, Roles())
    try:
        for i in range(64):
            rt.queries.offer(f"query {i}")
        return rt.queries.snapshot()
    finally:
        w.close()


def test_two_pods_with_the_same_options_sample_different_queries(tmp_path: Path) -> None:
    a, b = _sampled(tmp_path, "a"), _sampled(tmp_path, "b")
    assert 10 < len(a) < 54 and 10 < len(b) < 54  # binomial(64, 0.5): ±5.5 sd
    assert a != b  # the same 64 choices: probability 2**-64
