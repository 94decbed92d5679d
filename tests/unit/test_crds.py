"""CRDs: apiextensions/v1 validation, the structural-schema rules, every CEL rule compiled and
evaluated (cel-python), every example accepted, every invalid CR rejected for its reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
pytest.importorskip("celpy")

from tests.crd_tools import (  # noqa: E402
    ROOT,
    cel_compile,
    load_crds,
    merge_patch,
    schema_of,
    structural_problems,
    validate_cr,
)

CRDS = load_crds()
EXAMPLES = sorted(  # the custom resources among the examples (subfolders too)
    p for p in (ROOT / "examples").rglob("*.yaml") if yaml.safe_load(p.read_text())["kind"] in CRDS
)
CORPUS = yaml.safe_load((ROOT / "tests/data/invalid/corpus.yaml").read_text())


def _example(kind: str) -> dict[str, Any]:
    for p in EXAMPLES:
        doc = yaml.safe_load(p.read_text())
        if doc["kind"] == kind:
            return dict(doc)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_is_a_valid_structural_apiextensions_v1_object(kind: str) -> None:
    crd = CRDS[kind]
    kv.validate(crd, kv.latest_version(), strict=True)
    assert structural_problems(schema_of(crd)) == []
    names = crd["spec"]["names"]
    assert "driftless" in names["categories"] and names["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert "Age" in columns and columns["Reason"]["priority"] == 1  # the wide column
    assert "conditions[?(@.type==" in columns["Reason"]["jsonPath"]


@pytest.mark.parametrize("kind", ["ClusterKopfPeering", "KopfPeering"])
def test_kopf_peering_crds_are_valid_structural_objects(kind: str) -> None:
    crd = load_crds(group=None)[kind]
    kv.validate(crd, kv.latest_version(), strict=True)
    assert crd["spec"]["group"] == "kopf.dev" and crd["spec"]["versions"][0]["name"] == "v1"
    assert structural_problems(schema_of(crd)) == []


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_cel_rule_compiles(kind: str) -> None:
    rules = []

    def walk(s: dict[str, Any]) -> None:
        rules.extend(r["rule"] for r in s.get("x-kubernetes-validations") or ())
        for sub in (s.get("properties") or {}).values():
            walk(sub)

    walk(schema_of(CRDS[kind]))
    assert rules
    for rule in rules:
        cel_compile(rule)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert validate_cr(CRDS[doc["kind"]], doc) == []
    assert validate_cr(CRDS[doc["kind"]], doc, old=doc) == []  # an unchanged update passes too


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c["name"])
def test_invalid_crs_are_rejected_for_their_reason(case: dict[str, Any]) -> None:
    base = _example(case["kind"])
    new = merge_patch(copy.deepcopy(base), case.get("patch", {}))
    if "drop" in case:
        del new["spec"][case["drop"]]
    old = merge_patch(base, case["old"]) if "old" in case else None
    errors = validate_cr(CRDS[case["kind"]], new, old)
    assert any(case["reason"] in e for e in errors), errors
    # and the same object without the offending change is accepted
    assert validate_cr(CRDS[case["kind"]], base, old=base if old is not None else None) == []


def test_allowed_updates_pass_transition_rules() -> None:
    mm = _example("ModelMigration")
    rolled = merge_patch(mm, {"spec": {"rollback": True, "cutover": {"approved": True}}})
    assert (
        validate_cr(CRDS["ModelMigration"], rolled, old=mm) == []
    )  # rollback and approval are allowed
    vi = _example("VectorIndex")
    tuned = merge_patch(vi, {"spec": {"primary": {"nprobe": 64}, "readers": {"replicas": 5}}})
    assert validate_cr(CRDS["VectorIndex"], tuned, old=vi) == []
