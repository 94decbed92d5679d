"""The chaos campaign on one LocalCluster (issue 17 item 3) and its results.

The README story's first steps bring the index to Serving (tests/cluster/story.py: chart,
examples, a real corpus ingested); then the trials of ``chaos_plan.schedule`` run one after
the other on the same cluster: a steady trial strikes while the index serves under load, a
migrating group starts a ModelMigration (back and forth between the examples' two models, so
every backfill kill has a backfill to hit) and strikes in its gate or backfill. Results:
``bench/results/cluster_chaos.{json,md,png}`` (``write_results``), only from a real run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import chaos_plan as cp
from tests.cluster.chaos import load_prefix, run_trial

MODELS = ("e5-small", "minilm")  # the examples' EmbeddingModels; the index starts on minilm


class Migrations:
    """ModelMigrations of the story's index to the other model, one at a time."""

    def __init__(self, story: Any) -> None:
        self.story, self.target, self.count = story, MODELS[0], 0

    def start(self) -> str:
        self.count += 1
        name = f"chaos-{self.count}-to-{self.target}"
        objs = self.story.migration_objects()
        for obj in objs:
            if obj["kind"] == "ModelMigration":
                obj["metadata"]["name"] = name
                obj["spec"]["targetModelRef"]["name"] = self.target
        self.story.kubectl("apply", "-f", "-", input="---\n".join(yaml.safe_dump(o) for o in objs))
        return name

    def phase(self, name: str) -> str:
        s = self.story.s
        obj = self.story.c.get("modelmigrations", s.namespace, name) or {}
        return str((obj.get("status") or {}).get("phase") or "")

    def serving(self, timeout_s: float) -> float | None:
        """Seconds until the index is Serving (after a migration's end), None if it is not
        within ``timeout_s``. The cutover's model trains and validates its codebook first, on
        the oracle's samples of live queries: queries run meanwhile, as traffic would (with
        none, the index stayed Validating on the exact shadow, its overlap unmeasured)."""
        t0 = time.monotonic()
        self.story.start_queries()
        try:
            while self.story.phase() != "Serving":
                if time.monotonic() - t0 > timeout_s:
                    return None
                time.sleep(1.0)
            return time.monotonic() - t0
        finally:
            self.story.stop_queries()

    def finish(self, name: str, timeout_s: float) -> str:
        """Waits for the migration's end; after Succeeded the next one goes back."""
        deadline = time.monotonic() + timeout_s
        while (phase := self.phase(name)) not in cp.MIGRATION_DONE:
            if time.monotonic() > deadline:
                return f"timed out in {phase or 'no phase'}"
            time.sleep(1.0)
        if phase == "Succeeded":
            self.target = MODELS[1] if self.target == MODELS[0] else MODELS[0]
        return phase


def recheck(results: list[cp.TrialResult], loads: list[Any]) -> None:
    """The ledgers of trials that struck during a migration, read again once it ended: a
    write acknowledged during the gate or the backfill must survive the cutover too (from the
    writer and through the readers). ``loads`` holds the loads of the trials that got as far
    as checking (a trial ended by an error has none)."""
    by_prefix = {load.prefix: load for load in loads}
    for r in results:
        load = by_prefix.get(load_prefix(r.seed))
        if load is None:
            continue
        lost, back, _, _ = load.check()
        r_lost, r_back = load.check_readers()
        r.lost = sorted({*r.lost, *lost})
        r.resurrected = sorted({*r.resurrected, *back})
        r.readers_lost = sorted({*r.readers_lost, *r_lost})
        r.readers_resurrected = sorted({*r.readers_resurrected, *r_back})


def run_campaign(
    cluster: Any,
    story: Any,
    groups: list[cp.Group],
    log: Callable[[str], None] = print,
    migration_timeout_s: float = 600.0,
    serving_timeout_s: float = 600.0,
    on_group: Callable[[list[cp.TrialResult]], None] = lambda results: None,
) -> list[cp.TrialResult]:
    """Every group of the schedule in turn; each trial's result is logged as it ends, and
    ``on_group`` gets the results so far after every group (a run cut short keeps them)."""
    s = story.s
    migrations = Migrations(story)
    results: list[cp.TrialResult] = []
    for group in groups:
        name = migrations.start() if group.migrate else None
        mine: list[cp.TrialResult] = []
        loads: list[Any] = []
        for fault, seed in group.trials:
            r = run_trial(
                cluster, fault, seed, namespace=s.namespace, index=s.index, migration=name,
                moments=cp.MOMENTS if group.migrate else ("steady",), wait_migration=False,
                loads=loads,
            )  # fmt: skip
            mine.append(r)
            log(cp.describe(r))
        if name is not None:
            phase = migrations.finish(name, migration_timeout_s)
            serving = migrations.serving(serving_timeout_s)
            for r in mine:
                r.migration, r.serving_after_migration = phase, serving is not None
            recheck(mine, loads)
            log(f"migration {name}: {phase}; the index "
                + (f"Serving {serving:.0f} s after" if serving is not None else "not Serving"))  # fmt: skip
        results += mine
        on_group(results)  # saved before the retirement, which raises if never acknowledged
        retired = sum(load.retire() for load in loads)  # the index keeps the story's size
        log(f"retired {retired} keys of the group's clients")
    return results


def write_results(
    results: list[cp.TrialResult], out_dir: Path, command: str, setup: dict[str, Any]
) -> None:
    """cluster_chaos.json (every trial, its plan and verdict), .md (the summary per fault
    and the trial table), .png (recovery time per fault, query success % per fault)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(r.seconds for r in results)
    doc = {
        "command": command,
        "setup": setup,
        "trials": [{**asdict(r), "ok": r.ok, "failures": r.failures} for r in results],
        "summary": [asdict(row) for row in cp.summarize(results)],
    }
    (out_dir / "cluster_chaos.json").write_text(json.dumps(doc, indent=1) + "\n")
    header = "\n".join(
        [
            "# Chaos on the local cluster",
            "",
            f"Command: `{command}`",
            "",
            "Setup: " + "; ".join(f"{k}: {v}" for k, v in setup.items()) + ".",
            "",
            f"{len(results)} trials × {total / max(1, len(results)):.0f} s on average "
            f"({total / 60:.1f} min of trials), {sum(r.ok for r in results)} passed every check.",
            "Outage: strike → the fault is over (the pod ready again, the partition healed); "
            "recovery: fault over → the index in its phase of before (during a migration: any "
            "phase that answers queries), a query and a write answered (both started after the "
            "fault). Query success: queries started from the strike to the recovery, each "
            "retried as the README documents, counted once the last of them ended. Lost and "
            "resurrected: every ledger read back from the writer and through the readers (60 s "
            "to catch up), and again after the migration a trial struck ended. Alerts: expected "
            "only when the outage outlasts the compressed `for:` plus a scrape and two "
            "evaluations. Moment (phase): the migration's phase when the trial struck; a trial "
            "planned for the gate or the backfill that found the migration past it struck "
            "where it was.",
        ]
    )
    (out_dir / "cluster_chaos.md").write_text(cp.table(results, header))
    _plot(results, out_dir / "cluster_chaos.png")


def _plot(results: list[cp.TrialResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in cp.summarize(results) if row.fault != "all"]
    names = [row.fault for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        rec = [r.recovery_s for r in results if r.fault == name and r.recovery_s is not None]
        left.scatter([i] * len(rec), rec, alpha=0.7, color="tab:blue")
        failed = [r for r in results if r.fault == name and r.recovery_s is None]
        if failed:
            left.scatter([i] * len(failed), [0.0] * len(failed), marker="x", color="tab:red")
    left.scatter(range(len(names)), [row.recovery_p50_s or 0 for row in rows],
                 marker="_", s=400, color="black", label="p50")  # fmt: skip
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("recovery after the fault, s")
    left.set_title("Recovery time per trial (x: not recovered)")
    left.legend()
    pct = [100 * (row.query_success or 0) for row in rows]
    right.bar(range(len(names)), pct, color="tab:green")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_ylim(min([90.0, *pct]) - 5, 100.5)
    right.set_ylabel("queries answered in the fault window, %")
    right.set_title("Query success during faults (clients retry)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
