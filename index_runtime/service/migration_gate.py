"""The migration gate's steps for the runner (:mod:`index_runtime.service.migrator`):
DUAL_WRITES, SAMPLE, FIT, EVALUATE. Each writes its objects (labelled queries, pairs, fitted
adapters, the selected adapter and the evaluation queries) before the one commit that names
them, and reads its input from what is committed, so re-running it after a crash converges.
The measuring itself is :mod:`index_runtime.service.migrate`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from index_runtime.adapters import artifact
from index_runtime.contract import MigrationRecord, MigrationTarget
from index_runtime.crash import crash_point
from index_runtime.errors import ConflictError, InvalidInputError
from index_runtime.index.loader import serving_model
from index_runtime.service.migrate import (
    EvalSet,
    MigrationRequest,
    Pairs,
    encode_traffic,
    evaluate_gate,
    fit_adapters,
    sample_pairs,
)
from index_runtime.store.manifest import ADAPTER_DIR, Manifest, ModelSpec
from index_runtime.store.objects import new_object_name

if TYPE_CHECKING:
    from index_runtime.service.migrator import Migrator


class Superseded(ConflictError):
    """The record a step worked for is no longer the active one (rolled back, cut over,
    replaced): the step's result is dropped. The runner's loop catches it; when it reaches a
    client (a rollback or cutover request that raced the loop's own commit) it is a 409."""


def dual_writes(mig: Migrator, req: MigrationRequest, mid: str) -> None:
    """DUAL_WRITES: probe the new model's dimension, store the labelled queries, then one
    commit: the record (Pending) and the index spec requiring both models' vectors."""
    view = mig.rt.fresh_view()  # every acknowledged write (the published view may lag)
    probe = next((t for p in view.live_pos[:1000] if (t := view.row(int(p), True)["text"])),
                 None)  # fmt: skip
    if probe is None:
        raise InvalidInputError("no live rows have text; a migration re-encodes text")
    dim = int(np.asarray(mig._encoders()[1]([probe], "passage")).shape[1])
    if req.dim is not None and req.dim != dim:
        raise InvalidInputError(f"{req.to_model!r} encodes {dim} dimensions, not {req.dim}")
    labelled_key = None
    if req.labelled:
        labelled_key = new_object_name(ADAPTER_DIR, ".json")
        mig.rt.store.put(labelled_key, Pairs.labelled_bytes(req.labelled))
    now = mig.rt.clock()
    old = mig.rt.model
    rec = MigrationRecord(
        id=mid,
        from_model=old,
        to_model=req.to_model,
        target=MigrationTarget(dim, req.metric),
        phase="Pending",
        started_at=float(mig.job.get("started_at", now)),
        updated_at=now,
        options=req.options(),
        labelled_key=labelled_key,
    )
    w = mig.rt._writer()

    def edit(m: Manifest) -> Manifest:
        cur = MigrationRecord.from_json(m.migration)
        if cur is not None and cur.active:
            raise Superseded("another migration became active")
        return replace(_with_target(m, rec), migration=rec.to_json())

    with mig.lock:
        w.change_spec(edit, f"migration to {req.to_model}: dual writes")
    crash_point("migration.dual_writes.committed")
    mig.rt.changed()
    mig.rt.refresh(force=True)

def restore_dual_writes(mig: Migrator, rec: MigrationRecord) -> None:
    mig._commit(lambda r: r, "migration: dual writes", "migration.dual_writes.committed",
                 lambda m, r: _with_target(m, r))  # fmt: skip

def sample(mig: Migrator, rec: MigrationRecord) -> None:
    labelled = (
        Pairs.labelled_from(mig.rt.store.get(rec.labelled_key)) if rec.labelled_key else []
    )
    req = MigrationRequest.of_record(rec, labelled)
    mig.set_job("SamplingPairs", f"sampling up to {req.pairs} rows with text")
    enc_old, enc_new = mig._encoders()
    pairs = sample_pairs(mig.rt.fresh_view(), enc_new, req)
    # the query log's sample (empty unless the index turned it on), encoded by both models
    pairs = encode_traffic(pairs, mig.rt.queries.snapshot(), enc_old, enc_new)
    key = new_object_name(ADAPTER_DIR, ".npz")
    mig.rt.store.put(key, pairs.to_bytes())
    mig.commit(lambda r: r.replace(phase="TrainingAdapter", pairs_key=key),
                "migration pairs sampled", "migration.pairs.committed")  # fmt: skip

def fit(mig: Migrator, rec: MigrationRecord) -> None:
    req = MigrationRequest.of_record(rec)
    assert rec.pairs_key is not None
    pairs = Pairs.from_bytes(mig.rt.store.get(rec.pairs_key))
    mig.set_job("TrainingAdapter", f"fitting {len(req.kinds)} adapter kind(s)")
    fitted = {}
    for name, adapter in fit_adapters(pairs, req).items():
        key = new_object_name(ADAPTER_DIR, ".safetensors")
        mig.rt.store.put(key, artifact.to_bytes(adapter))
        fitted[name] = key
    mig.commit(lambda r: r.replace(phase="Evaluating", fitted=fitted),
                "migration adapters fitted", "migration.adapter.committed")  # fmt: skip

def evaluate(mig: Migrator, rec: MigrationRecord) -> None:
    enc_old, enc_new = mig._encoders()
    assert rec.pairs_key is not None
    pairs = Pairs.from_bytes(mig.rt.store.get(rec.pairs_key))
    req = MigrationRequest.of_record(rec, pairs.labelled)
    adapters = {n: artifact.from_bytes(mig.rt.store.get(k)) for n, k in rec.fitted.items()}
    mig.set_job("Evaluating", "measuring strategies on held-out queries")
    fields, chosen, ev = evaluate_gate(
        mig.rt.fresh_view(), rec.from_model, pairs, adapters, enc_old, enc_new, req
    )
    adapter_key = eval_key = None
    if chosen is not None:
        adapter_key = new_object_name(ADAPTER_DIR, ".safetensors")
        mig.rt.store.put(adapter_key, artifact.to_bytes(chosen))
    if ev is not None:
        eval_key = new_object_name(ADAPTER_DIR, ".json")
        mig.rt.store.put(eval_key, ev.to_bytes())
    typed = {k: fields.pop(k) for k in ("phase", "metric", "selected", "reason")}
    strategies = tuple(fields.pop("strategies"))
    calibration, merge = fields.pop("calibration", None), fields.pop("merge", None)

    def change(r: MigrationRecord) -> MigrationRecord:
        return r.replace(**typed, strategies=strategies, calibration=calibration,
                         merge=merge, adapter_key=adapter_key, eval_key=eval_key,
                         fitted={}, extra={**r.extra, **fields})  # fmt: skip

    out = mig.commit(change, "migration Bridged", "migration.gate.committed")
    mig.set_job("Bridged", out.reason)

def evalset(mig: Migrator, rec: MigrationRecord) -> EvalSet | None:
    if not rec.eval_key:
        return None
    enc_old, enc_new = mig._encoders()
    return EvalSet.from_bytes(mig.rt.store.get(rec.eval_key), enc_old, enc_new)


def _with_target(m: Manifest, rec: MigrationRecord) -> Manifest:
    """``m`` with the target model stored and required (dual writes), in its own space."""
    t = rec.target or MigrationTarget(int(m.index.dims.get(rec.to_model, 0)) or 0)
    models = {**m.index.models, rec.to_model: ModelSpec(t.dim, t.metric)}
    old = serving_model(m)
    spec = replace(m.index, models=models, write_models=(old, rec.to_model))
    return replace(m, index=spec)
