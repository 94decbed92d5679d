"""Custom resources parsed into typed, frozen values at the boundary (PURE).

The CRD schemas already reject malformed objects and apply defaults; parsing here fills the
same defaults again (a CR stored before a default existed, or a test object) and converts
to what the builders and the runtime need. Nothing below reads the API or the clock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from index_runtime.shards import check_shards

# the writer StatefulSet <name>-writer has a revision label <name>-writer-<10> <= 63: 45
# characters; a shard's is <name>-s<i>-writer with i < 64: 4 more
MAX_NAME = 45
MAX_SHARDED_NAME = MAX_NAME - 4

GROUP = "driftless.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = f"{GROUP}/finalizer"

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


class SpecError(ValueError):
    """A CR the schema let through but that cannot be served (e.g. m does not divide d)."""


def quantity(value: object) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``1Gi``) as a number of base units."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise SpecError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _FACTORS[m.group(2)]


@dataclass(frozen=True)
class Resources:
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def parse(d: Mapping[str, Any] | None, default: Resources) -> Resources:
        if not d:
            return default
        return Resources(
            {k: str(v) for k, v in (d.get("requests") or {}).items()},
            {k: str(v) for k, v in (d.get("limits") or {}).items()},
        )

    def cpu_limit_millicores(self) -> int | None:
        cpu = self.limits.get("cpu")
        return None if cpu is None else round(quantity(cpu) * 1000)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        return {"requests": dict(self.requests), "limits": dict(self.limits)}


QUERY_POD = Resources({"cpu": "500m", "memory": "1Gi"}, {"cpu": "1", "memory": "2Gi"})
WRITER_POD = Resources({"cpu": "500m", "memory": "1Gi"}, {"cpu": "2", "memory": "4Gi"})
JOB_POD = Resources({"cpu": "1", "memory": "2Gi"}, {"cpu": "2", "memory": "4Gi"})
# Jobs that only start an operation in the writer and poll it over HTTP (train, compact, the
# migration gate): an interpreter and urllib, 23 MiB RSS measured
POLL_JOB_POD = Resources({"cpu": "50m", "memory": "128Mi"}, {"cpu": "500m", "memory": "256Mi"})


@dataclass(frozen=True)
class PodOptions:
    """Scheduling and pull settings of the pods the operator makes (the chart's
    ``workloads`` values, a VectorIndex's or ModelMigration's ``spec.pods``), kept as the
    Kubernetes JSON they are copied into. Fields left unset (None) inherit; set ones replace
    the inherited value whole (an empty list or map clears it)."""

    image_pull_secrets: tuple[Mapping[str, Any], ...] | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] | None = None
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None

    @staticmethod
    def parse(d: Mapping[str, Any] | None) -> PodOptions:
        d = d or {}
        secrets, tolerations = d.get("imagePullSecrets"), d.get("tolerations")
        selector, affinity = d.get("nodeSelector"), d.get("affinity")
        prio = d.get("priorityClassName")
        return PodOptions(
            None if secrets is None else tuple(dict(s) for s in secrets),
            None if selector is None else {str(k): str(v) for k, v in selector.items()},
            None if tolerations is None else tuple(dict(t) for t in tolerations),
            None if affinity is None else dict(affinity),
            None if prio is None else str(prio),
        )

    def over(self, base: PodOptions) -> PodOptions:
        """These options, each unset field taken from ``base``."""
        return PodOptions(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(astuple_shallow(self), astuple_shallow(base), strict=True)
            )
        )

    def to_k8s(self) -> dict[str, Any]:
        """The pod spec fields (only those that are set and not empty)."""
        out: dict[str, Any] = {}
        if self.image_pull_secrets:
            out["imagePullSecrets"] = [dict(s) for s in self.image_pull_secrets]
        if self.node_selector:
            out["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            out["tolerations"] = [dict(t) for t in self.tolerations]
        if self.affinity:
            out["affinity"] = dict(self.affinity)
        if self.priority_class_name:
            out["priorityClassName"] = self.priority_class_name
        return out


def astuple_shallow(obj: Any) -> tuple[Any, ...]:
    """A dataclass's field values, not copied (``dataclasses.astuple`` deep-copies)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


# a backfill pod encodes with the target model (its own CPU/GPU work): the Job pod's default
BACKFILL_POD = JOB_POD
BACKFILL_STALL_S = 1800  # default spec.backfill.stallSeconds (the CRD's default)


@dataclass(frozen=True)
class Ref:
    """Identity of the CR that owns what we build (for owner references and names)."""

    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @staticmethod
    def of(body: Mapping[str, Any]) -> Ref:
        meta = body.get("metadata") or {}
        return Ref(
            str(body.get("kind", "")),
            str(meta.get("name", "")),
            str(meta.get("namespace", "")),
            str(meta.get("uid", "")),
            int(meta.get("generation") or 1),
        )


@dataclass(frozen=True)
class Model:
    name: str
    dimension: int
    metric: str
    encoder: str  # the runtime's encoder spec: a bundled package, or URL#model

    @staticmethod
    def parse(body: Mapping[str, Any]) -> Model:
        spec = body.get("spec") or {}
        enc = spec.get("encoder") or {}
        if "local" in enc:
            encoder = str(enc["local"]["package"])
        elif "http" in enc:
            http = enc["http"]
            encoder = f"{http['url']}#{http.get('model') or 'default'}"
        else:
            raise SpecError("encoder needs local or http")
        return Model(
            str(body["metadata"]["name"]),
            int(spec["dimension"]),
            str(spec.get("metric", "cosine")),
            encoder,
        )


@dataclass(frozen=True)
class Storage:
    bucket: str
    prefix: str = ""
    endpoint: str = ""
    region: str = ""
    secret: str = ""
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    service_account: str = ""
    reclaim: str = "Retain"


@dataclass(frozen=True)
class QueryLogSpec:
    """spec.queryLog: sampling of text queries as migration data (index_runtime.querylog).
    Off unless enabled: query text is user data."""

    enabled: bool = False
    sample_rate: float = 0.1
    max_queries: int = 2000
    retention_hours: float = 24.0

    @staticmethod
    def parse(d: Mapping[str, Any] | None) -> QueryLogSpec:
        d = d or {}
        return QueryLogSpec(
            enabled=bool(d.get("enabled", False)),
            sample_rate=float(d.get("sampleRate", 0.1)),
            max_queries=int(d.get("maxQueries", 2000)),
            retention_hours=float(d.get("retentionHours", 24.0)),
        )


@dataclass(frozen=True)
class VectorsSpec:
    """spec.readers.vectors: where reader and shadow pods keep raw vectors (``serve
    --vectors``). ``memory`` (the default) renders nothing, so existing pods do not roll;
    ``mmap`` reads them from memory-mapped segment copies on an emptyDir of ``cacheSize``."""

    storage: str = "memory"
    cache_size: str = "8Gi"

    @staticmethod
    def parse(d: Mapping[str, Any] | None) -> VectorsSpec:
        d = d or {}
        storage = str(d.get("storage", "memory"))
        if storage not in ("memory", "mmap"):
            raise SpecError(f"readers.vectors.storage must be memory or mmap, not {storage!r}")
        size = str(d.get("cacheSize", "8Gi"))
        if size.endswith("m") or quantity(size) < 1 << 20:
            raise SpecError(f"readers.vectors.cacheSize must be at least 1Mi of bytes: {size!r}")
        return VectorsSpec(storage, size)

    @property
    def mapped(self) -> bool:
        return self.storage == "mmap"

    @property
    def cache_bytes(self) -> int:
        return int(quantity(self.cache_size))


@dataclass(frozen=True)
class Index:
    ref: Ref
    model: str
    key_type: str
    storage: Storage
    readers: int
    wal_size: str
    storage_class: str
    writer_resources: Resources
    reader_resources: Resources
    shadow_resources: Resources
    settings: Mapping[str, Any]  # the runtime's IndexSettings JSON
    compaction_schedule: str
    compaction_deleted_ratio: float
    compaction_max_segments: int
    pods: PodOptions  # spec.pods (over the operator's defaults)
    query_log: QueryLogSpec = QueryLogSpec()  # spec.queryLog
    shards: int = 1  # spec.shards: fixed at creation (index_runtime.shards)
    vectors: VectorsSpec = VectorsSpec()  # spec.readers.vectors

    @staticmethod
    def parse(body: Mapping[str, Any]) -> Index:
        spec = body.get("spec") or {}
        st = spec.get("storage") or {}
        cred = st.get("credentialsSecret") or {}
        storage = Storage(
            bucket=str(st["bucket"]),
            prefix=str(st.get("prefix", "")),
            endpoint=str(st.get("endpoint", "")),
            region=str(st.get("region", "")),
            secret=str(cred.get("name", "")),
            access_key_id_key=str(cred.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
            secret_access_key_key=str(cred.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
            service_account=str(st.get("serviceAccountName", "")),
            reclaim=str(st.get("reclaimPolicy", "Retain")),
        )
        writer = spec.get("writer") or {}
        readers = spec.get("readers") or {}
        shadow = spec.get("shadow") or {}
        comp = spec.get("compaction") or {}
        try:
            shards = check_shards(spec.get("shards", 1))
        except ValueError as exc:
            raise SpecError(str(exc)) from exc
        name = str((body.get("metadata") or {}).get("name", ""))
        if shards > 1 and len(name) > MAX_SHARDED_NAME:  # the CRD refuses it too
            raise SpecError(
                f"a sharded index's name must be at most {MAX_SHARDED_NAME} characters "
                f"({name!r} has {len(name)}): its writers are StatefulSets <name>-s<i>-writer"
            )
        return Index(
            ref=Ref.of(body),
            model=str(spec["modelRef"]["name"]),
            key_type=str(spec.get("keyType", "str")),
            storage=storage,
            readers=int(readers.get("replicas", 2)),
            wal_size=str(writer.get("walSize", "10Gi")),
            storage_class=str(writer.get("storageClassName", "")),
            writer_resources=Resources.parse(writer.get("resources"), WRITER_POD),
            reader_resources=Resources.parse(readers.get("resources"), QUERY_POD),
            shadow_resources=Resources.parse(shadow.get("resources"), QUERY_POD),
            settings=runtime_settings(spec),
            compaction_schedule=str(comp.get("schedule", "17 * * * *")),
            compaction_deleted_ratio=float(comp.get("deletedRatio", 0.2)),
            compaction_max_segments=int(comp.get("maxSegments", 64)),
            pods=PodOptions.parse(spec.get("pods")),
            query_log=QueryLogSpec.parse(spec.get("queryLog")),
            shards=shards,
            vectors=VectorsSpec.parse(readers.get("vectors")),
        )


def _pick(src: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    return {ours: src[theirs] for theirs, ours in names.items() if theirs in src}


def runtime_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The VectorIndex spec as the runtime's settings JSON (``IndexSettings.from_json``);
    fields left out keep the runtime's defaults."""
    primary = _pick(
        spec.get("primary") or {},
        {"m": "m", "nbits": "nbits", "nprobe": "nprobe", "coarse": "coarse", "rerank": "rerank"},
    )
    nlist = (spec.get("primary") or {}).get("nlist", 0)
    primary["nlist"] = "auto" if not nlist else int(nlist)
    shadow = _pick(
        spec.get("shadow") or {},
        {
            "kind": "kind",
            "hnswM": "hnsw_m",
            "efSearch": "ef_search",
            "regenerateOverhead": "regenerate_overhead",
        },
    )
    oracle = _pick(
        spec.get("oracle") or {},
        {
            "sampleRate": "sample_rate",
            "k": "k",
            "theta": "theta",
            "delta": "delta",
            "window": "window",
            "minSamples": "min_samples",
            "cpuBudget": "cpu_budget",
        },
    )
    life = _pick(
        spec.get("lifecycle") or {},
        {"growthFactor": "growth_factor", "backoffSeconds": "backoff_s"},
    )
    tau = (spec.get("coldStart") or {}).get("minTrainingVectors")
    if tau:
        life["tau"] = int(tau)
    floats = ("sample_rate", "theta", "delta", "cpu_budget", "growth_factor", "backoff_s")
    for sec in (oracle, life, shadow):  # JSON numbers from YAML may be ints where floats belong
        for k in (*floats, "regenerate_overhead"):
            if k in sec:
                sec[k] = float(sec[k])
    return {"primary": primary, "shadow": shadow, "oracle": oracle, "lifecycle": life}


def _timestamp(value: object) -> float:
    """An RFC 3339 timestamp of the API (``2026-01-02T03:04:05Z``) in unix seconds; 0 if
    absent or unreadable."""
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _over(default: Resources, given: Resources) -> Resources:
    """``given`` on top of ``default`` per resource name (a GPU limit alone keeps the default
    CPU and memory)."""
    return Resources({**default.requests, **given.requests}, {**default.limits, **given.limits})


@dataclass(frozen=True)
class Migration:
    ref: Ref
    index: str
    target: str
    kinds: tuple[str, ...]
    diagonal: bool
    pairs: int
    seed: int
    k: int
    min_labelled: int
    labelled_configmap: str
    labelled_key: str
    backfill_batch: int
    backfill_rate: float
    cutover_policy: str
    cutover_approved: bool
    cutover_force: bool
    rollback: bool
    pods: PodOptions  # spec.pods (over the index's, over the operator's defaults)
    backfill_parallelism: int = 1  # pods of the backfill's Indexed Job = shares of the rows
    backfill_stall_s: int = BACKFILL_STALL_S  # no progress this long: Stalled, pods restart
    backfill_resources: Resources = BACKFILL_POD
    created_at: float = 0.0  # metadata.creationTimestamp (unix s; 0 = unknown)
    keep_merged: str = "Never"  # spec.cutover.keepMerged: Never | IfBetter

    @property
    def uid(self) -> str:
        """The migration's identity in the runtime's record (``MigrationRecord.id``)."""
        return self.ref.uid

    @staticmethod
    def parse(body: Mapping[str, Any]) -> Migration:
        spec = body.get("spec") or {}
        ad, gate = spec.get("adapter") or {}, spec.get("gate") or {}
        bf, co = spec.get("backfill") or {}, spec.get("cutover") or {}
        lq = gate.get("labelledQueries") or {}
        return Migration(
            ref=Ref.of(body),
            index=str(spec["indexRef"]["name"]),
            target=str(spec["targetModelRef"]["name"]),
            kinds=tuple(ad.get("types") or ("procrustes", "lowrank", "mlp")),
            diagonal=bool(ad.get("diagonalScaling", False)),
            pairs=int(ad.get("pairs", 20_000)),
            seed=int(ad.get("seed", 0)),
            k=int(gate.get("k", 10)),
            min_labelled=int(gate.get("minLabelledQueries", 200)),
            labelled_configmap=str(lq.get("configMapName", "")),
            labelled_key=str(lq.get("key", "queries.json")),
            backfill_batch=int(bf.get("batch", 256)),
            backfill_rate=float(bf.get("rate", 0)),
            cutover_policy=str(co.get("policy", "Auto")),
            cutover_approved=bool(co.get("approved", False)),
            cutover_force=bool(co.get("force", False)),
            keep_merged=str(co.get("keepMerged", "Never")),
            rollback=bool(spec.get("rollback", False)),
            pods=PodOptions.parse(spec.get("pods")),
            backfill_parallelism=max(1, int(bf.get("parallelism", 1))),
            backfill_stall_s=max(1, int(bf.get("stallSeconds", BACKFILL_STALL_S))),
            created_at=_timestamp((body.get("metadata") or {}).get("creationTimestamp")),
            backfill_resources=_over(
                BACKFILL_POD, Resources.parse(bf.get("resources"), Resources())
            ),
        )

    def gate_request(self, target: Model | None = None, sharded: bool = False) -> dict[str, Any]:
        """The runtime's StartMigration body (the Job adds the labelled queries): the
        migration's id, the target model's metric and dimension (the runtime checks the
        encoder against them), and an external backfill in ``backfill_parallelism`` shares
        (the operator's Indexed Job re-encodes; the writer only rewrites). A ``sharded``
        index's backfill is internal: each shard's writer re-encodes its own rows (the
        workers' rows endpoints are a writer's, which the router does not split)."""
        typed = {} if target is None else {"metric": target.metric, "dim": target.dimension}
        backfill: dict[str, Any] = (
            {"backfill_mode": "internal"}
            if sharded
            else {"backfill_mode": "external", "backfill_shares": self.backfill_parallelism}
        )
        return {
            "id": self.uid,
            "to_model": self.target,
            **typed,
            **backfill,
            "kinds": list(self.kinds),
            "diagonal": self.diagonal,
            "pairs": self.pairs,
            "min_labelled": self.min_labelled,
            "k": self.k,
            "seed": self.seed,
            "backfill_batch": self.backfill_batch,
            "backfill_rate": self.backfill_rate,
            "keep_merged": "if_better" if self.keep_merged == "IfBetter" else "never",
        }
