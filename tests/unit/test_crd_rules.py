"""The VectorIndex rules a real API server applies, checked with the CRD tooling (schema,
defaults and every CEL rule evaluated by cel-python): names the children can carry, cron
schedules the CronJob accepts, storage fields that live in the writer's immutable
volumeClaimTemplates, spec.pods; and every CEL rule of every CRD refused at least once."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
pytest.importorskip("celpy")

from index_operator import resources as res  # noqa: E402
from index_operator.resources.placement import placements  # noqa: E402
from index_operator.spec import MAX_SHARDED_NAME, Index, Migration, SpecError  # noqa: E402
from index_runtime.contract import JobKind, Scope  # noqa: E402
from index_runtime.shards import MAX_SHARDS  # noqa: E402
from tests.crd_tools import ROOT, load_crds, merge_patch, schema_of, validate_cr  # noqa: E402

CRDS = load_crds()
VI = dict(yaml.safe_load((ROOT / "examples/vectorindex.yaml").read_text()))
CORPUS = yaml.safe_load((ROOT / "tests/data/invalid/corpus.yaml").read_text())
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
REVISION_HASH = 10  # controller-revision-hash: "<StatefulSet>-<fnv32 as up to 10 chars>"


def _vi(name: str = "docs", **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(VI)
    body["metadata"]["name"] = name
    body["spec"].update(copy.deepcopy(spec))
    return body


def _example(path: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / path).read_text()))


# names -------------------------------------------------------------------------------------


def _children_fit(name: str, shards: int = 1) -> bool:
    """Whether every object the operator builds for an index of this name (and shard count)
    is acceptable to the API server: names within their kind's limit, label values <= 63,
    and the labels Kubernetes' controllers derive from them (StatefulSet revision, pod name)
    too. The shard count is set past the spec's own name check, which is what is tested."""
    body = _vi(name)
    body["metadata"]["uid"] = "u"
    ix = dataclasses.replace(Index.parse(body), shards=shards)
    ats = placements(name, shards)
    cl = res.Cluster(monitoring=True, network_policy=res.NetworkPolicyConfig())
    mig = Migration.parse(
        {**_example("migration/modelmigration.yaml"), "metadata": {"name": name, "namespace": "s"}}
    )
    objs = [
        *res.desired_objects(ix, cl, {}, res.Tokens({s: "t" for s in Scope})),
        *(res.desired_compaction_cronjob(ix, cl, at=at) for at in ats),
        *(
            res.desired_job(ix, cl, k, res.job_name(at.stem, k, 12345), ix.ref, at=at)
            for k in JobKind
            for at in ats
        ),
        res.desired_gate_job(ix, mig, cl),
        res.desired_backfill_job(ix, mig, cl),
    ]
    labels: list[str] = []
    for o in objs:
        n = o["metadata"]["name"]
        limit = {"Service": 63, "Job": 63, "CronJob": 52, "StatefulSet": 63}.get(o["kind"], 253)
        if len(n) > limit:
            return False
        if o["kind"] == "StatefulSet":
            labels += [f"{n}-{'9' * REVISION_HASH}", f"{n}-0"]  # revision, pod name
        labels += list(o["metadata"]["labels"].values())
    return all(len(v) <= 63 for v in labels)


def test_the_longest_accepted_name_is_the_longest_whose_children_fit() -> None:
    fits = [n for n in range(1, 64) if _children_fit("a" * n)]
    bound = max(fits)
    assert fits == list(range(1, bound + 1))
    assert validate_cr(CRDS["VectorIndex"], _vi("a" * bound)) == []
    longer = validate_cr(CRDS["VectorIndex"], _vi("a" * (bound + 1)))
    assert any("metadata.name" in e for e in longer), longer


def test_the_longest_accepted_sharded_name_is_the_longest_whose_shards_children_fit() -> None:
    fits = [n for n in range(1, 64) if _children_fit("a" * n, MAX_SHARDS)]
    bound = max(fits)
    assert fits == list(range(1, bound + 1))
    assert bound == MAX_SHARDED_NAME
    assert validate_cr(CRDS["VectorIndex"], _vi("a" * bound, shards=MAX_SHARDS)) == []
    longer = validate_cr(CRDS["VectorIndex"], _vi("a" * (bound + 1), shards=2))
    assert any("a sharded index's metadata.name must be at most" in e for e in longer), longer
    assert validate_cr(CRDS["VectorIndex"], _vi("a" * (bound + 1), shards=1)) == []
    with pytest.raises(SpecError, match="at most 41 characters"):
        Index.parse(_vi("a" * (bound + 1), shards=2))


@pytest.mark.parametrize("name", ["1docs", "docs-", "-docs", "Docs", "docs.v2", "do_cs"])
def test_names_that_cannot_name_a_service_are_refused(name: str) -> None:
    errors = validate_cr(CRDS["VectorIndex"], _vi(name))
    assert any("metadata.name" in e for e in errors), errors


@pytest.mark.parametrize("name", ["d", "docs", "docs-v2", "a1-b2"])
def test_dns_1035_names_are_accepted(name: str) -> None:
    assert validate_cr(CRDS["VectorIndex"], _vi(name)) == []


# compaction schedule -----------------------------------------------------------------------

ACCEPTED = [
    "@hourly",
    "@daily",
    "@midnight",
    "@weekly",
    "@monthly",
    "@yearly",
    "@annually",
    "17 * * * *",
    "*/5 * * * *",
    "0 0 * * MON-FRI",
    "0 0 1,15 * ?",
    "0 */2 * JAN-JUN *",
    "0 3  * * 0",
]
REFUSED = [
    "",
    "garbage",
    "@often",
    "* * * *",
    "* * * * * *",
    "TZ=UTC 0 * * * *",
    "a b c d e",
    "17 * * * * ",
    " 17 * * * *",
    "17,* * * *",
    "@hourly 5",
]


@pytest.mark.parametrize("schedule", ACCEPTED)
def test_cron_schedules_and_macros_are_accepted(schedule: str) -> None:
    body = _vi(compaction={"schedule": schedule})
    assert validate_cr(CRDS["VectorIndex"], body) == []


@pytest.mark.parametrize("schedule", REFUSED)
def test_garbage_schedules_are_refused(schedule: str) -> None:
    body = _vi(compaction={"schedule": schedule})
    assert validate_cr(CRDS["VectorIndex"], body) != []


# storage fields of the writer's volumeClaimTemplates ----------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ({"walSize": "10Gi"}, {"walSize": "20Gi"}, "writer.walSize"),
        (None, {"walSize": "20Gi"}, "writer.walSize"),  # from the default
        ({"walSize": "20Gi"}, None, "writer.walSize"),  # back to the default
        (None, {"storageClassName": "fast"}, "writer.storageClassName"),
        ({"storageClassName": "fast"}, {"storageClassName": "slow"}, "writer.storageClassName"),
        ({"storageClassName": "fast"}, {}, "writer.storageClassName"),
    ],
)
def test_wal_volume_fields_are_immutable_with_a_way_out(
    old: dict[str, Any] | None, new: dict[str, Any] | None, field: str
) -> None:
    before, after = _vi(), _vi()  # None: no writer block at all (the example has none)
    if old is not None:
        before["spec"]["writer"] = old
    if new is not None:
        after["spec"]["writer"] = new
    errors = validate_cr(CRDS["VectorIndex"], after, old=before)
    assert any(e.startswith(f".spec: {field} is immutable") for e in errors), errors
    assert any("re-create the VectorIndex with reclaimPolicy Retain" in e for e in errors)
    assert validate_cr(CRDS["VectorIndex"], after) == []  # fine at creation


def test_other_writer_changes_are_allowed() -> None:
    before = _vi(writer={"walSize": "10Gi", "storageClassName": "fast"})
    after = _vi(
        writer={
            "walSize": "10Gi",
            "storageClassName": "fast",
            "resources": {"limits": {"cpu": "4", "memory": "8Gi"}},
        }
    )
    assert validate_cr(CRDS["VectorIndex"], after, old=before) == []


# spec.pods -----------------------------------------------------------------------------------

PODS = {
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"pool": "search"},
    "tolerations": [{"key": "search", "operator": "Equal", "value": "x", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "priorityClassName": "search-critical",
}


@pytest.mark.parametrize("kind", ["VectorIndex", "ModelMigration"])
def test_spec_pods_is_accepted_and_checked(kind: str) -> None:
    path = {"VectorIndex": "vectorindex.yaml", "ModelMigration": "migration/modelmigration.yaml"}[
        kind
    ]
    body = _example(path)
    body["spec"]["pods"] = PODS
    assert validate_cr(CRDS[kind], body) == []
    body["spec"]["pods"] = {**PODS, "tolerations": [{"operator": "Maybe"}]}
    assert any("'Maybe' is not one of" in e for e in validate_cr(CRDS[kind], body))


# every rule refused at least once -------------------------------------------------------------


def _refusals() -> list[str]:
    """Every error of this file's refused objects and of tests/data/invalid/corpus.yaml."""
    out: list[str] = []
    for case in CORPUS:
        base = next(
            dict(yaml.safe_load(p.read_text()))
            for p in sorted((ROOT / "examples").rglob("*.yaml"))
            if yaml.safe_load(p.read_text())["kind"] == case["kind"]
        )
        new = merge_patch(copy.deepcopy(base), case.get("patch", {}))
        if "drop" in case:
            del new["spec"][case["drop"]]
        old = merge_patch(base, case["old"]) if "old" in case else None
        out += validate_cr(CRDS[case["kind"]], new, old)
    out += validate_cr(CRDS["VectorIndex"], _vi("1docs"))
    out += validate_cr(
        CRDS["VectorIndex"], _vi(writer={"walSize": "1Gi"}), old=_vi(writer={"walSize": "2Gi"})
    )
    out += validate_cr(
        CRDS["VectorIndex"],
        _vi(writer={"storageClassName": "a"}),
        old=_vi(writer={"storageClassName": "b"}),
    )
    mm = _example("migration/modelmigration.yaml")
    for field, changed in (
        ("indexRef", {"name": "other"}),
        ("adapter", {"pairs": 12345}),
        ("gate", {"k": 7}),
        ("backfill", {"batch": 17}),
    ):
        out += validate_cr(
            CRDS["ModelMigration"], mm, old=merge_patch(mm, {"spec": {field: changed}})
        )
    return out


def test_every_cel_rule_of_every_crd_refuses_some_example() -> None:
    refused = "\n".join(_refusals())
    missing = []

    def walk(kind: str, s: dict[str, Any]) -> None:
        for r in s.get("x-kubernetes-validations") or ():
            if r.get("message", r["rule"]) not in refused:
                missing.append(f"{kind}: {r['rule']}")
        for sub in (s.get("properties") or {}).values():
            walk(kind, sub)

    for kind, crd in CRDS.items():
        walk(kind, schema_of(crd))
    assert missing == []
