"""The API server's admission rules as pure functions (no server): what ``tests/strict_api.py``
applies on every write. Each rule's docstring names the upstream behaviour it mirrors; each
returns the apiserver's error (a ``Rejection``: HTTP code, reason, message, causes) or None.

Messages follow the apiserver's shape, ``<Kind>.<group> "<name>" is invalid: <field>:
<detail>`` for 422 Invalid, so a client that parses them (kubectl prints them verbatim) sees
what it would see on a cluster.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from tests.crd_tools import cel_errors, schema_of, with_defaults

DNS1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
# kinds whose names are DNS labels rather than subdomains (apimachinery's ValidateNameFunc per
# kind: Services are DNS-1035 labels, Namespaces DNS-1123 labels, the rest subdomains)
LABEL_NAMED = {"Service": ("DNS-1035", DNS1035_LABEL), "Namespace": ("DNS-1123", DNS1123_LABEL)}


@dataclass(frozen=True)
class Rejection:
    """A refused write, as the apiserver's ``Status`` body."""

    code: int
    reason: str
    message: str
    causes: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "details": {**self.details, **({"causes": self.causes} if self.causes else {})},
        }


def qualified_kind(kind: str, api_version: str) -> str:
    """``StatefulSet.apps``, ``Service`` (core), ``VectorIndex.driftless.dev``."""
    group = api_version.rpartition("/")[0]
    return f"{kind}.{group}" if group else kind


def invalid(obj: dict[str, Any], errors: list[tuple[str, str]]) -> Rejection:
    """422 Invalid with one cause per (field, detail), the apiserver's aggregate message."""
    kind = obj.get("kind", "")
    name = (obj.get("metadata") or {}).get("name", "")
    what = qualified_kind(kind, obj.get("apiVersion", "v1"))
    text = ", ".join(f"{f}: {d}" for f, d in errors)
    if len(errors) > 1:
        text = f"[{text}]"
    group = obj.get("apiVersion", "v1").rpartition("/")[0]
    return Rejection(
        422,
        "Invalid",
        f'{what} "{name}" is invalid: {text}',
        [{"reason": "FieldValueInvalid", "message": d, "field": f} for f, d in errors],
        {"name": name, "group": group, "kind": kind},
    )


def name_errors(kind: str, name: str) -> list[tuple[str, str]]:
    """apimachinery ValidateObjectMeta + the kind's name function: DNS-1123 subdomain (≤ 253)
    for most kinds, DNS-1035 label (≤ 63, leading letter) for Services, DNS-1123 label for
    Namespaces."""
    f = "metadata.name"
    if not name:
        return [(f, "Required value: name or generateName is required")]
    label = LABEL_NAMED.get(kind)
    if label is not None:
        flavour, rx = label
        out = []
        if len(name) > 63:
            out.append((f, f'Invalid value: "{name}": must be no more than 63 characters'))
        if not re.fullmatch(rx, name):
            start = "an alphabetic character" if flavour == "DNS-1035" else "an alphanumeric character"
            out.append(
                (
                    f,
                    f'Invalid value: "{name}": a {flavour} label must consist of lower case '
                    f"alphanumeric characters or '-', start with {start}, and end with an "
                    f"alphanumeric character (regex used for validation is '{rx}')",
                )
            )
        return out
    out = []
    if len(name) > 253:
        out.append((f, f'Invalid value: "{name}": must be no more than 253 characters'))
    if not re.fullmatch(DNS1123_SUBDOMAIN, name):
        out.append(
            (
                f,
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
                "case alphanumeric characters, '-' or '.', and must start and end with an "
                f"alphanumeric character (regex used for validation is '{DNS1123_SUBDOMAIN}')",
            )
        )
    return out


def _label_maps(obj: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every label map of an object: metadata.labels at any depth (pod and Job templates),
    selector.matchLabels, and a Service's spec.selector."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else k
            if k in ("labels", "matchLabels") and isinstance(v, dict):
                out.append((p, v))
            elif k == "selector" and path.endswith("spec") and isinstance(v, dict):
                plain = {a: b for a, b in v.items() if isinstance(b, str)}
                if plain and len(plain) == len(v):  # a Service's selector is a plain map
                    out.append((p, plain))
                out.extend(_label_maps(v, p))
            else:
                out.extend(_label_maps(v, p))
    return out


def label_errors(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """apimachinery ValidateLabels: every label value (metadata, pod templates, selectors) is
    ≤ 63 characters of alphanumerics, '-', '_', '.', starting and ending alphanumeric; every
    key's name part likewise ≤ 63 (an optional DNS-subdomain prefix before '/')."""
    out = []
    for path, labels in _label_maps(obj, ""):
        for k, v in labels.items():
            prefix, _, name = str(k).rpartition("/")
            if len(name) > 63 or not re.fullmatch(LABEL_VALUE, name) or not name:
                out.append((path, f'Invalid value: "{k}": name part must be no more than 63 characters and consist of alphanumeric characters, \'-\', \'_\' or \'.\''))
            if prefix and not re.fullmatch(DNS1123_SUBDOMAIN, prefix):
                out.append((path, f'Invalid value: "{k}": prefix part must be a DNS-1123 subdomain'))
            v = "" if v is None else str(v)
            if len(v) > 63:
                out.append((f"{path}", f'Invalid value: "{v}": must be no more than 63 characters'))
            elif not re.fullmatch(LABEL_VALUE, v):
                out.append(
                    (
                        path,
                        f'Invalid value: "{v}": a valid label must be an empty string or consist '
                        "of alphanumeric characters, '-', '_' or '.', and must start and end "
                        f"with an alphanumeric character (regex used for validation is '{LABEL_VALUE}')",
                    )
                )
    return out


# StatefulSet: ValidateStatefulSetUpdate allows only these spec fields to change
STATEFULSET_MUTABLE = (
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
)


def immutable_errors(kind: str, old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """Updates the apiserver refuses (422): a StatefulSet's spec beyond replicas / ordinals /
    template / updateStrategy / persistentVolumeClaimRetentionPolicy / minReadySeconds (so its
    selector, volumeClaimTemplates, serviceName, podManagementPolicy), a Deployment's
    selector (apps/v1), a Job's selector and pod template, a Service's clusterIP once set."""
    os_, ns_ = old.get("spec") or {}, new.get("spec") or {}
    if kind == "StatefulSet":
        strip = [{k: v for k, v in s.items() if k not in STATEFULSET_MUTABLE} for s in (os_, ns_)]
        if strip[0] != strip[1]:
            allowed = ", ".join(f"'{f}'" for f in STATEFULSET_MUTABLE[:-1])
            return [
                (
                    "spec",
                    "Forbidden: updates to statefulset spec for fields other than "
                    f"{allowed} and '{STATEFULSET_MUTABLE[-1]}' are forbidden",
                )
            ]
        return []
    fields = {"Deployment": ("selector",), "Job": ("selector", "template")}.get(kind, ())
    out = [
        (f"spec.{f}", f"Invalid value: {_short(ns_.get(f))}: field is immutable")
        for f in fields
        if f in os_ and ns_.get(f) != os_.get(f)
    ]
    if kind == "Service" and os_.get("clusterIP") and ns_.get("clusterIP") != os_["clusterIP"]:
        out.append(
            ("spec.clusterIP", f'Invalid value: "{ns_.get("clusterIP") or ""}": field is immutable')
        )
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def merge_patch(live: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what KMock stores for every PATCH/PUT): objects merge
    recursively, null removes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(live) if isinstance(live, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns ``old`` into ``new`` (null for removed keys)."""
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            d = merge_diff(old[k], v)
            if d:
                out[k] = d
        elif k not in old or old[k] != v:
            out[k] = copy.deepcopy(v)
    return out


ROOT_FIELDS = ("apiVersion", "kind", "metadata")


def prune(schema: dict[str, Any], obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """Structural-schema pruning: fields the schema does not declare are dropped (and listed,
    for ``fieldValidation=Strict``), except under x-kubernetes-preserve-unknown-fields."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, (dict, list)):
        return obj, []
    if isinstance(obj, list):
        items, unknown = [], []
        for i, x in enumerate(obj):
            v, u = prune(schema.get("items") or {}, x, f"{path}[{i}]")
            items.append(v)
            unknown += u
        return items, unknown
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    out, unknown = {}, []
    for k, v in obj.items():
        p = f"{path}.{k}" if path else k
        if not path and k in ROOT_FIELDS:
            out[k] = v
        elif props is not None and k in props:
            out[k], u = prune(props[k], v, p)
            unknown += u
        elif isinstance(extra, dict):
            out[k], u = prune(extra, v, p)
            unknown += u
        elif extra is True or (props is None and extra is None and not schema.get("type")):
            out[k] = v
        else:
            unknown.append(p)
    return out, unknown


def _jsonschema_path(err: jsonschema.ValidationError) -> str:
    parts = []
    for p in err.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else f".{p}")
    return "".join(parts).lstrip(".") or "<root>"


def admit_custom(
    crd: dict[str, Any],
    obj: dict[str, Any],
    old: dict[str, Any] | None = None,
    strict_fields: bool = False,
) -> tuple[dict[str, Any], Rejection | None]:
    """A custom resource write as apiextensions-apiserver does it: defaults from the structural
    schema, pruning of unknown fields (``fieldValidation=Strict``: 400 "strict decoding error:
    unknown field"), OpenAPI v3 validation and x-kubernetes-validations CEL rules (transition
    rules with ``oldSelf`` only on updates), all → 422 Invalid. Returns the object to store."""
    schema = schema_of(crd)
    new, unknown = prune(schema, with_defaults(schema, obj))
    if unknown and strict_fields:
        fields = ", ".join(f'unknown field "{u}"' for u in unknown)
        return new, Rejection(400, "BadRequest", f"strict decoding error: {fields}")
    errors = [
        (_jsonschema_path(e), f"Invalid value: {_short(e.instance)}: {e.message}")
        for e in jsonschema.Draft4Validator(schema).iter_errors(new)
    ]
    if not errors:
        old_d = with_defaults(schema, old) if old is not None else None
        for msg in cel_errors(schema, new, old_d):
            where, _, detail = msg.partition(": ")
            errors.append((where.lstrip(".") or "<root>", f"Invalid value: \"object\": {detail}"))
    return new, (invalid(new, errors) if errors else None)


def terminating(namespace: str, kind: str, name: str) -> Rejection:
    """The NamespaceLifecycle admission plugin: no new objects in a namespace being deleted."""
    return Rejection(
        403,
        "Forbidden",
        f'{kind.lower()}s "{name}" is forbidden: unable to create new content in namespace '
        f"{namespace} because it is being terminated",
        [{"reason": "NamespaceTerminating", "message": f"namespace {namespace} is being terminated", "field": "metadata.namespace"}],
        {"name": name, "kind": kind.lower() + "s"},
    )


def namespace_missing(namespace: str) -> Rejection:
    """The NamespaceLifecycle admission plugin: objects only in existing namespaces (404)."""
    return Rejection(
        404,
        "NotFound",
        f'namespaces "{namespace}" not found',
        details={"name": namespace, "kind": "namespaces"},
    )


def orphans(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The garbage collector (background propagation): a live object whose ownerReferences
    all point to owners that no longer exist (absent, or present with another uid) is
    deleted; an object with at least one live owner stays. Objects without owners stay."""
    live = {(o.get("metadata") or {}).get("uid") for o in objects}
    out = []
    for o in objects:
        refs = (o.get("metadata") or {}).get("ownerReferences") or []
        if refs and not any(r.get("uid") in live for r in refs):
            out.append(o)
    return out
