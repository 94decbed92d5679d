"""The status document of one index runtime: a projection of its manifest, view, oracle
windows and lifecycle decision (what `GET …/status`, the metrics and the operator read)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from index_runtime.migration import migration_summary

if TYPE_CHECKING:
    from index_runtime.service.runtime import IndexRuntime


def _window(rt: IndexRuntime, version: int) -> dict[str, Any]:
    stats, rank, dist, total = rt.oracle.details(version)
    return {
        "codebook": version,
        "count": stats.count,
        "mean": None if stats.count == 0 else stats.mean,
        "lower": stats.lower,
        "upper": stats.upper,
        "rank_correlation": rank,
        "distortion_ratio": dist,
        "samples_total": total,
    }


def _finite(d: Any) -> Any:
    """JSON has no NaN: an empty window's mean becomes null."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    return None if isinstance(d, float) and math.isnan(d) else d


def storage_status(rt: IndexRuntime) -> dict[str, Any] | None:
    """``{"writable", "reason", "message", "flush_error", "errors": [{op, kind, count}]}``."""
    if rt.writer is None:
        return None
    out = rt.writer.storage.condition()
    out["pending_rows"] = rt.writer.pending_rows
    out["wal_bytes"] = rt.writer.wal.bytes
    return out


def _query_log(rt: IndexRuntime) -> dict[str, Any]:
    """The query log's counts (never its texts); on a reader, what it forwarded."""
    out = rt.queries.stats()
    if rt.forwarder is not None:
        out.update(forwarded=rt.forwarder.sent, forward_dropped=rt.forwarder.dropped)
    return out


def build_status(rt: IndexRuntime) -> dict[str, Any]:
    """Everything the operator and dashboards need (a projection, computed on demand)."""
    m = rt.current_manifest()
    view = rt.view
    d = rt.decision
    cand = m.candidate
    rows = sum(s.rows for s in m.segments)
    live_stored = sum(s.live for s in m.segments)
    prim = view.primaries.get(view.serving)
    overhead = view.dead_in_primary[view.serving] / prim.ntotal if prim and prim.ntotal else 0.0
    o = rt.settings.oracle
    serving_path = "primary" if view.serving and view.serving in view.primaries else "shadow"
    return {
        "index": rt.name,
        "model": rt.model,
        "settings": rt.settings.to_json(),
        "phase": d.phase.value,
        "migration": {
            "record": rt.bridge or None,
            "job": rt.migration_job or None,
            **migration_summary(rt.record, view.live_rows),  # the kept model's cost: rows now
        },
        "reason": d.reason,
        "message": d.message,
        "maintenance": rt.options.maintenance,
        # the query log's sample (counts only, never texts); forwarded: a reader's sends
        "query_log": _query_log(rt),
        "serving": {"path": serving_path, "codebook": m.serving},
        "codebooks": [
            {
                "version": c.version,
                "role": "serving" if c.version == m.serving else "candidate",
                "nlist": c.nlist,
                "m": c.m,
                "nbits": c.nbits,
                "coarse": c.coarse,
                "trained_rows": c.trained_rows,
                "sample_rows": c.sample_rows,
                "trained_at": c.trained_at,
                "index_files": len(m.files_of(c.version)),
            }
            for c in m.codebooks
        ],
        # the windows live where the oracle runs: here, or on the shadow service
        "windows": {
            "serving": _window(rt, m.serving) if m.serving and rt.roles.shadow else None,
            "candidate": _window(rt, cand.version) if cand and rt.roles.shadow else None,
        },
        "oracle": {
            "location": "local" if rt.roles.shadow else (rt.options.shadow_url or "none"),
            "k": o.k,
            "theta": o.theta,
            "delta": o.delta,
            "min_samples": o.min_samples,
            "sample_rate": o.sample_rate,
            "measured": rt.oracle.measured,
            "dropped": rt.oracle.dropped,
            "busy_seconds": round(rt.oracle.busy_s, 3),
            "stale_samples": rt.stale_samples,
            "mirrored": rt.mirror.sent if rt.mirror else 0,
            "mirror_dropped": rt.mirror.dropped if rt.mirror else 0,
        },
        "counts": {
            "live": view.live_rows,
            "pending": len(view.delta),
            "segments": len(m.segments),
            "stored_rows": rows,
            "tombstones": sum(s.tombstones for s in m.segments),
            "deleted_ratio": (rows - live_stored) / rows if rows else 0.0,
        },
        "deletion_overhead": {
            "primary": overhead,
            "shadow": rt.shadow_graph.overhead(view) if rt.shadow_graph else 0.0,
        },
        "shadow": {
            "kind": rt.settings.shadow.kind,
            "nodes": rt.shadow_graph.nodes if rt.shadow_graph else view.live_rows,
            "regenerations": rt.shadow_graph.regenerations if rt.shadow_graph else 0,
            "regeneration_failures": rt.regeneration_failures,
        },
        "reader": {
            "manifest_version": view.version,
            "lag_seconds": rt.reader_lag_s,
            "view_built_at": view.built_at,
        },
        "training": {
            "running": rt.training_thread is not None and rt.training_thread.is_alive(),
            "trainings": rt.trainings,
            "consecutive_failures": rt.failures,
            "last_failure": rt.last_failure,
        },
        "compaction": {"last_success_at": rt.last_compaction_at},
        # the writer's local storage: writable or why not (disk full, I/O errors), flush
        # errors and error counts by op and kind (None on replicas without the writer)
        "storage": storage_status(rt),
        # the lifecycle policy's input and thresholds as this replica sees them: the operator
        # combines the writer's (training, compaction) with the shadow's (windows) and decides
        "observed": _finite(asdict(rt.observe())),
        "thresholds": asdict(rt.thresholds()),
    }
