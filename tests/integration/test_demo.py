"""The demo end to end on a tiny slice of the real corpus with the real MiniLM and E5 models."""

from __future__ import annotations

from pathlib import Path

import pytest

from index_runtime.corpus import build_stdlib_corpus


def test_corpus_is_deterministic_and_deduplicated() -> None:
    a, b = build_stdlib_corpus(), build_stdlib_corpus()
    assert a.sha256 == b.sha256 and len(a.docs) > 1000
    assert len({d.passage for d in a.docs}) == len(a.docs)
    assert a.head(10).sha256 != a.sha256


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers", reason="the embed extra is not installed")
    from index_runtime.cli import main

    code = main(["demo", "--data", str(tmp_path / "demo"), "--cache", str(tmp_path / "cache"),
                 "--max-passages", "120", "--embed-seconds", "5"])
    assert code == 0
    from index_runtime.demo import Stage  # noqa: F401  (the table printed above came from these)
    assert (tmp_path / "cache" / "embeddings.sqlite").exists()
    assert (tmp_path / "demo" / "cold-start.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "upgrade.png").stat().st_size > 10_000  # the migration gate's table
