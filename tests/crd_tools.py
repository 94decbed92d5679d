"""What the API server does with a CR, done here: apply schema defaults, validate against the
openAPIV3Schema (jsonschema, draft 4 semantics as OpenAPI 3.0 uses), and evaluate every
x-kubernetes-validations CEL rule with cel-python at its place in the object, with ``oldSelf``
for transition rules (which, as in Kubernetes, run only when the old value exists)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]


def merge_patch(base: Any, patch: Any) -> Any:
    """``patch`` applied to ``base`` as a JSON merge patch would (maps merged key by key, any
    other value replaced by a copy); ``base`` is not changed."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge_patch(base.get(k), v)
        return out
    return copy.deepcopy(patch)


def load_crds(group: str | None = "driftless.dev") -> dict[str, dict[str, Any]]:
    """The CRDs under crds/ by kind: ours by default (group None: kopf's peering ones too)."""
    out = {}
    for p in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(p.read_text())
        if group is None or crd["spec"]["group"] == group:
            out[crd["spec"]["names"]["kind"]] = crd
    return out


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def with_defaults(schema: dict[str, Any], obj: Any) -> Any:
    obj = copy.deepcopy(obj)

    def walk(s: dict[str, Any], o: Any) -> None:
        if isinstance(o, dict):
            for name, sub in (s.get("properties") or {}).items():
                if name not in o and "default" in sub:
                    o[name] = copy.deepcopy(sub["default"])
                if name in o:
                    walk(sub, o[name])
        elif isinstance(o, list) and "items" in s:
            for x in o:
                walk(s["items"], x)

    walk(schema, obj)
    return obj


def _rules(
    schema: dict[str, Any], new: Any, old: Any, path: str
) -> Iterator[tuple[str, dict[str, Any], Any, Any]]:
    for r in schema.get("x-kubernetes-validations") or ():
        yield path, r, new, old
    if isinstance(new, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in new:
                o = old.get(name) if isinstance(old, dict) else None
                yield from _rules(sub, new[name], o, f"{path}.{name}")


_ENV = celpy.Environment()


def cel_compile(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


def cel_errors(schema: dict[str, Any], new: Any, old: Any = None) -> list[str]:
    msgs = []
    for path, r, n, o in _rules(schema, new, old, ""):
        transition = "oldSelf" in r["rule"]
        if transition and o is None:
            continue
        act = {"self": celpy.json_to_cel(n)}
        if transition:
            act["oldSelf"] = celpy.json_to_cel(o)
        result = cel_compile(r["rule"]).evaluate(act)
        if isinstance(result, celpy.CELEvalError):
            raise AssertionError(f"{path}: rule {r['rule']!r} did not evaluate: {result}")
        if not bool(result):
            msgs.append(f"{path}: {r.get('message', r['rule'])}")
    return msgs


def validate_cr(
    crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[str]:
    """Every reason the API server would reject ``obj`` (an update of ``old`` if given)."""
    schema = schema_of(crd)
    obj = with_defaults(schema, obj)
    errors = [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(obj)]
    if errors:
        return errors
    old = with_defaults(schema, old) if old is not None else None
    return cel_errors(schema, obj, old)


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """The structural-schema rules (and ours: a description on every property)."""
    out = []
    int_or_string = schema.get("x-kubernetes-int-or-string")
    if (
        "type" not in schema
        and not int_or_string
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out.append(f"{path or '/'}: no type")
    if "additionalProperties" in schema and "properties" in schema:
        out.append(f"{path}: both properties and additionalProperties")
    if int_or_string and schema.get("anyOf") not in (
        None,
        [{"type": "integer"}, {"type": "string"}],
    ):
        out.append(f"{path}: int-or-string anyOf must be integer|string")
    for name, sub in (schema.get("properties") or {}).items():
        if path and name != "metadata" and "description" not in sub:
            out.append(f"{path}.{name}: no description")
        out.extend(structural_problems(sub, f"{path}.{name}"))
    if "items" in schema:
        out.extend(structural_problems(schema["items"], f"{path}[]"))
    return out
