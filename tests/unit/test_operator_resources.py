"""Pure builders: every object validated by kubernetes-validate (strict), the ServiceMonitor
against the vendored prometheus-operator CRD, and the conventions checked object by object."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

from index_operator import resources as res  # noqa: E402
from index_operator.spec import Index, Migration, Model, Ref, SpecError, quantity  # noqa: E402
from index_runtime import contract  # noqa: E402
from index_runtime.contract import JobKind  # noqa: E402
from tests.crd_tools import ROOT  # noqa: E402

K8S = kv.latest_version()
SM_SCHEMA = yaml.safe_load(
    (ROOT / "tests/data/vendor/monitoring.coreos.com_servicemonitors.yaml").read_text()
)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _cr(path: str, uid: str = "u-1") -> dict[str, Any]:
    doc = dict(yaml.safe_load((ROOT / "examples" / path).read_text()))
    doc["metadata"] = {**doc["metadata"], "uid": uid, "generation": 3}
    return doc


IX = Index.parse(_cr("vectorindex.yaml"))
MIG = Migration.parse(_cr("migration/modelmigration.yaml", "u-2"))
NP = res.NetworkPolicyConfig(
    operator_namespace="driftless-system",
    operator_labels={"app.kubernetes.io/name": "driftless", "app.kubernetes.io/instance": "dl"},
)
CL = res.Cluster(monitoring=True, network_policy=NP)
TOKENS = res.Tokens({s: f"plain-{s.value}-token" for s in contract.Scope})


def all_objects() -> list[dict[str, Any]]:
    objs = res.desired_objects(IX, CL, {"minilm": "all-MiniLM-L6-v2"}, TOKENS)
    objs.append(res.desired_compaction_cronjob(IX, CL))
    for kind in (JobKind.TRAIN, JobKind.COMPACT, JobKind.PURGE):
        objs.append(res.desired_job(IX, CL, kind, res.job_name("docs", kind, 4), IX.ref))
    objs.append(res.desired_gate_job(IX, MIG, CL))
    objs.append(res.desired_backfill_job(IX, MIG, CL))
    return objs


OBJECTS = all_objects()


def _pods(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if "template" in spec:
        return [spec["template"]["spec"]]
    if "jobTemplate" in spec:
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_is_valid_and_follows_the_conventions(obj: dict[str, Any]) -> None:
    if obj["kind"] == "ServiceMonitor":
        jsonschema.Draft4Validator(SM_SCHEMA).validate(obj)
    else:
        kv.validate(obj, K8S, strict=True)
    meta = obj["metadata"]
    assert meta["namespace"] == "search"
    owner = meta["ownerReferences"]
    assert len(owner) == 1 and owner[0]["controller"] is True and owner[0]["uid"] in ("u-1", "u-2")
    labels = meta["labels"]
    assert (
        labels["app.kubernetes.io/part-of"] == "driftless"
        and labels["app.kubernetes.io/instance"] == "docs"
    )
    assert len(meta["name"]) <= 63
    for pod in _pods(obj):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert (
                csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
            )
            assert csc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]["cpu"] and c["resources"]["requests"]["memory"]
            env = {e["name"]: e for e in c["env"]}
            for name in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                contract.Env.ADMIN_TOKEN,
                contract.Env.SHADOW_TOKEN,
            ):
                if name in env:  # credentials only by reference
                    assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]
            assert c["command"][0] == contract.EXECUTABLE
    if meta["name"] != "docs-tokens":  # plaintext tokens live in that Secret only
        assert not any(t in json.dumps(obj) for t in TOKENS.by_scope.values())


def test_runtime_pods_have_probes_and_threads_follow_every_cpu_limit() -> None:
    by_name = {
        o["metadata"]["name"]: o
        for o in OBJECTS
        if o["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    reader = by_name["docs-reader"]["spec"]["template"]["spec"]["containers"][0]
    assert reader["readinessProbe"]["httpGet"]["path"] == contract.READINESS_PATH
    assert reader["livenessProbe"]["httpGet"]["path"] == contract.LIVENESS_PATH
    assert (
        reader["startupProbe"]["failureThreshold"] * reader["startupProbe"]["periodSeconds"] >= 300
    )
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert reader[probe]["timeoutSeconds"] >= 3  # the 1 s default failed on busy nodes
    assert reader["resources"]["limits"]["cpu"] == "1"  # from the example's spec
    assert by_name["docs-writer"]["spec"]["replicas"] == 1
    assert (
        by_name["docs-writer"]["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
            "storage"
        ]
        == "10Gi"
    )
    assert by_name["docs-reader"]["spec"]["replicas"] == 2


def test_jobs_are_deterministic_retry_policies_and_the_backfill_is_indexed() -> None:
    a = res.desired_job(IX, CL, JobKind.TRAIN, res.job_name("docs", JobKind.TRAIN, 7), IX.ref)
    b = res.desired_job(IX, CL, JobKind.TRAIN, res.job_name("docs", JobKind.TRAIN, 7), IX.ref)
    assert a == b and a["metadata"]["name"] == "docs-train-7"
    rule = a["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [
        contract.ExitCode.INVALID
    ]
    bf = res.desired_backfill_job(IX, MIG, CL)
    assert (
        bf["spec"]["completionMode"] == "Indexed"
        and bf["metadata"]["name"] == "docs-to-e5-backfill"
    )
    gate = res.desired_gate_job(IX, MIG, CL)
    pod = gate["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == CL.runtime_image  # it drives the writer's API
    assert pod["volumes"][1]["configMap"]["name"] == "docs-labelled-queries"
    spec = json.loads(
        next(e["value"] for e in pod["containers"][0]["env"] if e["name"] == contract.Env.JOB_SPEC)
    )
    assert spec["to_model"] == "e5-small" and spec["kinds"] == ["procrustes", "mlp"]


def test_service_monitor_only_when_the_api_exists_and_pdb_only_with_two_readers() -> None:
    kinds = {o["kind"] for o in res.desired_objects(IX, res.Cluster(monitoring=False), {}, TOKENS)}
    assert "ServiceMonitor" not in kinds and "PodDisruptionBudget" in kinds
    one = Index.parse(
        {
            **_cr("vectorindex.yaml"),
            "spec": {**_cr("vectorindex.yaml")["spec"], "readers": {"replicas": 1}},
        }
    )
    kinds = {o["kind"] for o in res.desired_objects(one, CL, {}, TOKENS)}
    assert "PodDisruptionBudget" not in kinds


def test_workload_identity_replaces_keys() -> None:
    doc = _cr("vectorindex.yaml")
    st = {k: v for k, v in doc["spec"]["storage"].items() if k != "credentialsSecret"}
    doc["spec"] = {**doc["spec"], "storage": {**st, "serviceAccountName": "irsa-docs"}}
    ix = Index.parse(doc)
    writer = next(o for o in res.desired_objects(ix, CL, {}, TOKENS) if o["kind"] == "StatefulSet")
    pod = writer["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "irsa-docs"
    assert not any(e["name"].startswith("AWS_ACCESS") for e in pod["containers"][0]["env"])


@pytest.mark.parametrize(
    ("parts", "expect"),
    [(("docs", "writer"), "docs-writer"), (("a" * 70, "train", "3"), None)],
)
def test_names_are_dns_labels(parts: tuple[str, ...], expect: str | None) -> None:
    name = res.dns_name(*parts)
    assert len(name) <= 63 and name == res.dns_name(*parts)
    if expect:
        assert name == expect


@pytest.mark.parametrize(("q", "v"), [("500m", 0.5), ("2", 2.0), ("1Gi", 2.0**30), ("1.5", 1.5)])
def test_quantities(q: str, v: float) -> None:
    assert quantity(q) == v


def test_bad_quantity_and_model_spec() -> None:
    with pytest.raises(SpecError):
        quantity("lots")
    with pytest.raises(SpecError):
        Model.parse({"metadata": {"name": "m"}, "spec": {"dimension": 3, "encoder": {}}})
    assert (
        Ref.of({"kind": "K", "metadata": {"name": "n", "namespace": "s", "uid": "u"}}).generation
        == 1
    )


def test_settings_follow_the_spec_and_the_runtime_accepts_them() -> None:
    from index_runtime.index.settings import IndexSettings

    s = IndexSettings.from_json(IX.settings, 384)
    assert s.primary.nlist == 1024 and s.oracle.theta == 0.9 and s.lifecycle.tau == 40000
    assert (
        Index.parse(
            {**_cr("vectorindex.yaml"), "spec": {**_cr("vectorindex.yaml")["spec"], "primary": {}}}
        ).settings["primary"]["nlist"]
        == "auto"
    )


def test_pods_with_bundled_encoders_use_the_jobs_image() -> None:
    def images(encoders: dict[str, str]) -> set[str]:
        objs = res.desired_objects(IX, CL, encoders, TOKENS)
        return {
            c["image"]
            for o in objs
            if o["kind"] in ("StatefulSet", "Deployment")
            for c in o["spec"]["template"]["spec"]["containers"]
        }

    assert images({"minilm": "all-MiniLM-L6-v2"}) == {CL.jobs_image}
    assert images({"remote": "http://emb.ml.svc:8000/v1#m"}) == {CL.runtime_image}


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in _pods(obj) for c in pod["containers"]]


@pytest.mark.parametrize(
    ("cpu", "threads"), [("2", "2"), ("2500m", "2"), ("1", "1"), ("500m", "1"), (None, "1")]
)
def test_omp_and_mkl_threads_follow_the_cpu_limit_of_every_pod(
    cpu: str | None, threads: str
) -> None:
    limits = {"cpu": cpu} if cpu else {}
    res_spec = {"resources": {"limits": limits}}
    body = _cr("vectorindex.yaml")
    body["spec"] = {**body["spec"], "writer": res_spec, "readers": res_spec, "shadow": res_spec}
    ix = Index.parse(body)
    pods = [o for o in res.desired_objects(ix, CL, {}, TOKENS) if _pods(o)]
    assert {o["kind"] for o in pods} == {"StatefulSet", "Deployment"}
    for c in (c for o in pods for c in _containers(o)):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads, c["name"]


def test_jobs_that_poll_the_writer_are_small_and_heavy_ones_keep_their_resources() -> None:
    jobs = [o for o in OBJECTS if o["kind"] in ("Job", "CronJob")]
    kinds = set()
    for obj in jobs:
        (c,) = _containers(obj)
        kinds.add(c["name"])
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        cores = max(1, int(quantity(lim["cpu"])))
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(cores)
        if c["name"] in (JobKind.PURGE.value, JobKind.BACKFILL.value):
            assert quantity(req["cpu"]) >= 1 and quantity(req["memory"]) >= 2 * 2**30
        else:  # train, compact, the migration gate: start an operation, then poll it
            assert quantity(req["cpu"]) <= 0.1 and quantity(req["memory"]) <= 128 * 2**20
            assert quantity(lim["memory"]) <= 256 * 2**20
    assert kinds == {k.value for k in JobKind}


@pytest.mark.parametrize(
    ("flag", "env", "threads"),
    [(None, {}, 1), (None, {"OMP_NUM_THREADS": "2"}, 2), (3, {"OMP_NUM_THREADS": "2"}, 3),
     (None, {"OMP_NUM_THREADS": "x"}, 1), (0, {}, 1)],
)
def test_serve_takes_its_threads_from_the_pods_environment(
    flag: int | None, env: dict[str, str], threads: int
) -> None:
    from index_runtime.cli import build_parser, omp_threads

    argv = ["serve"] + ([] if flag is None else ["--omp-threads", str(flag)])
    args = build_parser().parse_args(argv)
    assert omp_threads(args.omp_threads, env) == threads


def test_spec_pods_override_the_defaults_field_by_field() -> None:
    from index_operator.spec import PodOptions

    defaults = PodOptions.parse(
        {
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "general"},
            "priorityClassName": "low",
        }
    )
    cl = res.Cluster(pod_defaults=defaults)
    body = _cr("vectorindex.yaml")
    toleration = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    body["spec"] = {**body["spec"], "pods": {"nodeSelector": {}, "tolerations": [toleration]}}
    ix = Index.parse(body)
    mbody = _cr("migration/modelmigration.yaml", "u-2")
    mbody["spec"] = {**mbody["spec"], "pods": {"priorityClassName": "batch"}}
    mig = Migration.parse(mbody)
    index_pods = [
        *(o for o in res.desired_objects(ix, cl, {}, TOKENS) if _pods(o)),
        res.desired_compaction_cronjob(ix, cl),
        res.desired_job(ix, cl, JobKind.TRAIN, "t", ix.ref),
    ]
    for obj in index_pods:
        (pod,) = _pods(obj)
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]  # inherited
        assert "nodeSelector" not in pod  # cleared by the index
        assert pod["tolerations"] == [toleration] and pod["priorityClassName"] == "low"
        kv.validate(obj, K8S, strict=True)
    for obj in (res.desired_gate_job(ix, mig, cl), res.desired_backfill_job(ix, mig, cl)):
        (pod,) = _pods(obj)
        assert pod["priorityClassName"] == "batch"  # the migration's own
        assert pod["tolerations"] == [toleration]  # the index's
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_backfill_rate_reaches_the_workers_of_the_job() -> None:
    """spec.backfill.rate → the Job's DRIFTLESS_JOB_SPEC → each worker's cap, read by the
    worker's own parser (before, the operator dropped it and only batch reached the pods)."""
    from index_runtime.backfill_worker import config_from_env

    def worker_rate(mig: Migration) -> float:
        env = res.desired_backfill_job(IX, mig, CL)["spec"]["template"]["spec"]["containers"][0]["env"]
        spec = json.loads(next(e["value"] for e in env if e["name"] == contract.Env.JOB_SPEC))
        values = {contract.Env.BACKFILL_SHARES: "2", contract.Env.JOB_COMPLETION_INDEX: "1"}
        return config_from_env(values, spec).rate

    doc = _cr("migration/modelmigration.yaml", "u-2")
    assert worker_rate(Migration.parse(doc)) == 0.0  # unset: none, and no key in the spec
    doc["spec"]["backfill"] = {**doc["spec"].get("backfill", {}), "rate": 2.5}
    assert worker_rate(Migration.parse(doc)) == 2.5
