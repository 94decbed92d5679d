"""The examples as the story patches them for a tiny corpus (tests/cluster/story.py) are what
the API server admits (the CRDs' schemas and CEL rules, strict fields), and the migration
objects carry the corpus's own labelled queries and a backfill of several pods. The story's
first apply was refused: a tiny nlist with the example's nbits 8 breaks the CRD's FAISS rule
(minTrainingVectors >= 39 x max(nlist, 2^nbits))."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("kmock")

from tests.cluster.chart import crds
from tests.cluster.story import Ledger, Settings, Story
from tests.strict_rules import admit_custom


def _story(**settings: Any) -> Story:
    cluster = SimpleNamespace(s3=SimpleNamespace(endpoint="http://10.251.9.2:5000"))
    story = Story(cluster, Settings(**settings), log=lambda _: None)  # type: ignore[arg-type]
    story.encoder_url = "http://10.251.9.3:8000/v1"
    doc = SimpleNamespace(id="a" * 64, query="copy a file", passage="shutil.copy ...", source="shutil")
    story._docs = [doc]
    story.ledger = Ledger(acked={doc.id: doc.passage})
    return story


CRDS = {c["spec"]["names"]["kind"]: c for c in crds()}


@pytest.mark.parametrize("encoder", ["http", "local"])
def test_the_patched_examples_are_admitted(encoder: str) -> None:
    for obj in _story(encoder=encoder).patched_examples():
        _, rejection = admit_custom(CRDS[obj["kind"]], obj, strict_fields=True)
        assert rejection is None, (obj["kind"], rejection and rejection.status())


def test_the_examples_nbits_with_a_tiny_nlist_is_refused() -> None:
    """The rule the story's settings respect (so the test above can fail)."""
    vi = next(o for o in _story(nbits=8).patched_examples() if o["kind"] == "VectorIndex")
    _, rejection = admit_custom(CRDS["VectorIndex"], vi, strict_fields=True)
    assert rejection is not None and "39" in json.dumps(rejection.status())


def test_the_migration_has_the_corpus_queries_and_parallel_backfill() -> None:
    objs = {o["kind"]: o for o in _story().migration_objects()}
    queries = json.loads(objs["ConfigMap"]["data"]["queries.json"])
    assert queries == [{"text": "copy a file", "key": "a" * 64}]
    mm = objs["ModelMigration"]
    assert mm["spec"]["backfill"]["parallelism"] >= 2
    _, rejection = admit_custom(CRDS["ModelMigration"], mm, strict_fields=True)
    assert rejection is None, rejection and rejection.status()
