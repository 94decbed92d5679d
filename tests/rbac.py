"""A small RBAC matcher for the chart's tests: does a set of PolicyRules grant a request, and
which granted permissions does no request use. Kubernetes semantics for what the chart may
contain: apiGroups / resources / verbs with ``*``, ``resource/subresource`` names. Rules with
``resourceNames`` or ``nonResourceURLs`` are refused: the chart has no use for them, and a
matcher that half-understood them would approve too much."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Request = tuple[str, str, str, str]  # (verb, api group, resource, subresource)
Grant = tuple[str, str, str]  # (verb, api group, "resource" or "resource/subresource")


def _check(rule: Mapping[str, Any]) -> None:
    if rule.get("resourceNames") or rule.get("nonResourceURLs"):
        raise ValueError(f"unsupported rule (resourceNames / nonResourceURLs): {dict(rule)}")


def allows(rules: Iterable[Mapping[str, Any]], request: Request) -> bool:
    verb, group, resource, sub = request
    name = f"{resource}/{sub}" if sub else resource
    for rule in rules:
        _check(rule)
        groups = rule.get("apiGroups") or []
        resources = rule.get("resources") or []
        verbs = rule.get("verbs") or []
        if (
            ("*" in groups or group in groups)
            and ("*" in resources or name in resources or (sub and f"{resource}/*" in resources))
            and ("*" in verbs or verb in verbs)
        ):
            return True
    return False


def grants(rules: Iterable[Mapping[str, Any]]) -> set[Grant]:
    """Every (verb, group, resource) a set of rules names; wildcards are refused (least
    privilege means naming what is granted)."""
    out = set()
    for rule in rules:
        _check(rule)
        for field in ("apiGroups", "resources", "verbs"):
            if any("*" in v for v in rule.get(field) or []):
                raise ValueError(f"wildcard in {field}: {dict(rule)}")
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out.add((v, g, r))
    return out


def audit(
    requests: Iterable[Request], rules: list[Mapping[str, Any]]
) -> tuple[list[Request], list[Grant]]:
    """(requests the rules do not grant, granted permissions no request uses)."""
    requests = list(requests)
    missing = sorted(r for r in set(requests) if not allows(rules, r))
    used = {(v, g, f"{r}/{s}" if s else r) for v, g, r, s in requests}
    unused = sorted(grants(rules) - used)
    return missing, unused
