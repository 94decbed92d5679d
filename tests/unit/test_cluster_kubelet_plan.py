"""The local cluster's kubelet and controllers as pure decisions (tests/cluster/kubelet_plan.py,
kubelet_controllers.py, kubelet_pods.py): the operator's own manifests through them (argv from
the Dockerfile, env, volumes, probes), Job / Deployment / StatefulSet steps, Endpoints."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml

from index_operator import resources as res
from index_operator.spec import Index, Migration
from index_runtime import contract
from index_runtime.contract import Role
from tests.cluster import kubelet_controllers as ctl
from tests.cluster.kubelet_plan import (
    ConfigError,
    ImageConfig,
    ProbeCounter,
    container_argv,
    container_probes,
    crash_backoff,
    decode_data,
    default_home,
    image_target,
    initial_counter,
    parse_dockerfile,
    probe_step,
    projected_files,
    resolve_env,
    restarts_container,
)
from tests.cluster.kubelet_pods import FAILURES_KEY, INDEX_KEY, pod_manifest, pvc_manifest
from tests.crd_tools import ROOT

TARGETS = parse_dockerfile((ROOT / "Dockerfile").read_text())


def _cr(path: str, uid: str) -> dict[str, Any]:
    doc = dict(yaml.safe_load((ROOT / "examples" / path).read_text()))
    doc["metadata"] = {**doc["metadata"], "uid": uid, "generation": 1}
    return doc


IX = Index.parse(_cr("vectorindex.yaml", "u-1"))
MIG = Migration.parse(_cr("migration/modelmigration.yaml", "u-2"))
CL = res.Cluster()
TOKENS = res.Tokens({s: f"plain-{s.value}-token" for s in contract.Scope})
ENCODERS = {"minilm": "http://encoder:8000"}


def _owned(obj: dict[str, Any], uid: str = "o-1") -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "uid": uid, "namespace": IX.ref.namespace}}


def _store(objs: list[dict[str, Any]]) -> Any:
    by = {(("secrets" if o["kind"] == "Secret" else "configmaps"), o["metadata"]["name"]): o for o in objs if o["kind"] in ("Secret", "ConfigMap")}

    def lookup(kind: str, name: str) -> dict[str, bytes] | None:
        o = by.get((kind, name))
        return None if o is None else decode_data(o, secret=kind == "secrets")

    return lookup


S3_SECRET = {  # the user's Secret the example index names
    "kind": "Secret",
    "metadata": {"name": IX.storage.secret},
    "stringData": {IX.storage.access_key_id_key: "id", IX.storage.secret_access_key_key: "key"},
}
OBJS = [*res.desired_objects(IX, CL, ENCODERS, TOKENS), S3_SECRET]
LOOKUP = _store(OBJS)


def _kind(kind: str, name_part: str = "") -> dict[str, Any]:
    return next(o for o in OBJS if o["kind"] == kind and name_part in o["metadata"]["name"])


# --- the operator's pods through the plan -----------------------------------------------------


def test_operator_pods_get_the_runtime_command_env_and_probes() -> None:
    sts = _owned(_kind("StatefulSet"))
    pod = pod_manifest(sts, sts["spec"]["template"], f"{sts['metadata']['name']}-0", revision="r1", ordinal=0)
    c = pod["spec"]["containers"][0]
    image = TARGETS[image_target(c["image"])]
    assert container_argv(c, image) == contract.serve_command(Role.WRITER)
    env = resolve_env(c, {**pod, "status": {"podIP": "10.251.3.7"}}, LOOKUP)
    assert env[contract.Env.INDEX.value] == IX.ref.name
    assert env["AWS_SECRET_ACCESS_KEY"] == "key"  # secretKeyRef
    assert json.loads(env[contract.Env.ENCODERS.value]) == ENCODERS  # configMapKeyRef
    probes = container_probes(c, scale=0.5)
    assert probes.liveness is not None and probes.liveness.port == contract.HTTP_PORT  # "http"
    assert probes.liveness.period_s == 5.0 and probes.startup is not None
    # the timeout is the operator's, unscaled: a loaded pod answers no faster on a test clock
    assert probes.liveness.timeout_s == c["livenessProbe"]["timeoutSeconds"]
    # the WAL's claim: one PVC volume per volumeClaimTemplate, the pod's DNS identity
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"wal": f"wal-{sts['metadata']['name']}-0"}
    assert pod["spec"]["hostname"] == pod["metadata"]["name"]
    assert pod["spec"]["subdomain"] == sts["spec"]["serviceName"]


def test_token_secret_volume_files_keep_their_mode() -> None:
    sts = _kind("StatefulSet")
    vols = [projected_files(v, LOOKUP) for v in sts["spec"]["template"]["spec"]["volumes"]]
    files = [f for f in vols if f is not None and f.files]
    assert files, "the tokens hashes Secret volume"
    (data, mode), = files[0].files.values()
    assert mode == 0o440 and data


def test_backfill_pods_see_their_completion_index() -> None:
    job = _owned(res.desired_backfill_job(IX, MIG, CL))
    pod = pod_manifest(job, job["spec"]["template"], "bf-1-x", index=1, index_failures=2)
    assert pod["metadata"]["annotations"][FAILURES_KEY] == "2"
    c = pod["spec"]["containers"][0]
    env = resolve_env(c, pod, LOOKUP)
    assert env["JOB_COMPLETION_INDEX"] == "1"
    assert pod["metadata"]["labels"][INDEX_KEY] == "1"
    assert container_argv(c, TARGETS[image_target(c["image"])]) == contract.job_command(contract.JobKind.BACKFILL)


def test_dockerfile_targets_and_the_chart_operator_args() -> None:
    op = TARGETS["operator"]
    assert op.entrypoint == ("driftless", "operator") and op.cmd == ()
    assert op.user.startswith("10001")
    # the chart's operator Deployment gives only args: ENTRYPOINT + args
    argv = container_argv({"name": "operator", "args": ["--priority=100"]}, op)
    assert argv == ["driftless", "operator", "--priority=100"]
    rt = TARGETS["runtime"]
    assert container_argv({"name": "x"}, rt)[:2] == ["driftless", "serve"]  # ENTRYPOINT + CMD
    assert dict(rt.env)["OMP_NUM_THREADS"] == "1"
    assert dict(rt.env)["PATH"].startswith("/opt/venv/bin:/usr/local/")  # $PATH expanded


def test_entrypoint_resets_an_inherited_cmd_and_command_drops_cmd() -> None:
    t = parse_dockerfile('FROM x AS a\nCMD ["serve"]\nFROM a AS b\nENTRYPOINT ["run"]\nFROM a AS c\nENV K=v \\\n    L=$K/w\n')
    assert t["b"] == ImageConfig(entrypoint=("run",), cmd=(), env=t["b"].env)
    assert t["c"].cmd == ("serve",) and dict(t["c"].env)["L"] == "v/w"
    img = ImageConfig(entrypoint=("e",), cmd=("c",))
    assert container_argv({"command": ["x"]}, img) == ["x"]
    assert container_argv({"args": ["a"]}, img) == ["e", "a"]
    assert container_argv({"args": []}, img) == ["e"]
    with pytest.raises(ConfigError):
        container_argv({"name": "n"}, ImageConfig())
    assert image_target("ghcr.io/driftless/driftless-jobs:0.1.0") == "jobs"


# --- env and volumes ----------------------------------------------------------------------------


def test_env_order_expansion_and_references() -> None:
    store = {("secrets", "s"): {"k": b"sec"}, ("configmaps", "cm"): {"a": b"1", "b": b"2"}}

    def lookup(kind: str, name: str) -> dict[str, bytes] | None:
        return store.get((kind, name))

    c = {
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "P_"}],
        "env": [
            {"name": "P_a", "value": "over"},  # env entries win over envFrom
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "U", "value": "$(S)-$(P_b)-$(NOPE)-$$(S)"},
            {"name": "O", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
    }
    pod = {"metadata": {"name": "p", "labels": {"app": "web"}}, "status": {"podIP": "10.0.0.9"}}
    env = resolve_env(c, pod, lookup, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "P_a": "over", "P_b": "2", "S": "sec", "U": "sec-2-$(NOPE)-$(S)", "IP": "10.0.0.9", "L": "web"}
    with pytest.raises(ConfigError):
        resolve_env({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]}, pod, lookup)


def test_secret_data_and_string_data_decode() -> None:
    sec = {"data": {"a": base64.b64encode(b"x").decode()}, "stringData": {"b": "y"}}
    assert decode_data(sec, secret=True) == {"a": b"x", "b": b"y"}
    vol = {"name": "v", "secret": {"secretName": "s", "items": [{"key": "a", "path": "d/f", "mode": 0o400}]}}
    files = projected_files(vol, lambda kind, name: decode_data(sec, True))
    assert files is not None and files.files == {"d/f": (b"x", 0o400)}
    assert projected_files({"name": "e", "emptyDir": {}}, lambda k, n: None) is None
    with pytest.raises(ConfigError):
        projected_files({"name": "c", "configMap": {"name": "gone"}}, lambda k, n: None)


# --- probes and restarts ------------------------------------------------------------------------


def test_probe_verdicts_flip_after_their_thresholds() -> None:
    spec = container_probes({"livenessProbe": {"httpGet": {"path": "/h", "port": 80}, "failureThreshold": 3, "successThreshold": 1}}).liveness
    assert spec is not None
    c = initial_counter("liveness")
    for _ in range(2):
        c = probe_step(c, False, spec)
    assert c.passing  # two failures of three
    c = probe_step(probe_step(c, True, spec), False, spec)  # a success resets the count
    assert c.passing and c.failures == 1
    c = probe_step(probe_step(probe_step(c, False, spec), False, spec), False, spec)
    assert not c.passing
    assert probe_step(c, True, spec).passing
    assert not initial_counter("readiness").passing and initial_counter("liveness") == ProbeCounter(True)
    with pytest.raises(ConfigError):
        container_probes({"name": "x", "readinessProbe": {"httpGet": {"port": "nope"}}})


def test_crash_backoff_doubles_to_its_cap_and_policies() -> None:
    assert [crash_backoff(n) for n in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert restarts_container("Always", 0) and restarts_container("OnFailure", 1)
    assert not restarts_container("OnFailure", 0) and not restarts_container("Never", 1)


# --- Jobs ---------------------------------------------------------------------------------------


def pv(name: str, phase: str, index: int | None = None, code: int | None = None, t: float = 0.0, ready: bool = False) -> ctl.PodView:
    return ctl.PodView(name=name, labels={}, phase=phase, index=index, exit_code=code, container="main", finished_at=t, ready=ready)


INDEXED = {"completionMode": "Indexed", "completions": 3, "parallelism": 2, "backoffLimitPerIndex": 1}


def test_indexed_job_starts_indexes_within_parallelism_and_completes() -> None:
    step = ctl.job_plan(INDEXED, [], now=0, elapsed_s=0)
    assert step.start == (0, 1) and step.status["completedIndexes"] == ""
    step = ctl.job_plan(INDEXED, [pv("a", "Succeeded", 0), pv("b", "Running", 1)], now=1, elapsed_s=1)
    assert step.start == (2,) and step.status["completedIndexes"] == "0" and step.status["active"] == 1
    done = [pv("a", "Succeeded", 0), pv("b", "Succeeded", 1), pv("c", "Succeeded", 2)]
    step = ctl.job_plan(INDEXED, done, now=2, elapsed_s=2)
    assert (step.terminal, step.status["completedIndexes"], step.status["succeeded"]) == ("Complete", "0-2", 3)


def test_a_failed_index_waits_its_backoff_then_fails_alone() -> None:
    pods = [pv("a", "Failed", 0, 1, t=10.0), pv("b", "Running", 1)]
    assert ctl.job_plan(INDEXED, pods, now=10.5, elapsed_s=5).start == (2,)  # 0 waits 1 s
    assert ctl.job_plan(INDEXED, pods, now=11.0, elapsed_s=5).start == (0,)
    pods = [pv("a", "Failed", 0, 1, 10), pv("a2", "Failed", 0, 1, 12), pv("b", "Running", 1)]
    step = ctl.job_plan(INDEXED, pods, now=20, elapsed_s=10)
    assert step.status["failedIndexes"] == "0" and step.start == (2,) and not step.terminal
    pods = [*pods[:2], pv("b", "Succeeded", 1), pv("c", "Succeeded", 2)]
    step = ctl.job_plan(INDEXED, pods, now=30, elapsed_s=20)
    assert (step.terminal, step.reason, step.status["completedIndexes"]) == ("Failed", "FailedIndexes", "1-2")


POLICY = {"rules": [
    {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [143]}},
    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}},
]}


def test_pod_failure_policy_fails_the_job_or_ignores_the_failure() -> None:
    spec = {"backoffLimit": 1, "podFailurePolicy": POLICY}
    step = ctl.job_plan(spec, [pv("a", "Failed", code=2), pv("b", "Running")], now=5, elapsed_s=5)
    assert (step.terminal, step.reason, step.kill_active) == ("Failed", "PodFailurePolicy", True)
    step = ctl.job_plan(spec, [pv("a", "Failed", code=143), pv("b", "Failed", code=143)], now=5, elapsed_s=5)
    assert step.status["failed"] == 0 and step.start == (None,) and not step.terminal
    step = ctl.job_plan(spec, [pv("a", "Failed", code=1), pv("b", "Failed", code=1)], now=9, elapsed_s=9)
    assert (step.terminal, step.reason) == ("Failed", "BackoffLimitExceeded")
    assert ctl.failure_action({"rules": [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0, 1]}}]}, "x", 3) == "FailJob"
    late = ctl.job_plan({"activeDeadlineSeconds": 10}, [pv("a", "Running")], now=11, elapsed_s=11)
    assert (late.terminal, late.reason) == ("Failed", "DeadlineExceeded")


def test_completed_indexes_are_intervals() -> None:
    assert ctl.format_indexes([7, 0, 1, 2, 4, 6]) == "0-2,4,6-7"
    assert ctl.format_indexes([]) == "" and ctl.format_indexes([3]) == "3"


# --- Deployments and StatefulSets ---------------------------------------------------------------


def dv(name: str, rev: str, ready: bool = True, ordinal: int | None = None) -> ctl.PodView:
    return ctl.PodView(name=name, labels={}, phase="Running", ready=ready, revision=rev, ordinal=ordinal)


def test_rolling_update_surges_one_and_keeps_every_ready_pod_until_replaced() -> None:
    spec = _kind("Deployment", "reader")["spec"] | {"replicas": 2}  # maxSurge 1, maxUnavailable 0
    assert ctl.deployment_plan(spec, [dv("a", "old"), dv("b", "old")], "new") == ctl.Scale(1, ())
    # the new pod is not ready yet: nothing old goes
    assert ctl.deployment_plan(spec, [dv("a", "old"), dv("b", "old"), dv("c", "new", False)], "new") == ctl.Scale(0, ())
    assert ctl.deployment_plan(spec, [dv("a", "old"), dv("b", "old"), dv("c", "new")], "new") == ctl.Scale(0, ("a",))
    recreate = {"replicas": 1, "strategy": {"type": "Recreate"}}
    assert ctl.deployment_plan(recreate, [dv("a", "old")], "new") == ctl.Scale(0, ("a",))
    assert ctl.deployment_plan(recreate, [], "new") == ctl.Scale(1, ())


def test_statefulset_creates_in_order_and_rolls_the_highest_ordinal_first() -> None:
    spec = {"replicas": 3, "podManagementPolicy": "OrderedReady"}
    assert ctl.statefulset_plan(spec, [], "r").create == (0,)
    assert ctl.statefulset_plan(spec, [dv("s-0", "r", False, 0)], "r").create == ()
    assert ctl.statefulset_plan(spec, [dv("s-0", "r", True, 0)], "r").create == (1,)
    pods = [dv(f"s-{i}", "old", True, i) for i in range(3)]
    assert ctl.statefulset_plan(spec, pods, "new").delete == ("s-2",)
    pods[2] = dv("s-2", "new", False, 2)
    assert ctl.statefulset_plan(spec, pods, "new") == ctl.OrdinalStep((), ())  # wait for s-2
    assert ctl.statefulset_plan({"replicas": 1}, [dv("s-0", "r", True, 0), dv("s-1", "r", True, 1)], "r").delete == ("s-1",)


def test_pvc_is_owned_by_the_statefulset_only_when_deleted_with_it() -> None:
    sts = _owned(_kind("StatefulSet"))
    pvc = pvc_manifest(sts, sts["spec"]["volumeClaimTemplates"][0], 0)
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "o-1"  # whenDeleted: Delete
    sts["spec"]["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Retain"}
    assert "ownerReferences" not in pvc_manifest(sts, sts["spec"]["volumeClaimTemplates"][0], 0)["metadata"]


# --- Services -----------------------------------------------------------------------------------


def test_endpoints_split_ready_and_resolve_named_ports() -> None:
    svc = _kind("Service", "writer") | {"metadata": {**_kind("Service", "writer")["metadata"], "namespace": "search"}}
    sel = svc["spec"]["selector"]
    pods = [
        ctl.PodView("w-0", sel, "Running", True, "10.0.0.2", ports={"http": 8080}, subdomain=svc["metadata"]["name"]),
        ctl.PodView("w-1", sel, "Running", False, "10.0.0.3", ports={"http": 8080}),
        ctl.PodView("other", {"app": "x"}, "Running", True, "10.0.0.4", ports={"http": 8080}),
    ]
    ep = ctl.endpoints(svc, pods)
    (sub,) = ep["subsets"]
    assert sub["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [a["ip"] for a in sub["addresses"]] == ["10.0.0.2"] and sub["addresses"][0]["hostname"] == "w-0"
    assert [a["ip"] for a in sub["notReadyAddresses"]] == ["10.0.0.3"]
    svc["spec"]["publishNotReadyAddresses"] = True
    assert len(ctl.endpoints(svc, pods)["subsets"][0]["addresses"]) == 2


def test_hosts_names_leave_out_short_names_two_namespaces_share() -> None:
    names = ctl.hosts_names([("a", "docs", ["10.0.0.5"]), ("b", "docs", ["10.0.0.6"]), ("a", "api", ["10.0.0.7"])], [("a", "docs", "docs-0", "10.0.0.8")])
    assert "docs" not in names and names["docs.a.svc"] == ["10.0.0.5"] and names["docs.b.svc.cluster.local"] == ["10.0.0.6"]
    assert names["api"] == ["10.0.0.7"] and names["docs-0.docs.a.svc"] == ["10.0.0.8"]
    assert ctl.hosts_names([("a", "empty", [])]) == {}


def test_selectors_with_expressions() -> None:
    sel = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["x", "y"]}, {"key": "c", "operator": "DoesNotExist"}]}
    assert ctl.matches(sel, {"a": "1", "b": "y"})
    assert not ctl.matches(sel, {"a": "1", "b": "z"}) and not ctl.matches(sel, {"a": "1", "b": "x", "c": ""})
    assert not ctl.matches({}, {"a": "1"})  # an empty selector selects nothing here (Services)





def test_pod_status_reports_the_container_state_and_its_last_termination() -> None:
    from tests.cluster.kubelet_pods import ContainerRun, pod_status

    backoff = ContainerRun("main", "img", running=False, ready=False, started=False, restarts=2,
                           waiting="CrashLoopBackOff", exit_code=137, finished_at="t1")
    st = pod_status("Running", "10.0.0.2", "10.0.0.1", "t0", backoff)
    (cs,) = st["containerStatuses"]
    assert cs["state"] == {"waiting": {"reason": "CrashLoopBackOff"}} and cs["restartCount"] == 2
    assert cs["lastState"]["terminated"]["exitCode"] == 137
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "False"
    done = pod_status("Succeeded", "10.0.0.2", "10.0.0.1", "t0", ContainerRun("main", "img", False, False, False, 0, exit_code=0, finished_at="t2"))
    assert done["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert "lastState" not in done["containerStatuses"][0] and done["podIP"] == "10.0.0.2"
    dep = _owned(_kind("Deployment", "reader"))
    pod = pod_manifest(dep, dep["spec"]["template"], "r-abc-1", revision="abc")
    assert pod["metadata"]["labels"]["pod-template-hash"] == "abc"
    assert pod["spec"]["restartPolicy"] == "Always" and pod["metadata"]["ownerReferences"][0]["kind"] == "Deployment"


def test_home_comes_from_the_images_passwd_else_root() -> None:
    passwd = "root:x:0:0:root:/root:/bin/bash\ndriftless:x:10001:10001::/home/driftless:/usr/sbin/nologin\n"
    assert default_home(10001, passwd) == "/home/driftless"
    assert default_home(10001, None) == "/" and default_home(4242, passwd) == "/"


def test_cron_schedules_are_due_at_their_minutes() -> None:
    import datetime as dt

    from tests.cluster.kubelet_cron import last_due, parse_schedule

    t = dt.datetime(2026, 11, 26, 4, 20, 30, tzinfo=dt.UTC)  # a Thursday
    assert last_due("17 * * * *", t - dt.timedelta(hours=1), t) == t.replace(minute=17, second=0)
    assert last_due("17 * * * *", t.replace(minute=17, second=0), t) is None  # already run
    assert last_due("*/15 * * * *", t - dt.timedelta(hours=1), t) == t.replace(minute=15, second=0)
    assert last_due("0 0 * * 4", t - dt.timedelta(days=1), t) == t.replace(hour=0, minute=0, second=0)
    assert parse_schedule("@hourly")[0] == {0} and parse_schedule("0 0 * * 7")[4] == {0}
    with pytest.raises(ValueError):
        parse_schedule("61 * * * *")


def test_cron_plan_forbids_overlap_honours_the_deadline_and_trims_history() -> None:
    import datetime as dt

    from tests.cluster.kubelet_cron import cron_plan

    now = dt.datetime(2026, 11, 26, 4, 20, 5, tzinfo=dt.UTC)
    last = now - dt.timedelta(minutes=5)
    spec = {"schedule": "* * * * *", "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 60,
            "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1}
    old = [(f"j{i}", "Succeeded", now - dt.timedelta(minutes=10 - i)) for i in range(3)]
    step = cron_plan(spec, last, now, old)
    assert step.start == now.replace(second=0) and step.delete == ("j0", "j1")
    assert cron_plan(spec, last, now, [("a", "Active", now)]).start is None  # Forbid
    assert cron_plan({**spec, "suspend": True}, last, now, []).start is None
    late = now.replace(second=0) + dt.timedelta(seconds=90)  # 04:21:30: 04:21 due, in time
    assert cron_plan(spec, last, late, []).start == late.replace(second=0)
    assert cron_plan({**spec, "schedule": "20 * * * *"}, last, late, []).start is None  # 90 s late
