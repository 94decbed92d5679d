"""spec.readers.vectors: the CRD's schema, the reader and shadow pods it renders, and the
runtime reading those pods' environment back (pure: builders, the CLI's config parsing)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from index_operator import resources as res
from index_operator.resources.workloads import VECTOR_CACHE_VOLUME
from index_operator.spec import Index, SpecError
from index_runtime import contract
from index_runtime.contract import Env, Role
from index_runtime.index.vectors import VectorStorage
from tests.unit.test_operator_resources import CL, TOKENS, _cr

try:
    import kubernetes_validate as KV
except ImportError:  # the schema check is skipped; the rest runs
    KV = None


def _pods(vectors: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The pod spec of each runtime role for the example VectorIndex with these vectors
    (every object checked against Kubernetes' schema when kubernetes_validate is here)."""
    cr = _cr("vectorindex.yaml")
    if vectors is not None:
        cr["spec"] = {
            **cr["spec"],
            "readers": {**cr["spec"].get("readers", {}), "vectors": vectors},
        }
    objs = res.desired_objects(Index.parse(cr), CL, {"minilm": "all-MiniLM-L6-v2"}, TOKENS)
    out = {}
    for obj in objs:
        if KV is not None and obj["kind"] in ("StatefulSet", "Deployment"):
            KV.validate(obj, KV.latest_version(), strict=True)
        role = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if obj["kind"] in ("StatefulSet", "Deployment"):
            out[role] = obj["spec"]["template"]["spec"]
    assert set(out) == {r.value for r in (Role.WRITER, Role.READER, Role.SHADOW)}
    return out


def _runtime_storage(pod: dict[str, Any]) -> VectorStorage:
    """What `driftless serve --from-env` makes of the pod's environment."""
    from index_runtime.cli import build_parser, serve_config
    from index_runtime.service.auth import TokenSet
    from index_runtime.service.limits import ApiLimits
    from index_runtime.service.runtime import Roles

    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    args = build_parser().parse_args(c["command"][1:])
    roles = Roles(False, True, args.role == "shadow")  # as cmd_serve maps --role
    return serve_config(args, env, roles, TokenSet(), None, ApiLimits()).options.vectors


def test_memory_is_the_default_and_renders_nothing() -> None:
    for vectors in (None, {"storage": "memory", "cacheSize": "20Gi"}):
        pods = _pods(vectors)
        for pod in pods.values():
            c = pod["containers"][0]
            assert not [e for e in c["env"] if e["name"].startswith("DRIFTLESS_VECTOR")]
            assert VECTOR_CACHE_VOLUME not in {v["name"] for v in pod["volumes"]}
        assert _pods(vectors) == _pods(None)  # no new template: the pods do not roll
        assert _runtime_storage(pods["reader"]) == VectorStorage()


def test_mmap_gives_readers_and_shadow_a_cache_volume_the_runtime_uses() -> None:
    pods = _pods({"storage": "mmap", "cacheSize": "20Gi"})
    for role in ("reader", "shadow"):
        pod = pods[role]
        vol = next(v for v in pod["volumes"] if v["name"] == VECTOR_CACHE_VOLUME)
        assert vol == {"name": VECTOR_CACHE_VOLUME, "emptyDir": {"sizeLimit": "20Gi"}}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[VECTOR_CACHE_VOLUME] == contract.VECTOR_CACHE_DIR
        assert contract.VECTOR_CACHE_DIR not in (contract.TMP_DIR, contract.WAL_DIR)
        got = _runtime_storage(pod)
        # the runtime's budget leaves 10% of the volume for copies views still read
        assert got == VectorStorage("mmap", Path(contract.VECTOR_CACHE_DIR), int(20 * 2**30 * 0.9))
    writer = pods["writer"]  # the writer keeps its vectors in memory (it builds the views)
    assert VECTOR_CACHE_VOLUME not in {v["name"] for v in writer["volumes"]}
    assert not [e for e in writer["containers"][0]["env"] if e["name"] == Env.VECTORS]


@pytest.mark.parametrize(
    "vectors",
    [{"storage": "disk"}, {"storage": "mmap", "cacheSize": "500m"},
     {"storage": "mmap", "cacheSize": "1Ki"}, {"storage": "mmap", "cacheSize": "lots"}],
)  # fmt: skip
def test_bad_values_are_refused(vectors: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        _pods(vectors)


def test_the_crd_validates_readers_vectors() -> None:
    pytest.importorskip("kubernetes_validate")
    pytest.importorskip("celpy")
    from tests.crd_tools import load_crds, merge_patch, validate_cr
    from tests.unit.test_crds import _example

    crd = load_crds()["VectorIndex"]
    vi = _example("VectorIndex")

    def errors(vectors: dict[str, Any]) -> list[str]:
        body = merge_patch(copy.deepcopy(vi), {"spec": {"readers": {"vectors": vectors}}})
        return list(validate_cr(crd, body))

    assert errors({"storage": "mmap", "cacheSize": "20Gi"}) == []
    assert errors({"storage": "memory"}) == []
    assert errors({"storage": "disk"}) != []
    for size in ("20 Gi", "500m", "-1Gi", "lots"):
        assert errors({"storage": "mmap", "cacheSize": size}) != [], size
