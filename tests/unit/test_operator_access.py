"""Tokens and the NetworkPolicy of an index's runtime pods (pure builders): which pod gets
which token, what the hashes file holds, when tokens are kept, adopted or drawn anew, and
which peers the NetworkPolicy admits (a small label-selector matcher with Kubernetes'
semantics decides, so the checks are about pods, not about the builder's own fields)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from index_operator import resources as res
from index_operator.controller import network_policy_from_env, secret_data
from index_runtime import contract
from index_runtime.contract import Env, JobKind, Scope
from tests.unit.test_operator_resources import CL, IX, MIG, NP, TOKENS, all_objects

OBJECTS = all_objects()
BY = {(o["kind"], o["metadata"]["name"]): o for o in OBJECTS}
TOKENS_PATH = f"{contract.TOKENS_DIR}/{contract.TOKENS_FILE}"


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if "jobTemplate" in spec:
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"])


def _access(obj: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """(env name -> 'value' or '<secret>/<key>', secrets mounted as volumes) of a pod."""
    pod = _pod(obj)["spec"]
    env = {}
    for e in pod["containers"][0]["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = f"{ref['name']}/{ref['key']}" if ref else "value"
    mounted = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return env, mounted


TOKEN_ENVS = {Env.TOKENS_FILE, Env.ADMIN_TOKEN, Env.SHADOW_TOKEN, Env.WRITE_TOKEN}
TOKEN_ENVS |= {Env.READ_TOKEN, Env.MIRROR_TOKEN}


@pytest.mark.parametrize(
    ("kind", "name", "tokens", "mounted"),
    [
        # verifiers: the hashes file only; the writer holds no plaintext token at all
        ("StatefulSet", "docs-writer", {Env.TOKENS_FILE: "value"}, {"docs-token-hashes"}),
        ("Deployment", "docs-shadow", {Env.TOKENS_FILE: "value"}, {"docs-token-hashes"}),
        # readers also post sampled queries to the shadow: the mirror token, nothing more
        (
            "Deployment",
            "docs-reader",
            {Env.TOKENS_FILE: "value", Env.SHADOW_TOKEN: "docs-tokens/mirror"},
            {"docs-token-hashes"},
        ),
        # Jobs drive the writer's admin API; the purge Job talks to S3 only
        ("Job", "docs-train-4", {Env.ADMIN_TOKEN: "docs-tokens/admin"}, set()),
        ("Job", "docs-compact-4", {Env.ADMIN_TOKEN: "docs-tokens/admin"}, set()),
        ("Job", "docs-to-e5-migrate", {Env.ADMIN_TOKEN: "docs-tokens/admin"}, set()),
        ("Job", "docs-to-e5-backfill", {Env.ADMIN_TOKEN: "docs-tokens/admin"}, set()),
        ("CronJob", "docs-compact", {Env.ADMIN_TOKEN: "docs-tokens/admin"}, set()),
        ("Job", "docs-purge-4", {}, set()),
    ],
)
def test_each_pod_gets_only_the_token_it_needs(
    kind: str, name: str, tokens: dict[str, str], mounted: set[str]
) -> None:
    env, volumes = _access(BY[kind, name])
    assert {k: v for k, v in env.items() if k in TOKEN_ENVS} == tokens
    assert volumes == mounted
    if mounted:  # the file the env names is where the hashes Secret is mounted, read-only
        assert env[Env.TOKENS_FILE] == "value"
        c = _pod(BY[kind, name])["spec"]["containers"][0]
        path = next(e["value"] for e in c["env"] if e["name"] == Env.TOKENS_FILE)
        assert path == TOKENS_PATH
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == contract.TOKENS_DIR)
        assert mount["readOnly"] is True
        vol = next(v for v in _pod(BY[kind, name])["spec"]["volumes"] if "secret" in v)
        assert vol["secret"]["items"] == [{"key": "tokens", "path": contract.TOKENS_FILE}]


def test_the_hashes_file_verifies_every_scope_and_holds_no_token() -> None:
    text = BY["Secret", "docs-token-hashes"]["stringData"]["tokens"]
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    parsed = {}
    for ln in lines:  # the contract's format: '<scope> sha256:<64 hex>'
        m = re.fullmatch(r"(\w+) sha256:([0-9a-f]{64})", ln)
        assert m, ln
        parsed[Scope(m.group(1))] = m.group(2)
    assert parsed == {s: hashlib.sha256(TOKENS[s].encode()).hexdigest() for s in Scope}
    assert not any(t in text for t in TOKENS.by_scope.values())
    plain = BY["Secret", "docs-tokens"]["stringData"]
    assert plain == {s.value: TOKENS[s] for s in Scope}


def test_new_tokens_roll_every_runtime_pod_and_the_same_tokens_change_nothing() -> None:
    def templates(tokens: res.Tokens) -> dict[str, Any]:
        return {
            o["metadata"]["name"]: _pod(o)
            for o in res.desired_objects(IX, CL, {}, tokens)
            if o["kind"] in ("StatefulSet", "Deployment")
        }

    same = res.Tokens(dict(TOKENS.by_scope))
    assert templates(same) == templates(TOKENS)
    for scope in Scope:  # any rotated scope changes the hashes file, so every pod rolls
        rotated = res.Tokens({**TOKENS.by_scope, scope: "rotated"})
        before, after = templates(TOKENS), templates(rotated)
        assert all(before[n]["metadata"] != after[n]["metadata"] for n in before), scope


FRESH = {s: f"fresh-{s.value}" for s in Scope}
STORED = {s.value: f"stored-{s.value}" for s in Scope}


@pytest.mark.parametrize(
    ("stored", "legacy", "expect"),
    [
        ({}, None, FRESH),  # a new index (or its tokens Secret deleted: rotation)
        (STORED, None, {s: STORED[s.value] for s in Scope}),  # never regenerated
        (STORED, "old-admin", {s: STORED[s.value] for s in Scope}),
        ({}, "old-admin", {**FRESH, Scope.ADMIN: "old-admin"}),  # upgrade: Jobs keep working
        ({"write": "w"}, None, {**FRESH, Scope.WRITE: "w"}),  # a scope added later
        ({"write": "w", "admin": ""}, "old-admin", {**FRESH, Scope.WRITE: "w"}),
    ],
)
def test_plan_tokens(
    stored: dict[str, str], legacy: str | None, expect: dict[Scope, str]
) -> None:
    assert dict(res.plan_tokens(stored, legacy, FRESH).by_scope) == expect


def test_tokens_need_every_scope_and_secrets_read_either_encoding() -> None:
    with pytest.raises(ValueError, match="mirror"):
        res.Tokens({s: "x" for s in Scope if s is not Scope.MIRROR})
    assert secret_data({"data": {"admin": "YWJj"}}) == {"admin": "abc"}
    assert secret_data({"stringData": {"admin": "abc"}}) == {"admin": "abc"}
    assert secret_data(None) == {}


# NetworkPolicy ------------------------------------------------------------------------------


def _selects(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics (matchLabels AND matchExpressions; {} = all)."""
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for e in sel.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": has and value in e.get("values", []),
            "NotIn": not has or value not in e.get("values", []),
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not ok:
            return False
    return True


def admits(
    policy: dict[str, Any], pod: dict[str, str], pod_ns: str, ns_labels: dict[str, str]
) -> set[int]:
    """The ports on which ``policy`` admits a peer pod (labels, namespace and its labels)."""
    ports: set[int] = set()
    own_ns = policy["metadata"]["namespace"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without peers admits everyone"
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                ns_ok = _selects(peer["namespaceSelector"], ns_labels)
            else:
                ns_ok = pod_ns == own_ns
            if ns_ok and _selects(peer.get("podSelector", {}), pod):
                ports |= {p["port"] for p in rule["ports"]}
    return ports


def _labels(name: str) -> dict[str, str]:
    kinds = ("StatefulSet", "Deployment", "Job", "CronJob")
    kind = next(k for k, n in BY if n == name and k in kinds)
    return dict(_pod(BY[kind, name])["metadata"]["labels"])


POLICY = BY["NetworkPolicy", "docs-runtime"]
OPERATOR = {"app.kubernetes.io/name": "driftless", "app.kubernetes.io/instance": "dl"}
OPERATOR |= {"app.kubernetes.io/component": "operator"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}
HTTP = {contract.HTTP_PORT}


def _ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def test_the_policy_guards_the_runtime_pods_only() -> None:
    sel = POLICY["spec"]["podSelector"]
    for name in ("docs-writer", "docs-reader", "docs-shadow"):
        assert _selects(sel, _labels(name)), name
    for name in ("docs-train-4", "docs-compact"):
        assert not _selects(sel, _labels(name)), name
    assert not _selects(sel, {**_labels("docs-writer"), "app.kubernetes.io/instance": "other"})
    assert POLICY["spec"]["policyTypes"] == ["Ingress"]  # egress left open (documented)


@pytest.mark.parametrize(
    ("who", "labels", "ns", "ports"),
    [
        ("a reader (-> shadow)", _labels("docs-reader"), "search", HTTP),
        ("a Job (-> writer)", _labels("docs-train-4"), "search", HTTP),
        ("the gate Job", _labels("docs-to-e5-migrate"), "search", HTTP),
        ("the operator", OPERATOR, "driftless-system", HTTP),
        ("the operator's labels elsewhere", OPERATOR, "search-2", set()),
        ("Prometheus, any namespace", PROMETHEUS, "monitoring", HTTP),
        ("a client pod of the namespace", {"app": "web"}, "search", HTTP),
        ("a pod of another namespace", {"app": "web"}, "other", set()),
        ("another index's reader", {**_labels("docs-reader"), "app.kubernetes.io/instance": "x"},
         "other", set()),
    ],
)
def test_who_reaches_the_runtime_port(
    who: str, labels: dict[str, str], ns: str, ports: set[int]
) -> None:
    assert admits(POLICY, labels, ns, _ns(ns)) == ports, who


def test_configured_peers_replace_the_defaults_and_empty_lists_admit_nobody() -> None:
    tight = res.NetworkPolicyConfig(
        clients=[{"namespaceSelector": {"matchLabels": {"team": "web"}}}], metrics=[]
    )
    pol = res.desired_network_policy(IX, tight)
    assert admits(pol, {"app": "web"}, "search", _ns("search")) == set()
    assert admits(pol, {"app": "web"}, "web", {**_ns("web"), "team": "web"}) == HTTP
    assert admits(pol, PROMETHEUS, "monitoring", _ns("monitoring")) == set()
    assert admits(pol, OPERATOR, "driftless-system", _ns("driftless-system")) == set()  # unknown
    assert admits(pol, _labels("docs-reader"), "search", _ns("search")) == HTTP  # always


def test_the_policy_is_built_only_when_enabled_and_before_the_pods() -> None:
    off = res.desired_objects(IX, res.Cluster(), {}, TOKENS)
    assert "NetworkPolicy" not in {o["kind"] for o in off}
    on = res.desired_objects(IX, CL, {}, TOKENS)
    kinds = [o["kind"] for o in on]
    assert kinds.index("NetworkPolicy") < kinds.index("StatefulSet")


def test_the_chart_environment_configures_the_policy() -> None:
    assert network_policy_from_env({}) is None
    assert network_policy_from_env({"DRIFTLESS_NETWORK_POLICIES": "false"}) is None
    default = network_policy_from_env({"DRIFTLESS_NETWORK_POLICIES": "true"})
    assert default == res.NetworkPolicyConfig(clients=NP.clients, metrics=NP.metrics)
    cfg = network_policy_from_env(
        {
            "DRIFTLESS_NETWORK_POLICIES": "true",
            "DRIFTLESS_OPERATOR_NAMESPACE": "driftless-system",
            "DRIFTLESS_OPERATOR_POD_LABELS": '{"app.kubernetes.io/instance": "dl"}',
            "DRIFTLESS_NETWORK_POLICY_CLIENTS": "[]",
            "DRIFTLESS_NETWORK_POLICY_METRICS": '[{"ipBlock": {"cidr": "10.0.0.0/8"}}]',
        }
    )
    assert cfg is not None and cfg.operator_namespace == "driftless-system"
    assert list(cfg.clients) == [] and list(cfg.metrics) == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    with pytest.raises(ValueError, match="CLIENTS"):
        network_policy_from_env(
            {"DRIFTLESS_NETWORK_POLICIES": "true", "DRIFTLESS_NETWORK_POLICY_CLIENTS": "{}"}
        )


def test_jobs_built_for_a_migration_use_the_index_tokens() -> None:
    gate = res.desired_gate_job(IX, MIG, CL)
    env, _ = _access(gate)
    assert env[Env.ADMIN_TOKEN] == f"{res.tokens_secret_name(IX.ref.name)}/admin"
    job = res.desired_job(IX, CL, JobKind.TRAIN, "x", IX.ref)
    assert _access(job)[0][Env.ADMIN_TOKEN] == "docs-tokens/admin"


def test_pods_that_bind_every_address_always_verify_tokens() -> None:
    """Runtime pods listen on 0.0.0.0 (the pod's network namespace: its IP and loopback);
    that is safe only because every one of them is given the hashes file."""
    runtime = [o for o in OBJECTS if o["kind"] in ("StatefulSet", "Deployment")]
    assert len(runtime) == 3
    for obj in runtime:
        c = _pod(obj)["spec"]["containers"][0]
        assert c["command"][c["command"].index("--host") + 1] == "0.0.0.0"
        env, mounted = _access(obj)
        assert Env.TOKENS_FILE in env and res.hashes_secret_name("docs") in mounted


class _Secrets:
    """The Secrets of one namespace, as the controller's Kube client reads them."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind == "Secret"
        return self.store.get(name)


async def test_the_controller_keeps_drawn_tokens_until_stored_and_rotates_when_deleted() -> None:
    from index_operator.controller import Controller, OperatorConfig

    ctl = Controller(OperatorConfig())
    kube = _Secrets()
    ctl.kube = kube  # type: ignore[assignment]
    first = await ctl.tokens("search", "docs")
    # not stored yet (a migration's reconcile may come first): the same tokens again
    assert await ctl.tokens("search", "docs") == first
    kube.store["docs-tokens"] = {"stringData": {s.value: first[s] for s in Scope}}
    kube.store["docs-token-hashes"] = {"stringData": {"tokens": first.hashes_file()}}
    assert await ctl.tokens("search", "docs") == first
    del kube.store["docs-tokens"]  # rotation: new tokens for every scope
    rotated = await ctl.tokens("search", "docs")
    assert all(rotated[s] != first[s] for s in Scope)
    # an upgrade from the single admin Secret keeps its token (no hashes Secret yet) ...
    kube.store["old-admin"] = {"stringData": {"token": "legacy-admin-token"}}
    assert (await ctl.tokens("search", "old"))[Scope.ADMIN] == "legacy-admin-token"
    # ... but a rotation after it does not bring the legacy token back
    kube.store["old-token-hashes"] = {"stringData": {"tokens": "x"}}
    assert (await ctl.tokens("search", "old"))[Scope.ADMIN] != "legacy-admin-token"
