"""examples/ as shipped: every document valid (custom resources through the strict emulator's
admission with ``fieldValidation=Strict``, built-in kinds with kubernetes-validate), every
Secret, ConfigMap and model a resource names is shipped, and ``kubectl apply -f examples/``
(the top folder) applies nothing that would hurt: no placeholder Secret over real keys, no
migration that would hold the new index's training back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
pytest.importorskip("celpy")

from tests.crd_tools import ROOT, load_crds  # noqa: E402
from tests.strict_rules import admit_custom, label_errors, name_errors  # noqa: E402

CRDS = load_crds()
FILES = sorted((ROOT / "examples").rglob("*.yaml"))
INSTALL = (ROOT / "docs" / "install.md").read_text()


def docs(paths: list[Path]) -> list[dict[str, Any]]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


ALL = docs(FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_every_example_is_accepted_by_the_api(path: Path) -> None:
    for doc in docs([path]):
        kind, meta = doc["kind"], doc["metadata"]
        assert name_errors(kind, meta["name"]) == [] and label_errors(doc) == []
        if kind in CRDS:
            _, rejection = admit_custom(CRDS[kind], doc, strict_fields=True)
            assert rejection is None, rejection.message
        else:
            kv.validate(doc, kv.latest_version(), strict=True)


def references(obj: Any) -> set[tuple[str, str]]:
    """(kind, name) of every Secret and ConfigMap an object names, wherever in its spec."""
    out: set[tuple[str, str]] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.endswith("Secret") and isinstance(v, dict) and "name" in v:
                out.add(("Secret", v["name"]))
            elif k == "secretName" and isinstance(v, str):
                out.add(("Secret", v))
            elif k == "configMapName" and isinstance(v, str):
                out.add(("ConfigMap", v))
            out |= references(v)
    elif isinstance(obj, list):
        for x in obj:
            out |= references(x)
    return out


def test_everything_a_resource_names_is_shipped() -> None:
    shipped = {(d["kind"], d["metadata"]["name"]) for d in ALL}
    named = set().union(*(references(d.get("spec")) for d in ALL))
    assert {("Secret", "s3-credentials"), ("ConfigMap", "docs-labelled-queries")} <= named
    assert named <= shipped, named - shipped
    models = {d["metadata"]["name"] for d in ALL if d["kind"] == "EmbeddingModel"}
    for d in ALL:
        spec = d.get("spec") or {}
        for ref in (spec.get("modelRef"), spec.get("targetModelRef")):
            assert ref is None or ref["name"] in models, (d["metadata"]["name"], ref)


def test_labelled_queries_are_in_the_format_the_gate_reads() -> None:
    mm = next(d for d in ALL if d["kind"] == "ModelMigration")
    lq = mm["spec"]["gate"]["labelledQueries"]
    cm = next(d for d in ALL if d["kind"] == "ConfigMap" and d["metadata"]["name"] == lq["configMapName"])
    rows = json.loads(cm["data"][lq.get("key", "queries.json")])
    assert rows and all(set(r) == {"text", "key"} for r in rows)


def test_the_top_folder_applies_safely_in_the_namespace_the_walkthrough_makes() -> None:
    top = docs(sorted((ROOT / "examples").glob("*.yaml")))
    kinds = {d["kind"] for d in top}
    assert "Secret" not in kinds  # placeholders would overwrite the keys of step 2
    assert "ModelMigration" not in kinds  # it would hold the new index's training back
    namespaces = {d["metadata"].get("namespace") for d in ALL}
    assert namespaces == {"search"}
    assert "kubectl create namespace search" in INSTALL and "watchNamespaces={search}" in INSTALL
