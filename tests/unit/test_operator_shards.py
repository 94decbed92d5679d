"""A sharded VectorIndex in the operator's pure core: the objects for n = 1 are byte for byte
what the operator built before shards (a golden file written by the code before the change),
for n = 3 every name, prefix, env and label; names that clash with another index's; the
status combined from the shards'; a migration's gate Job against the router; the CRD rule."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

from index_operator import resources as res  # noqa: E402
from index_operator.reconcile.index import Act, IndexObservation, IndexPlan, plan_index  # noqa: E402
from index_operator.reconcile.jobs import JobState  # noqa: E402
from index_operator.reconcile.migration import MAct, MigrationObservation, plan_migration  # noqa: E402
from index_operator.reconcile.shards import combine_shards, shard_prior  # noqa: E402
from index_operator.resources.placement import (  # noqa: E402
    SHARD_LABEL,
    Placement,
    name_conflicts,
    placements,
)
from index_operator.spec import Index, Migration, SpecError  # noqa: E402
from index_runtime import contract  # noqa: E402
from index_runtime.contract import Env, JobKind, Role, Scope  # noqa: E402
from index_runtime.shards import shard_prefix  # noqa: E402
from tests.crd_tools import ROOT, load_crds, validate_cr  # noqa: E402
from tests.unit.test_operator_reconcile import SETTINGS, writer  # noqa: E402

K8S = kv.latest_version()
SM_SCHEMA = yaml.safe_load(
    (ROOT / "tests/data/vendor/monitoring.coreos.com_servicemonitors.yaml").read_text()
)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
TOKENS = res.Tokens({s: "t" + s.value for s in Scope})
CL = res.Cluster(monitoring=True, network_policy=res.NetworkPolicyConfig())
NS = "ns"


def body(name: str = "docs", shards: int | None = None, **spec: Any) -> dict[str, Any]:
    b = yaml.safe_load((ROOT / "examples/vectorindex.yaml").read_text())
    b["metadata"].update(name=name, uid=f"uid-{name}", namespace=NS)
    b["spec"]["storage"]["prefix"] = "indexes"
    b["spec"]["queryLog"] = {"enabled": True}
    if shards is not None:
        b["spec"]["shards"] = shards
    b["spec"].update(spec)
    return dict(b)


def objects(ix: Index, cl: res.Cluster = CL) -> list[dict[str, Any]]:
    ats = placements(ix.ref.name, ix.shards)
    out = res.desired_objects(ix, cl, {"m": "x"}, TOKENS)
    out += [res.desired_compaction_cronjob(ix, cl, False, at) for at in ats]
    for at in ats:
        out += [
            res.desired_job(ix, cl, k, res.job_name(at.stem, k, 3), ix.ref, at=at)
            for k in (JobKind.TRAIN, JobKind.COMPACT, JobKind.PURGE)
        ]
    return out


def env(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    pod = (spec.get("template") or spec["jobTemplate"]["spec"]["template"])["spec"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def by_name(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


# n = 1: as before ---------------------------------------------------------------------------


def test_an_unsharded_index_gets_exactly_the_objects_of_the_operator_before_shards() -> None:
    """tests/data/shards/unsharded-objects.json was written by the builders before this
    change (the example index with the query log on, two cluster settings, the CronJob and a
    train, compact and purge Job per kind); shards: 1 written out or left to the default."""
    golden = json.loads((ROOT / "tests/data/shards/unsharded-objects.json").read_text())
    for shards in (None, 1):
        b = yaml.safe_load((ROOT / "examples/vectorindex.yaml").read_text())
        b["metadata"].update(uid="u", namespace="ns")
        b["spec"]["queryLog"] = {"enabled": True}
        if shards is not None:
            b["spec"]["shards"] = shards
        ix = Index.parse(b)
        out: list[dict[str, Any]] = []
        for cl in (res.Cluster(), CL):
            out += res.desired_objects(ix, cl, {"m": "x"}, TOKENS)
            out.append(res.desired_compaction_cronjob(ix, cl, True))
            out += [res.desired_job(ix, cl, k, res.job_name("docs", k, 3), ix.ref) for k in JobKind]
        assert json.loads(json.dumps(out, sort_keys=True)) == golden


# n = 3: every shard's objects -----------------------------------------------------------------

IX3 = Index.parse(body(shards=3))
OBJS3 = objects(IX3)


def test_a_three_shard_index_has_each_shards_objects_the_router_and_the_shared_ones() -> None:
    names = sorted(by_name(OBJS3))
    per_shard = {
        ("Service", "docs-s{}-writer"),
        ("StatefulSet", "docs-s{}-writer"),
        ("Service", "docs-s{}-shadow"),
        ("Deployment", "docs-s{}-shadow"),
        ("Service", "docs-s{}-reader"),
        ("Deployment", "docs-s{}-reader"),
        ("PodDisruptionBudget", "docs-s{}-reader"),
        ("CronJob", "docs-s{}-compact"),
        ("Job", "docs-s{}-train-3"),
        ("Job", "docs-s{}-compact-3"),
        ("Job", "docs-s{}-purge-3"),
    }
    shared = {
        ("NetworkPolicy", "docs-runtime"),
        ("Secret", "docs-tokens"),
        ("Secret", "docs-token-hashes"),
        ("ConfigMap", "docs-config"),
        ("Deployment", "docs-router"),
        ("PodDisruptionBudget", "docs-router"),
        ("Service", "docs-writer"),  # the names clients use, now in front of the router
        ("Service", "docs-reader"),
        ("ServiceMonitor", "docs-metrics"),
    }
    want = shared | {(k, n.format(i)) for k, n in per_shard for i in range(3)}
    assert len(names) == len(OBJS3)  # no name twice within one kind
    assert set(names) == want
    for o in OBJS3:
        if o["kind"] == "ServiceMonitor":  # against the vendored prometheus-operator CRD
            jsonschema.validate(o, SM_SCHEMA)
        else:
            kv.validate(o, K8S, strict=True)


@pytest.mark.parametrize("i", range(3))
def test_each_shards_pods_reach_their_own_shard_and_store_under_their_own_prefix(i: int) -> None:
    objs = by_name(OBJS3)
    prefix = f"indexes/_shards/3/{i}"
    assert shard_prefix("indexes", i, 3) == prefix
    for kind, role in (
        ("StatefulSet", "writer"),
        ("Deployment", "reader"),
        ("Deployment", "shadow"),
    ):
        o = objs[(kind, f"docs-s{i}-{role}")]
        e = env(o)
        assert e[Env.S3_PREFIX] == prefix and e[Env.INDEX] == "docs"
        want = {
            "app.kubernetes.io/name": "driftless",
            "app.kubernetes.io/instance": "docs",
            "app.kubernetes.io/component": role,
            SHARD_LABEL: str(i),
        }
        assert o["spec"]["selector"]["matchLabels"] == want
        assert want.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        assert o["metadata"]["labels"][SHARD_LABEL] == str(i)
        svc = objs[("Service", f"docs-s{i}-{role}")]
        assert svc["spec"]["selector"] == want
    assert objs[("StatefulSet", f"docs-s{i}-writer")]["spec"]["serviceName"] == f"docs-s{i}-writer"
    reader = env(objs[("Deployment", f"docs-s{i}-reader")])
    assert reader[Env.SHADOW_URL] == f"http://docs-s{i}-shadow.ns.svc:8080"
    assert reader[Env.WRITER_URL] == f"http://docs-s{i}-writer.ns.svc:8080"  # the query log
    for job in ("train", "compact"):
        e = env(objs[("Job", f"docs-s{i}-{job}-3")])
        assert e[Env.WRITER_URL] == f"http://docs-s{i}-writer.ns.svc:8080"
        assert Env.S3_PREFIX not in e
    assert env(objs[("Job", f"docs-s{i}-purge-3")])[Env.S3_PREFIX] == prefix
    assert env(objs[("CronJob", f"docs-s{i}-compact")])[Env.WRITER_URL].startswith(
        f"http://docs-s{i}-writer."
    )


def test_shards_pods_are_selected_by_their_own_shard_only() -> None:
    """A shard's Deployment, Service or PDB never selects another shard's pods (nor the
    router's): every selector pins the component and the shard."""
    pods = [
        (o["metadata"]["name"], o["spec"]["template"]["metadata"]["labels"])
        for o in OBJS3
        if o["kind"] in ("StatefulSet", "Deployment")
    ]
    for o in OBJS3:
        if o["kind"] == "Service":
            sel = o["spec"]["selector"]
        elif o["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            sel = o["spec"]["selector"]["matchLabels"]
        else:
            continue
        chosen = [n for n, labels in pods if sel.items() <= labels.items()]
        assert len(chosen) == 1, (o["kind"], o["metadata"]["name"], chosen)


def test_the_router_takes_the_shards_urls_the_tokens_as_a_reader_and_the_front_services() -> None:
    objs = by_name(OBJS3)
    router = objs[("Deployment", "docs-router")]
    pod = router["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == contract.route_command()
    e = env(router)
    assert e[Env.SHARD_WRITERS] == ",".join(
        f"http://docs-s{i}-writer.ns.svc:8080" for i in range(3)
    )
    assert e[Env.SHARD_READERS] == ",".join(
        f"http://docs-s{i}-reader.ns.svc:8080" for i in range(3)
    )
    assert e[Env.INDEX] == "docs"
    reader = objs[("Deployment", "docs-s0-reader")]
    rc = reader["spec"]["template"]["spec"]["containers"][0]
    # the token variables and the hashes file as the readers get them; no storage at all
    for name in (Env.TOKENS_FILE, Env.SHADOW_TOKEN):
        assert e[name] == env(reader)[name]
    assert not any(k.startswith("DRIFTLESS_S3") or k.startswith("AWS_") for k in e)
    assert c["volumeMounts"] == [m for m in rc["volumeMounts"] if m["name"] in ("tmp", "tokens")]
    assert c["securityContext"] == rc["securityContext"]
    assert pod["securityContext"] == reader["spec"]["template"]["spec"]["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"] == rc["resources"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe] == rc[probe]
    assert c["readinessProbe"]["httpGet"]["path"] == contract.READINESS_PATH
    for role in ("writer", "reader"):
        svc = objs[("Service", f"docs-{role}")]
        assert svc["spec"]["selector"] == {
            "app.kubernetes.io/name": "driftless",
            "app.kubernetes.io/instance": "docs",
            "app.kubernetes.io/component": "router",
        }
        assert "clusterIP" not in svc["spec"]  # no longer the headless writer Service
    # the router is scraped once (through the reader Service), the shards' Services each
    metrics = {
        n
        for (k, n), o in objs.items()
        if k == "Service" and o["metadata"]["labels"].get("driftless.dev/metrics")
    }
    assert metrics == {"docs-reader"} | {
        f"docs-s{i}-{r}" for i in range(3) for r in ("writer", "reader", "shadow")
    }
    sm = objs[("ServiceMonitor", "docs-metrics")]
    assert SHARD_LABEL in sm["spec"]["targetLabels"]
    np = objs[("NetworkPolicy", "docs-runtime")]
    assert "router" in np["spec"]["podSelector"]["matchExpressions"][0]["values"]


def test_the_router_command_parses_with_the_runtime_cli() -> None:
    from index_runtime.cli import build_parser

    args = build_parser().parse_args(contract.route_command()[1:])
    assert args.from_env and args.port == contract.HTTP_PORT


def test_no_shard_stores_under_another_shards_or_another_indexs_prefix() -> None:
    """Where the runtime puts an index's objects: ``<S3_PREFIX>/<index>/`` (engine.py); the
    shards of a 1-, 2- and 3-shard index and unsharded neighbours never nest."""

    def roots(name: str, shards: int) -> list[str]:
        return [f"{at.prefix('indexes')}/{name}/" for at in placements(name, shards)]

    all_roots = [
        *roots("docs", 3),
        *roots("docs", 2),  # another namespace's index of the same name and another count
        *roots("docs-s1", 1),
        *roots("docs-s1", 3),
        *roots("other", 3),
        *roots("docs", 1),
    ]
    assert len(set(all_roots)) == len(all_roots)
    for a, b in itertools.permutations(all_roots, 2):
        assert not b.startswith(a), (a, b)


# names that clash with another index's ---------------------------------------------------------


def _names(name: str, shards: int) -> dict[tuple[str, str], dict[str, Any]]:
    return by_name(objects(Index.parse(body(name, shards=shards))))


def test_clashing_names_are_exactly_those_of_an_index_named_like_a_shard() -> None:
    """Across pairs of index names and shard counts, two indexes' objects share a name only
    when one is called ``<other>-s<i>`` with i < the other's shards, and ``name_conflicts``
    reports exactly the shared names."""
    cases = [
        ("docs", 3),
        ("docs-s1", 1),
        ("docs-s1", 2),
        ("docs-s5", 1),
        ("doc", 3),
        ("docs-router", 1),
        ("docs-s0-writer", 1),
        ("s1", 2),
    ]
    for (a, na), (b, nb) in itertools.permutations(cases, 2):
        if a == b:
            continue
        mine, theirs = _names(a, na), _names(b, nb)
        shared = set(mine) & set(theirs)

        def live(kind: str, name: str, theirs: Any = theirs) -> Any:
            return theirs.get((kind, name))

        found = name_conflicts(mine.values(), live, a)
        assert len(found) == len(shared), (a, b, found)
        like_a_shard = any(a == f"{b}-s{i}" for i in range(nb)) or any(
            b == f"{a}-s{i}" for i in range(na)
        )
        assert bool(shared) == like_a_shard, (a, na, b, nb, sorted(shared))


def test_an_object_of_the_same_index_or_an_unowned_one_is_no_conflict() -> None:
    mine = _names("docs", 3)
    assert name_conflicts(mine.values(), lambda k, n: mine.get((k, n)), "docs") == []
    bare = {"metadata": {"name": "docs-s1-writer"}}
    assert name_conflicts(mine.values(), lambda k, n: bare, "docs") == []


# the status of a sharded index ------------------------------------------------------------------


def _plan(w: Any, prior: Mapping[str, Any] | None = None, **kw: Any) -> IndexPlan:
    return plan_index(
        IX3,
        IndexObservation(now=1000.0, writer=w, prior=prior or {}, **kw),
        SETTINGS,
    )


SERVING = writer(live=800, serving=1)


def test_the_index_serves_only_when_every_shard_serves() -> None:
    plans = [_plan(SERVING), _plan(SERVING), _plan(SERVING)]
    st = combine_shards(IX3, plans, {}, 1000.0).status
    assert st["phase"] == "Serving" and st["counts"]["vectors"] == 2400
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert [s["shard"] for s in st["shards"]] == [0, 1, 2]
    assert all(s["ready"] and s["phase"] == "Serving" and s["rows"] == 800 for s in st["shards"])

    plans[1] = _plan(None)  # shard 1's writer does not answer
    st = combine_shards(IX3, plans, {}, 1000.0).status
    assert st["phase"] == "Pending" and st["reason"] == "Shard1Pending"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "[1]" in ready["message"]
    assert [s["ready"] for s in st["shards"]] == [True, False, True]

    plans[1] = _plan(writer(live=100))  # shard 1 still collecting rows
    st = combine_shards(IX3, plans, {}, 1000.0).status
    assert st["phase"] == "ColdStart"
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "True"


def test_a_shards_jobs_and_phase_come_back_as_its_prior() -> None:
    """The next pass plans shard i from its own entry: a train Job recorded for shard 2 is
    seen there (running: no second Job), not on the other shards."""
    plans = [_plan(writer(live=800)) for _ in range(3)]
    assert all(Act.START_JOB in {a.act for a in p.actions} for p in plans)
    st = combine_shards(IX3, plans, {}, 1000.0).status
    st["shards"][2]["jobs"]["train"] = {"seq": 1, "name": "docs-s2-train-1", "state": "Active"}
    before = shard_prior(st, 2)
    again = _plan(writer(live=800), before, jobs={"train": JobState.ACTIVE})
    assert not [a for a in again.actions if a.act is Act.START_JOB]
    assert shard_prior(st, 1)["jobs"] == {}


def test_combining_needs_one_plan_per_shard() -> None:
    with pytest.raises(ValueError, match="2 shard plans for 3 shards"):
        combine_shards(IX3, [_plan(SERVING)] * 2, {}, 1000.0)


# migrations, the spec, the CRD ---------------------------------------------------------------


def test_a_migration_of_a_sharded_index_starts_a_gate_job_that_drives_the_router() -> None:
    """No refusal: the first pass creates the gate Job; the Job drives ``<index>-writer``
    (the router's Service when sharded) and asks for an internal backfill (each shard's
    writer re-encodes its own rows); an unsharded index's gate keeps the external one."""
    mig = Migration.parse(
        {
            "kind": "ModelMigration",
            "metadata": {"name": "m", "namespace": NS, "uid": "m-1"},
            "spec": {"indexRef": {"name": "docs"}, "targetModelRef": {"name": "new"}},
        }
    )
    plan = plan_migration(mig, MigrationObservation(now=1.0, record=None, shards=3))
    assert (plan.status["phase"], plan.status["reason"]) == ("Pending", "GateJobCreated")
    assert [(a.act, a.job) for a in plan.actions] == [(MAct.START_JOB, JobKind.MIGRATE)]

    def gate_env(ix: Index) -> dict[str, Any]:
        job = res.desired_gate_job(ix, mig, CL)
        return {
            e["name"]: e.get("value")
            for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }

    env = gate_env(IX3)
    assert env[Env.WRITER_URL] == f"http://docs-writer.{NS}.svc:{contract.HTTP_PORT}"
    router_svc = by_name(objects(IX3))[("Service", "docs-writer")]
    assert router_svc["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    spec = json.loads(env[Env.JOB_SPEC])
    assert spec["backfill_mode"] == "internal" and "backfill_shares" not in spec
    one = json.loads(gate_env(Index.parse(body()))[Env.JOB_SPEC])
    assert one["backfill_mode"] == "external" and one["backfill_shares"] >= 1


@pytest.mark.parametrize("bad", [0, 65, True, "3"])
def test_a_shard_count_outside_1_to_64_is_a_spec_error(bad: Any) -> None:
    with pytest.raises(SpecError):
        Index.parse(body(shards=bad))


def test_the_crd_fixes_shards_at_creation() -> None:
    crd = load_crds()["VectorIndex"]
    assert validate_cr(crd, body(shards=3)) == []
    assert validate_cr(crd, body(shards=3), old=body(shards=3)) == []
    for old, new in ((3, 4), (3, None), (None, 2), (1, 64)):
        errors = validate_cr(crd, body(shards=new), old=body(shards=old))
        assert any("shards is immutable: resharding is not supported" in e for e in errors), (
            old,
            new,
        )
    assert validate_cr(crd, body(shards=1), old=body()) == []  # the default, written out
    cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"name": "Shards", "type": "integer", "jsonPath": ".spec.shards"} in cols


def test_placements_of_an_unsharded_index_are_the_index_itself() -> None:
    (at,) = placements("docs", 1)
    assert at == Placement("docs") and at.stem == "docs" and at.shard_labels() == {}
    assert at.service(Role.WRITER) == res.service_name("docs", Role.WRITER)
    assert at.prefix("indexes") == "indexes"
    with pytest.raises(ValueError):
        Placement("docs", 3, 3)


def _with_window(kind: str, count: int, mean: float, lo: float, hi: float) -> dict[str, Any]:
    w = writer(live=800, serving=1)
    w["windows"] = {kind: {"count": count, "mean": mean, "lower": lo, "upper": hi}}
    return w


def test_the_index_overlap_pools_the_shards_samples() -> None:
    """status.overlap of a sharded index: the shards' windows pooled by sample count (it was
    the weakest shard's window alone, whatever the others measured)."""
    wins = [
        ("serving", 60, 0.95, 0.92, 0.98),
        ("serving", 20, 0.90, 0.80, 0.97),
        ("serving", 100, 0.97, 0.95, 0.99),
    ]
    st = combine_shards(IX3, [_plan(_with_window(*w)) for w in wins], {}, 1000.0).status
    ov = st["overlap"]
    assert ov["window"] == "serving" and ov["samples"] == 180
    assert ov["mean"] == pytest.approx((60 * 0.95 + 20 * 0.90 + 100 * 0.97) / 180, abs=1e-4)
    # count-weighted bounds: never tighter than the widest shard's share would allow
    assert ov["lower"] == pytest.approx((60 * 0.92 + 20 * 0.80 + 100 * 0.95) / 180, abs=1e-4)
    assert ov["upper"] == pytest.approx((60 * 0.98 + 20 * 0.97 + 100 * 0.99) / 180, abs=1e-4)
    assert ov["summary"].endswith("(3 shards)")
    assert [s["overlap"]["samples"] for s in st["shards"]] == [60, 20, 100]  # each shard's own

    # a shard without samples: the index is unmeasured there, the pool would flatter it
    st = combine_shards(
        IX3,
        [_plan(_with_window(*wins[0])), _plan(SERVING), _plan(_with_window(*wins[2]))],
        {},
        1000.0,
    ).status
    assert st["overlap"]["samples"] == 0 and st["overlap"]["summary"] == "-"

    # windows of different kinds (shard 1 validates a candidate) are not pooled: the weakest
    mixed = [wins[0], ("candidate", 20, 0.90, 0.80, 0.97), wins[2]]
    st = combine_shards(IX3, [_plan(_with_window(*w)) for w in mixed], {}, 1000.0).status
    assert st["overlap"]["window"] == "candidate" and st["overlap"]["summary"].endswith("(shard 1)")
