"""A model migration inside the runtime, up to *Bridged*: sample rows with text from the
served view, encode them with the new model, fit adapters on the fit split, measure every
strategy on held-out queries, and return the record the manifest publishes. The decision
itself is :func:`index_runtime.migration.select_strategy` (pure); this module is the glue.

Queries: the caller's labelled queries (text + the key they should find) when there are at
least ``min_labelled`` of them (metric Success@k), else the texts of sampled test-split rows
(metric ARR@k, estimated from the sampled rows' new vectors: ``quality.arr.estimate_arr``).
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.adapters import DEFAULT_KINDS, KINDS, Adapter, FitOptions, fit_adapter
from index_runtime.contract import METRICS, MigrationGuard, MigrationRecord
from index_runtime.corpus import split_of
from index_runtime.encoders import Kind
from index_runtime.errors import EncoderRejectedError, InvalidInputError
from index_runtime.index.view import View
from index_runtime.migration import (
    GUARD_ENTER_LEVEL,
    KEEP_MERGED,
    NATIVE,
    STATUS_QUO,
    Calibration,
    decision_metric,
    fit_calibration,
    guard_step,
    merge_scored,
    select_from_intervals,
    select_strategy,
    serves_both,
)
from index_runtime.quality.arr import Interval, bootstrap, estimate_arr, paired_gain, success, topk

Encode = Callable[[list[str], Kind], npt.NDArray[np.float32]]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
log = logging.getLogger(__name__)
DEPTH = 20  # list depth the merge draws from (each model's top-20)
MIN_TRAFFIC = 50  # held-out logged queries needed to estimate ARR on traffic instead of rows


@dataclass(frozen=True)
class MigrationRequest:
    to_model: str
    kinds: tuple[str, ...] = DEFAULT_KINDS
    diagonal: bool = False
    pairs: int = 20_000
    min_labelled: int = 200
    k: int = 10
    seed: int = 0
    labelled: tuple[tuple[str, int | str], ...] = field(default=())
    backfill: bool = True  # False: stay Bridged until a backfill is requested
    auto_cutover: bool = True  # False: stay Backfilled until a cutover is requested
    backfill_batch: int = 256
    backfill_rate: float = 0.0  # rows per second, 0 = as fast as the encoder goes
    id: str = ""  # the migration's identity ("" : the runtime generates one)
    metric: str = "cosine"  # the new model's metric (served after the cutover)
    dim: int | None = None  # the new model's dimension, checked against its encoder
    backfill_mode: str = "internal"  # "external": an Indexed Job's workers re-encode
    backfill_shares: int = 1
    keep_merged: str = "never"  # "if_better": end keeping both models when the merge wins
    # one of a sharded index's migrations, started by the router on every shard: the shard
    # serves the status quo and cuts over only when asked (docs: *Coordinated migrations*)
    coordinated: bool = False

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> MigrationRequest:
        known = {
            "to_model",
            "kinds",
            "diagonal",
            "pairs",
            "min_labelled",
            "k",
            "seed",
            "labelled",
            "backfill",
            "cutover",
            "backfill_batch",
            "backfill_rate",
            "id",
            "metric",
            "dim",
            "backfill_mode",
            "backfill_shares",
            "keep_merged",
            "coordinated",
        }
        extra = set(d) - known
        if extra:
            raise InvalidInputError(f"unknown migration fields: {sorted(extra)}")
        if not isinstance(d.get("to_model"), str) or not d["to_model"]:
            raise InvalidInputError("to_model (the new model's name) is required")
        kinds = tuple(d.get("kinds", DEFAULT_KINDS))
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise InvalidInputError(
                f"kinds must be a non-empty subset of {list(KINDS)}, got {bad or kinds}"
            )
        pairs, min_l, k = (
            int(d.get("pairs", 20_000)),
            int(d.get("min_labelled", 200)),
            int(d.get("k", 10)),
        )
        if pairs < 50:
            raise InvalidInputError(f"pairs must be at least 50, got {pairs}")
        if not 1 <= k <= 100 or min_l < 1:
            raise InvalidInputError("k must be 1..100 and min_labelled at least 1")
        labelled = []
        for item in d.get("labelled", ()):
            if (
                not isinstance(item, Mapping)
                or not isinstance(item.get("text"), str)
                or "key" not in item
            ):
                raise InvalidInputError("each labelled query is {'text': str, 'key': <row key>}")
            labelled.append((item["text"], item["key"]))
        cutover = d.get("cutover", "auto")
        if cutover not in ("auto", "manual"):
            raise InvalidInputError(f"cutover must be 'auto' or 'manual', got {cutover!r}")
        batch, rate = int(d.get("backfill_batch", 256)), float(d.get("backfill_rate", 0.0))
        if not 1 <= batch <= 4000 or rate < 0:
            raise InvalidInputError("backfill_batch must be 1..4000 and backfill_rate >= 0")
        metric = d.get("metric") or "cosine"
        if metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        dim = d.get("dim")
        if dim is not None and (not isinstance(dim, int) or not 1 <= dim <= 65536):
            raise InvalidInputError(f"dim must be 1..65536, got {dim!r}")
        mode = d.get("backfill_mode") or "internal"
        if mode not in ("internal", "external"):
            raise InvalidInputError(f"backfill_mode must be internal or external, got {mode!r}")
        shares = int(d.get("backfill_shares") or 1)
        if not 1 <= shares <= 10_000:
            raise InvalidInputError(f"backfill_shares must be 1..10000, got {shares}")
        keep_merged = str(d.get("keep_merged") or "never")
        if keep_merged not in KEEP_MERGED:
            raise InvalidInputError(f"keep_merged must be one of {list(KEEP_MERGED)}")
        coordinated = d.get("coordinated", False)
        if not isinstance(coordinated, bool):
            raise InvalidInputError(f"coordinated must be true or false, got {coordinated!r}")
        if coordinated and keep_merged != "never":
            # every shard must answer in one space: a merge is a space of its own per shard
            raise InvalidInputError("a coordinated migration cannot keep both models merged")
        return MigrationRequest(
            d["to_model"],
            kinds,
            bool(d.get("diagonal", False)),
            pairs,
            min_l,
            k,
            int(d.get("seed", 0)),
            tuple(labelled),
            bool(d.get("backfill", True)),
            cutover == "auto",
            batch,
            rate,
            str(d.get("id") or ""),
            metric,
            dim,
            mode,
            shares,
            keep_merged=keep_merged,
            coordinated=coordinated,
        )

    def options(self) -> dict[str, Any]:
        """What every step needs after a restart (kept in the record; the labelled queries
        are in the pairs object)."""
        return {
            "backfill": self.backfill,
            "auto_cutover": self.auto_cutover,
            "backfill_batch": self.backfill_batch,
            "backfill_rate": self.backfill_rate,
            "k": self.k,
            "kinds": list(self.kinds),
            "diagonal": self.diagonal,
            "pairs": self.pairs,
            "min_labelled": self.min_labelled,
            "seed": self.seed,
            "backfill_mode": self.backfill_mode,
            "backfill_shares": self.backfill_shares,
            "keep_merged": self.keep_merged,
            "coordinated": self.coordinated,
        }

    @staticmethod
    def of_record(rec: MigrationRecord, labelled: Sequence[tuple[str, Any]] = ()) -> MigrationRequest:
        """The request a committed record was started with (for a resumed gate step)."""
        o = rec.options
        return MigrationRequest(
            rec.to_model,
            tuple(o.get("kinds", DEFAULT_KINDS)),
            bool(o.get("diagonal", False)),
            int(o.get("pairs", 20_000)),
            int(o.get("min_labelled", 200)),
            int(o.get("k", 10)),
            int(o.get("seed", 0)),
            tuple(labelled),
            bool(o.get("backfill", True)),
            bool(o.get("auto_cutover", True)),
            int(o.get("backfill_batch", 256)),
            float(o.get("backfill_rate", 0.0)),
            rec.id,
            rec.target.metric if rec.target else "cosine",
            rec.target.dim if rec.target else None,
            rec.backfill_mode,
            int(o.get("backfill_shares", 1)),
            keep_merged=str(o.get("keep_merged") or "never"),
            coordinated=bool(o.get("coordinated", False)),
        )


def adapter_name(kind: str, diagonal: bool) -> str:
    return f"adapter:{kind}{'+diag' if diagonal else ''}"


def _normalized(m: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12), np.float32)


def sample_rows(
    view: View, want: int, rng: np.random.Generator
) -> tuple[list[int], list[str], float]:
    """Up to ``want`` random live positions that have text, their texts, and the share of
    inspected live rows that had text (the backfill's coverage estimate)."""
    alive = np.flatnonzero(view.alive)
    rng.shuffle(alive)
    pos: list[int] = []
    texts: list[str] = []
    seen = 0
    for p in alive.tolist():
        seen += 1
        t = view.row(p, payload=True)["text"]
        if t:
            pos.append(p)
            texts.append(t)
            if len(pos) >= want:
                break
    return pos, texts, (len(pos) / seen if seen else 0.0)


@dataclass
class Pairs:
    """The gate's sampled rows: keys, texts, their stored old-model vectors and their new-model
    vectors, plus the request's labelled queries. Stored as one object (``pairs_key``) so a
    restarted gate fits and measures the same sample."""

    keys: list[Any]
    texts: list[str]
    old: F32
    new: F32
    coverage: float  # share of inspected live rows that had text
    version: int  # the manifest version sampled
    labelled: list[tuple[str, Any]]
    # sampled query traffic (querylog.py) encoded by both models; texts are not stored.
    # q_fit: the half adapters are fitted on; the other half estimates ARR without labels
    q_old: F32 = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    q_new: F32 = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    q_fit: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))

    def query_pairs(self, fit: bool) -> tuple[F32, F32] | None:
        """The traffic queries' (new, old) vectors of one half, None when there are none."""
        pick = self.q_fit if fit else ~self.q_fit
        return (self.q_new[pick], self.q_old[pick]) if pick.any() else None

    def to_bytes(self) -> bytes:
        meta = {
            "keys": self.keys,
            "texts": self.texts,
            "coverage": self.coverage,
            "version": self.version,
            "labelled": [[t, k] for t, k in self.labelled],
        }
        buf = io.BytesIO()
        np.savez(buf, old=self.old, new=self.new, q_old=self.q_old, q_new=self.q_new,
                 q_fit=self.q_fit, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))  # fmt: skip
        return buf.getvalue()

    @staticmethod
    def labelled_bytes(labelled: Sequence[tuple[str, Any]]) -> bytes:
        """The request's labelled queries as an object (``labelled_key``)."""
        return json.dumps([[t, k] for t, k in labelled]).encode()

    @staticmethod
    def labelled_from(data: bytes) -> list[tuple[str, Any]]:
        return [(str(t), k) for t, k in json.loads(data)]

    @staticmethod
    def from_bytes(data: bytes) -> Pairs:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            old, new = np.asarray(z["old"], np.float32), np.asarray(z["new"], np.float32)
            traffic = (  # absent in objects written before the query log existed
                (np.asarray(z["q_old"], np.float32), np.asarray(z["q_new"], np.float32),
                 np.asarray(z["q_fit"], bool)) if "q_fit" in z.files else ()
            )  # fmt: skip
        return Pairs(
            list(meta["keys"]),
            list(meta["texts"]),
            old,
            new,
            float(meta["coverage"]),
            int(meta["version"]),
            [(str(t), k) for t, k in meta["labelled"]],
            *traffic,
        )


def sample_pairs(view: View, encode_new: Encode, req: MigrationRequest) -> Pairs:
    """SAMPLE: rows with text from ``view``, encoded with the new model."""
    rng = np.random.default_rng(req.seed)
    pos, texts, coverage = sample_rows(view, req.pairs, rng)
    if len(pos) < 50:
        raise InvalidInputError(
            f"only {len(pos)} live rows have text; a migration needs at least 50 to measure"
        )
    keys = [view.row(p)["key"] for p in pos]
    new = _normalized(encode_new(texts, "passage"))
    old = view.vectors_at(np.array(pos))
    return Pairs(keys, texts, old, new, coverage, view.version, list(req.labelled))


def traffic_split(texts: Sequence[str]) -> npt.NDArray[np.bool_]:
    """True for the half of the sampled query texts adapters are fitted on (by a hash of the
    text, case and spacing ignored: a query seen twice, or typed twice differently, lands in
    the same half), False for the half that measures."""
    return np.array(
        [zlib.crc32(b"traffic:" + _same_text(t).encode()) % 2 == 0 for t in texts], bool
    )


def encode_traffic(pairs: Pairs, texts: Sequence[str], encode_old: Encode, encode_new: Encode
                   ) -> Pairs:  # fmt: skip
    """SAMPLE: the query log's texts encoded by both models, attached to ``pairs`` (vectors
    only: the texts are not stored).

    The texts are whatever users sent: one that an encoder refuses for good
    (``EncoderRejectedError``: a 4xx, input it will never accept) must not stop the migration
    — the gate would pause for an encoder that is fine, until the text left the log. On a
    refusal each text is encoded alone and the refused ones are left out (counted in the
    log, never named). Transient failures propagate (the gate retries as for the rows).

    The request's labelled queries are left out of the traffic (compared case- and
    space-insensitively): they are the gate's held-out test, and users who search with their
    evaluation queries put them in the log — fitted on, they would make the adapters' gain
    over the status quo look better than it is."""
    held_out = {_same_text(q) for q, _ in pairs.labelled}
    t = [x for x in texts if _same_text(x) not in held_out]
    if not t:
        return pairs
    try:
        q_old, q_new = encode_old(t, "query"), encode_new(t, "query")
    except EncoderRejectedError:
        t, q_old, q_new = _encode_each(t, encode_old, encode_new)
        if not t:
            return pairs
    pairs.q_old = _normalized(q_old)
    pairs.q_new = _normalized(q_new)
    pairs.q_fit = traffic_split(t)
    return pairs


def _same_text(text: str) -> str:
    """A text as the labelled-query filter compares it (case and spacing ignored)."""
    return " ".join(text.casefold().split())


def _encode_each(texts: list[str], encode_old: Encode, encode_new: Encode
                 ) -> tuple[list[str], F32, F32]:  # fmt: skip
    """The texts both encoders accept, one call per text, with their vectors."""
    kept: list[str] = []
    olds: list[F32] = []
    news: list[F32] = []
    for text in texts:
        try:
            o, n = encode_old([text], "query"), encode_new([text], "query")
        except EncoderRejectedError:
            continue
        kept.append(text)
        olds.append(np.asarray(o, np.float32))
        news.append(np.asarray(n, np.float32))
    log.warning("the encoders refused %d of %d sampled queries; left out", len(texts) - len(kept),
                len(texts))  # fmt: skip
    if not kept:
        return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return kept, np.vstack(olds), np.vstack(news)


def fit_adapters(pairs: Pairs, req: MigrationRequest) -> dict[str, Adapter]:
    """FIT: every requested adapter kind on the pairs' fit split, plus the fitting half of the
    sampled query traffic when there is one; each adapter's provenance says what it was
    fitted on (``fitted_on``: ``["pairs:N", "queries:M"]``)."""
    fit = np.flatnonzero(np.array([split_of(str(k)) for k in pairs.keys]) == "fit")
    queries = pairs.query_pairs(fit=True)
    fitted_on = [f"pairs:{len(fit)}"] + ([f"queries:{len(queries[0])}"] if queries else [])
    adapters = {}
    for kind in req.kinds:
        for diag in (False, True) if req.diagonal else (False,):
            a = fit_adapter(
                pairs.new[fit],
                pairs.old[fit],
                FitOptions(kind=kind, diagonal=diag, seed=req.seed, rank_k=req.k),
                query_pairs=queries,
            )
            a.provenance["fitted_on"] = fitted_on
            adapters[adapter_name(kind, diag)] = a
    return adapters


def evaluate_gate(
    view: View,
    from_model: str,
    pairs: Pairs,
    adapters: Mapping[str, Adapter],
    encode_old: Encode,
    encode_new: Encode,
    req: MigrationRequest,
) -> tuple[dict[str, Any], Adapter | None, EvalSet | None]:
    """EVALUATE: measure every strategy on held-out queries over ``view`` and select. The
    sampled rows deleted since the sample are left out. Returns the record's gate fields, the
    selected adapter (None for the status quo) and, with labelled queries, the evaluation set
    the progressive merge and the cutover are measured on."""
    alive = np.flatnonzero(view.alive)
    index_of = {int(p): i for i, p in enumerate(alive.tolist())}
    here = [view.position_of(k) for k in pairs.keys]
    keep = [i for i, p in enumerate(here) if p is not None and int(p) in index_of]
    if len(keep) < 50:
        raise InvalidInputError(f"only {len(keep)} sampled rows are still live; sample again")
    pos = [int(here[i]) for i in keep]  # type: ignore[arg-type]
    texts = [pairs.texts[i] for i in keep]
    new = pairs.new[keep]
    split = np.array([split_of(str(pairs.keys[i])) for i in keep])
    fit = np.flatnonzero(split == "fit")
    labelled: list[tuple[str, int]] = []
    for text, key in pairs.labelled:
        p = view.position_of(key) if isinstance(key, int | str) else None
        if p is not None and int(p) in index_of:  # labels of deleted rows are dropped
            labelled.append((text, index_of[int(p)]))
    metric = decision_metric(len(labelled), req.min_labelled, req.k)
    traffic = pairs.query_pairs(fit=False)  # real queries no adapter was fitted on
    use_traffic = (
        not metric.startswith("success") and traffic is not None and len(traffic[0]) >= MIN_TRAFFIC
    )
    if metric.startswith("success"):
        qtexts = [t for t, _ in labelled]
        labels = np.array([i for _, i in labelled], np.int64)
    elif use_traffic:
        qtexts = []  # the query log's held-out half, already encoded by both models
    else:
        test = np.flatnonzero(split == "test")
        qtexts = [texts[i] for i in test]
        labels = np.full(len(qtexts), -1, np.int64)
    if use_traffic:
        assert traffic is not None
        q_new, q_old = traffic
        labels = np.full(len(q_new), -1, np.int64)
    else:
        if len(qtexts) < 10:
            raise InvalidInputError(
                f"only {len(qtexts)} held-out queries; sample more rows or label queries"
            )
        q_old = _normalized(encode_old(qtexts, "query"))
        q_new = _normalized(encode_new(qtexts, "query"))
    base = view.vectors_at(alive)
    retrieved = {STATUS_QUO: topk(q_old, base, req.k)[0]}
    for name, a in adapters.items():
        retrieved[name] = topk(a.apply(q_new), base, req.k)[0]
    sample_idx = np.array([index_of[p] for p in pos], np.int64)
    arr = estimate_arr(
        q_new, new, sample_idx, retrieved, len(alive), req.k, STATUS_QUO, seed=req.seed
    )
    if metric.startswith("arr"):
        sel = select_from_intervals(arr, metric)
    else:
        sel = select_strategy(
            {n: success(ids, labels, req.k) for n, ids in retrieved.items()}, metric, seed=req.seed
        )
    table = sel.as_dict()
    for row in table["strategies"]:
        row["arr"] = arr[row["name"]][0].as_dict()
        if row["name"] in adapters:  # what the adapter was fitted on (pairs, query traffic)
            row["fitted_on"] = list(adapters[row["name"]].provenance.get("fitted_on", ()))
    # coordinated: the gate measures and records its choice, but the shard serves the status
    # quo until the router cuts every shard over (one scoring space across the shards)
    chosen = None if req.coordinated else adapters.get(sel.selected)
    evalset: EvalSet | None = None
    calibration: dict[str, Any] | None = None
    if metric.startswith("success"):
        texts_q = [t for t, _ in labelled]
        keys_q = [view.row(int(alive[i]))["key"] for _, i in labelled]
        evalset = EvalSet(texts_q, keys_q, calibration_split(texts_q), q_old, q_new)
        served_q = q_old if chosen is None else chosen.apply(q_new)
        calibration = _calibrate(
            view, alive, index_of, pos, new, evalset, served_q, labels, encode_new
        )
    if chosen is not None:
        chosen.provenance.update(
            old_model=from_model,
            new_model=req.to_model,
            metric=metric,
            estimated_arr=arr[sel.selected][0].as_dict(),
            manifest_version=view.version,
        )
    fields: dict[str, Any] = {
        "phase": "Bridged",
        "metric": metric,
        "selected": STATUS_QUO if req.coordinated else sel.selected,
        "reason": sel.reason
        + ("; coordinated: the status quo serves until the cutover" if req.coordinated else ""),
        "strategies": table["strategies"],
        "pairs": len(fit),
        "sampled_rows": len(pos),
        "queries": len(q_new),
        # where ARR was estimated: the sampled rows' texts, or real queries from the query log
        "arr_queries": f"queries:{len(q_new)}" if use_traffic else f"rows:{len(q_new)}",
        "traffic_queries": len(pairs.q_fit),
        "labelled": metric.startswith("success"),
        "text_coverage": pairs.coverage,
        "measured_on_version": view.version,
    }
    if req.coordinated:
        fields["gate_selected"] = sel.selected
    if calibration is not None:
        fields["calibration"] = calibration
    else:
        fields["merge"] = {
            "serves": False,
            "reason": "no labelled queries: the merge cannot be measured, so the selected "
            "strategy serves until cutover",
        }
    return fields, chosen, evalset


def calibration_split(texts: Sequence[str]) -> npt.NDArray[np.bool_]:
    """True for the calibration half of the labelled queries (by a hash of the text: stable
    across restarts), False for the test half the curve is reported on."""
    return np.array([zlib.crc32(t.encode()) % 2 == 0 for t in texts], bool)


@dataclass
class EvalSet:
    """The gate's labelled queries (text, the key they should find), encoded with both
    models. Calibration half: fits the merge's calibration and decides its guard; test half:
    reports the curve. Stored as an object so a resumed backfill measures the same queries."""

    texts: list[str]
    keys: list[Any]
    cal: npt.NDArray[np.bool_]
    q_old: F32
    q_new: F32

    def to_bytes(self) -> bytes:
        return json.dumps({"texts": self.texts, "keys": self.keys}).encode()

    @staticmethod
    def from_bytes(data: bytes, encode_old: Encode, encode_new: Encode) -> EvalSet:
        d = json.loads(data)
        texts = list(d["texts"])
        return EvalSet(
            texts,
            list(d["keys"]),
            calibration_split(texts),
            _normalized(encode_old(texts, "query")),
            _normalized(encode_new(texts, "query")),
        )


def _padded(hits: Sequence[Any], depth: int) -> I64:
    out = np.full((len(hits), depth), -1, np.int64)
    for i, h in enumerate(hits):
        out[i, : len(h.pos)] = h.pos[:depth]
    return out


def _calibrate(
    view: View,
    alive: I64,
    index_of: dict[int, int],
    pos: list[int],
    new: F32,
    ev: EvalSet,
    served_q: F32,
    labels: I64,
    encode_new: Encode,
) -> dict[str, Any]:
    """Per-model calibrations on the calibration half (``migration.fit_calibration``): the
    served strategy's list by exact rank over all rows; the native list over the rows the
    gate re-encoded (plus the calibration queries' labelled rows, which the backfill reaches
    with probability = its share: the merge weighs native probabilities by the share) at
    estimated full-corpus rank = rank ÷ sampled share."""
    cal = np.flatnonzero(ev.cal)
    base = view.vectors_at(alive)
    served = topk(served_q[cal], base, DEPTH)[0]
    ranks = np.broadcast_to(np.arange(1, served.shape[1] + 1), served.shape)
    cal_s = fit_calibration(ranks, served == labels[cal][:, None])
    sampled = {index_of[p] for p in pos}
    extra = sorted({int(i) for i in labels[cal]} - sampled)
    extra_new = (
        _normalized(
            encode_new([view.row(int(alive[i]), payload=True)["text"] for i in extra], "passage")
        )
        if extra
        else np.zeros((0, new.shape[1]), np.float32)
    )
    rows = np.array([index_of[p] for p in pos] + extra, np.int64)
    vecs = np.vstack([new, extra_new])
    local = topk(ev.q_new[cal], vecs, DEPTH)[0]
    est = np.broadcast_to(np.arange(1, local.shape[1] + 1) / (len(rows) / len(alive)), local.shape)
    cal_n = fit_calibration(est, rows[local] == labels[cal][:, None])
    return {"served": cal_s.as_dict(), "native": cal_n.as_dict(), "queries": len(cal)}


def native_mask(native: View) -> npt.NDArray[np.bool_]:
    """Rows of the new model's view that are live and have a new-model vector (backfilled):
    a view's ``alive`` already requires a vector of its model."""
    return native.alive


def merged_positions(
    served: I64,
    native: I64,
    share: float,
    calibration: Mapping[str, Any],
    k: int,
) -> tuple[I64, npt.NDArray[np.float64]]:
    """The progressive merge of per-query lists of view positions (``-1`` padded): native
    ranks become estimated full-corpus ranks (÷ share), native probabilities are weighed by
    the share (the label is backfilled with that probability). Returns the positions and
    their calibrated probabilities of relevance."""
    cal_s = Calibration.from_dict(calibration["served"])
    cal_n = Calibration.from_dict(calibration["native"])
    est = np.broadcast_to(np.arange(1, native.shape[1] + 1) / max(share, 1e-9), native.shape)
    return merge_scored(served, native, est, cal_s, cal_n, k, share)


def measure_progress(
    view: View,
    native: View,
    ev: EvalSet,
    served_q: F32,
    calibration: Mapping[str, Any],
    k: int,
    seed: int = 0,
    prev: MigrationGuard | None = None,
    merge_allowed: bool = True,
) -> dict[str, Any]:
    """One checkpoint of the progressive migration, on the same snapshot (``view`` and
    ``native`` built from one manifest): the guard's decision on the calibration half (given
    its state ``prev`` after the previous checkpoint, ``migration.guard_step``), and on
    the test half Success@k of the status quo, the served strategy, native-only, the merge
    and what is served, each with its interval and its paired gain over the status quo.
    ``native_gain`` (all queries, native vs served) is what the cutover checks;
    ``merge_vs_native`` and ``merge_vs_served`` (test half: queries the calibration never saw)
    are what the cutover's keep-merged policy checks. Without ``merge_allowed`` (a
    coordinated migration) the merge is measured but never serves: the guard stays out."""
    # a deleted label can never be found (-2: lists are padded with -1)
    labels = np.array([p if (p := view.position_of(key)) is not None else -2 for key in ev.keys])
    has = native_mask(native)
    share = float(has.sum() / max(1, view.live_rows))
    served = _padded(view.exact_batch(served_q, DEPTH), DEPTH)
    nat = (
        _padded(native.exact_batch(ev.q_new, DEPTH, has), DEPTH)
        if share > 0
        else np.full((len(ev.keys), 0), -1, np.int64)
    )
    merged = merged_positions(served, nat, share, calibration, k)[0]
    status_quo = _padded(view.exact_batch(ev.q_old, k), k)
    per = {
        STATUS_QUO: success(status_quo, labels, k),
        "served-strategy": success(served, labels, k),
        "native-only": success(nat, labels, k) if nat.size else np.zeros(len(labels)),
        "merge": success(merged, labels, k),
    }
    cal, test = ev.cal, ~ev.cal
    g = guard_step(
        prev or MigrationGuard(),
        per["merge"][cal],
        per["served-strategy"][cal],
        per[STATUS_QUO][cal],
        seed=seed,
    )
    if not merge_allowed:
        was = prev or MigrationGuard()
        g = replace(g, state=MigrationGuard(False, was.flips, was.checkpoints + 1),
                    reason="MergeNotAllowed")  # fmt: skip
    serves = g.state.serves
    per["served"] = per["merge"] if serves else per["served-strategy"]
    return {
        "share": share,
        "merge_serves": bool(serves),
        "merge_gain_calibration": g.gain.as_dict(),
        "guard": g.as_dict(),
        "merge_vs_native": paired_gain(
            per["merge"][test], per["native-only"][test], seed=seed, level=GUARD_ENTER_LEVEL
        ).as_dict(),
        "merge_vs_served": paired_gain(
            per["merge"][test], per["served-strategy"][test], seed=seed, level=GUARD_ENTER_LEVEL
        ).as_dict(),
        "test": {n: bootstrap(v[test], seed=seed).as_dict() for n, v in per.items()},
        "test_gain_vs_status_quo": {
            n: paired_gain(v[test], per[STATUS_QUO][test], seed=seed).as_dict()
            for n, v in per.items()
        },
        "native_gain": paired_gain(per["native-only"], per["served-strategy"], seed=seed).as_dict(),
        "queries": {"calibration": int(cal.sum()), "test": int(test.sum())},
    }


def closed_record(
    record: Mapping[str, Any], phase: str, now: float, **fields: Any
) -> dict[str, Any]:
    """The record of a migration that ended (Succeeded, Failed, RolledBack): its objects
    (adapter, evaluation queries) are no longer named, so GC retires them — except the
    adapter of a migration that ended keeping both models merged (the merge serves it)."""
    out = {**record, "phase": phase, "finished_at": now, **fields}
    merged = phase == "Succeeded" and (out.get("cutover") or {}).get("merged")
    for key in ("adapter_key", "eval_key", "pairs_key", "fitted", "labelled_key"):
        if not (merged and key == "adapter_key"):
            out.pop(key, None)
    return out


def interval_of(d: Mapping[str, Any] | None) -> Interval | None:
    if not d:
        return None
    return Interval(float(d["mean"]), float(d["low"]), float(d["high"]), int(d.get("n", 0)))


def strategy_for(
    record: Mapping[str, Any] | None, has_text: bool, model: str | None, backfilled: bool = False
) -> str:
    """How a query is served during a bridged migration, or after one that ended keeping both
    models merged (pure): text follows the selected strategy; a new-model vector needs the
    adapter; anything else is the status quo. A query tagged with the new model (vector or
    text) is answered natively once the migration is Backfilled and every live row of the
    snapshot has a new-model vector (``backfilled``): exactly what the cutover would serve."""
    if not record or not serves_both(record):
        return STATUS_QUO
    selected = str(record["selected"])
    if model == record["to"] and backfilled and record.get("phase") == "Backfilled":
        return NATIVE
    if model == record["to"]:
        return selected if selected != STATUS_QUO else "refused"
    return selected if has_text else STATUS_QUO


def summarize(record: Mapping[str, Any]) -> Sequence[str]:
    """The strategy table as text lines (for the demo and logs)."""
    lines = [
        f"{'strategy':<26} {record['metric']:>22} {'gain vs status quo':>26} {'ARR@k (est.)':>22}"
    ]
    for r in record["strategies"]:
        m, g, a = r["metric"], r["gain"], r["arr"]
        mark = "*" if r["name"] == record["selected"] else " "
        lines.append(
            f"{mark}{r['name']:<25} {m['mean']:.3f} [{m['low']:.3f},{m['high']:.3f}] "
            f"{g['mean']:+.3f} [{g['low']:+.3f},{g['high']:+.3f}]   {a['mean']:.3f} [{a['low']:.3f},{a['high']:.3f}]"
        )
    return lines
