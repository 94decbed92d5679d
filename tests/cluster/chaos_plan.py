"""Chaos trials on the local cluster, the pure part: plans from seeds, the clients' retry rule,
the acknowledged-writes ledger check, each trial's verdict and the campaign's summary.

A trial is one fault (``FAULTS``) struck at a seeded moment while writers and readers load
the index through its Services (tests/cluster/chaos.py does the I/O). Times are seconds on
the trial's monotonic clock (0 = the trial's start). Nothing here does I/O or sleeps, so
every rule is tested without a cluster (tests/unit/test_cluster_chaos_plan.py).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fault_campaign import allowed_states

FAULTS = (
    "kill-writer",
    "kill-reader",
    "kill-shadow",
    "kill-backfill",
    "kill-operator",
    "partition-s3",
    "sigstop",
)
# the pods a fault may hit, by app.kubernetes.io/component (the operator's and the chart's
# labels; a backfill pod is a pod of the migration's Indexed Job)
TARGETS: dict[str, tuple[str, ...]] = {
    "kill-writer": ("writer",),
    "kill-reader": ("reader",),
    "kill-shadow": ("shadow",),
    "kill-backfill": ("job-backfill",),
    "kill-operator": ("operator",),
    "partition-s3": ("writer",),
    "sigstop": ("writer", "reader", "shadow"),
}
# moments to strike: "steady" (serving under load, no migration needed), "gate" (a
# migration is running, not yet backfilling), "Backfilling" (its backfill pods run)
MOMENTS = ("steady", "gate", "Backfilling")
# a migration per trial would not fit the campaign's time: 3 in 5 trials strike steady
MOMENT_WEIGHTS = {"steady": 3.0, "gate": 1.0, "Backfilling": 1.0}
NEEDS_BACKFILL = ("kill-backfill",)
PARTITION_S = (5.0, 60.0)  # the range for the writer <-> S3 partition
RETRYABLE = (429, 503, 507)  # the README: backpressure, store/fenced writer, full disk
QUERY_SLO = 0.9  # share of queries (each retried as documented) answered in a fault window
MIGRATION_DONE = ("Succeeded", "Failed", "RolledBack")
# a writer down this long must see readers answer meanwhile (answered before it was back); in
# a shorter outage a query may just be retried across it
READERS_ALONE_S = 2.0
# VectorIndex phases a migration's cutover may leave the index in while it answers queries (the
# new model's codebook is trained and validated again, the exact shadow serving meanwhile)
AFTER_CUTOVER = ("Serving", "Training", "Validating", "Retraining")


def phase_recovered(phase: str, before: str, migrating: bool) -> bool:
    """The index is back after a fault: in its phase of before -- or, when a migration runs
    (it may cut over during the trial and send the index through training and validation of
    the new model), in any phase that answers queries. That the index serves again after the
    migration is checked once it ends (``TrialResult.serving_after_migration``)."""
    return phase == before or (migrating and phase in AFTER_CUTOVER)


@dataclass(frozen=True)
class Plan:
    """What one trial does. ``delay_s``: after the moment is reached, how long to wait before
    striking; ``duration_s``: how long a partition or a SIGSTOP is held (0 for kills; a
    SIGSTOP is held until the kubelet restarts the pod, at most this long); ``pick``: which
    of the matching pods (modulo their count, sorted by name)."""

    fault: str
    seed: int
    component: str
    moment: str
    delay_s: float
    duration_s: float
    pick: int


def liveness_allowance_s(probe: Mapping[str, Any] | None, scale: float = 1.0) -> float:
    """How long a hung container survives its liveness probe: ``failureThreshold`` failed
    probes ``periodSeconds`` apart (times the kubelet's ``probe_scale``), the last one timing
    out after ``timeoutSeconds``, which the local kubelet does not scale (Kubernetes' defaults
    3, 10 s, 1 s). No probe: inf."""
    if not probe:
        return math.inf
    period = float(probe.get("periodSeconds", 10))
    threshold = int(probe.get("failureThreshold", 3))
    timeout = float(probe.get("timeoutSeconds", 1))
    return period * threshold * scale + timeout


def plan(
    fault: str,
    seed: int,
    *,
    allowance_s: float = 31.0,
    moments: Sequence[str] = MOMENTS,
    delay_s: tuple[float, float] = (0.5, 4.0),
    partition_s: tuple[float, float] = PARTITION_S,
) -> Plan:
    """The trial of ``fault`` for ``seed``. ``moments``: those the caller can provide (no
    migration running: only "steady"); a kill of a backfill pod needs "Backfilling".
    A SIGSTOP is held 1.5-2.5x the liveness allowance (longer than the probes allow)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    rng = random.Random(f"{fault}/{seed}")
    allowed = [m for m in moments if m in MOMENTS]
    if fault in NEEDS_BACKFILL:
        allowed = [m for m in allowed if m == "Backfilling"]
    if not allowed:
        raise ValueError(f"{fault} cannot strike at any of {list(moments)}")
    component = rng.choice(TARGETS[fault])
    moment = rng.choices(allowed, [MOMENT_WEIGHTS[m] for m in allowed])[0]
    if fault == "partition-s3":
        duration = rng.uniform(*partition_s)
    elif fault == "sigstop":
        if not math.isfinite(allowance_s):
            raise ValueError("sigstop needs a liveness probe on the target")
        duration = allowance_s * rng.uniform(1.5, 2.5)
    else:
        duration = 0.0
    return Plan(
        fault=fault,
        seed=seed,
        component=component,
        moment=moment,
        delay_s=round(rng.uniform(*delay_s), 2),
        duration_s=round(duration, 2),
        pick=rng.randrange(1 << 16),
    )


def campaign(n: int, first_seed: int = 0) -> list[tuple[str, int]]:
    """``n`` trials as (fault, seed): the faults in turn (each at least ``n // 7`` times),
    seeds ``first_seed`` .. ``first_seed + n - 1``."""
    return [(FAULTS[i % len(FAULTS)], first_seed + i) for i in range(n)]


@dataclass(frozen=True)
class Group:
    """Trials run one after the other; ``migrate``: during one migration started before
    them (the campaign's migrations go back and forth between two models)."""

    migrate: bool
    trials: tuple[tuple[str, int], ...]


def schedule(n: int, first_seed: int = 0, per_migration: int = 3) -> list[Group]:
    """``campaign(n, first_seed)`` grouped: each trial whose plan strikes steady alone, the
    others ``per_migration`` to a migration, gate moments before Backfilling ones (a
    migration passes the gate first), a backfill kill first among Backfilling ones (its
    pods must still run), in seed order otherwise. Backfill kills are dealt one to each
    migration, then gate trials one to each, then the rest: a gate trial lasts about as long
    as the campaign's backfill, and behind two of them a backfill kill found the backfill over
    (seed 10, behind seeds 16 and 13)."""
    steady: list[Group] = []
    migrating: list[tuple[int, bool, str, int]] = []
    for fault, seed in campaign(n, first_seed):
        moment = plan(fault, seed).moment
        if moment == "steady":
            steady.append(Group(False, ((fault, seed),)))
        else:
            migrating.append((MOMENTS.index(moment), fault != "kill-backfill", fault, seed))
    # at most one backfill kill per migration (a second finds the backfill over): they are
    # dealt first, one to each migration, the other trials fill up in seed order
    n_groups = math.ceil(len(migrating) / per_migration) if migrating else 0
    kills = [t for t in migrating if not t[1]]
    if len(kills) > n_groups:
        raise ValueError(f"{len(kills)} backfill kills for {n_groups} migrations: per_migration too large")
    chunks: list[list[tuple[int, bool, str, int]]] = [[k] for k in kills]
    chunks += [[] for _ in range(n_groups - len(chunks))]
    gate = MOMENTS.index("gate")
    gates = [t for t in migrating if t[1] and t[0] == gate]
    for chunk, t in zip(chunks, gates, strict=False):
        chunk.append(t)
    dealt = set(gates[: len(chunks)])
    rest = iter(t for t in migrating if t[1] and t not in dealt)
    for chunk in chunks:
        chunk += itertools.islice(rest, per_migration - len(chunk))
    groups = [Group(True, tuple((f, s) for _, _, f, s in sorted(chunk))) for chunk in chunks if chunk]
    return _interleave(groups, steady)


def _interleave(migrations: list[Group], steady: list[Group]) -> list[Group]:
    """A migration, then two steady trials, in turn: migrations between steady trials spread
    the faults over the run."""
    out: list[Group] = []
    while steady or migrations:
        if migrations:
            out.append(migrations.pop(0))
        out += [steady.pop(0) for _ in range(min(2, len(steady)))]
    return out


def ci_schedule(n: int, migrations: int, per_migration: int = 4) -> list[Group]:
    """``n`` trials, ``migrations`` of them migrations: the first ``migrations`` migrating
    groups of ``schedule(n, per_migration=per_migration)`` (each with its backfill kill, the
    first going from the story's model, the next back), then steady trials in seed order
    (``campaign(2 * n)`` without the backfill kills, which need a migration, and without the
    seeds already dealt), interleaved as ``schedule`` does. ``migrations=0``: steady trials
    only; as many as ``schedule`` makes: the full schedule (same seeds, same faults)."""
    full = schedule(n, per_migration=per_migration)
    groups = [g for g in full if g.migrate][:migrations]
    if len(groups) < migrations:
        raise ValueError(f"the schedule of {n} trials has {len(groups)} migrations, not {migrations}")
    dealt = {s for g in groups for _, s in g.trials}
    left = n - len(dealt)
    steady = [(f, s) for f, s in campaign(2 * n) if f not in NEEDS_BACKFILL and s not in dealt][:left]
    return _interleave(groups, [Group(False, (t,)) for t in steady])


def next_wait(
    status: int | None,
    retry_after: str | None,
    attempt: int,
    elapsed_s: float,
    budget_s: float,
    rng: random.Random,
    cap_s: float = 2.0,
) -> float | None:
    """The documented client rule: after a retryable answer (``RETRYABLE``; ``None`` = no
    answer: refused, reset, timed out) wait ``Retry-After`` (capped at ``cap_s``) or a
    jittered exponential backoff (0.1 s doubling, capped), then try again, while the op's
    ``budget_s`` lasts. Returns the seconds to wait, or None: give up (not retryable, or the
    budget would run out)."""
    if status is not None and status not in RETRYABLE:
        return None
    wait = min(cap_s, 0.1 * 2**attempt) * rng.uniform(0.5, 1.0)
    if retry_after:
        with contextlib.suppress(ValueError):  # an HTTP date: keep the backoff
            wait = min(cap_s, max(0.0, float(retry_after)))
    return None if elapsed_s + wait > budget_s else wait


Op = tuple[str, dict[str, str | None]]  # ("upsert", key -> text) or ("delete", key -> None)


def ledger_check(
    ops: Sequence[Op], acked: Sequence[bool], shown: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """(lost, resurrected) keys. Per key, the text shown (absent: not in ``shown``) must be
    that of its last acknowledged op (None for a delete), or that of a later
    unacknowledged op (a request that timed out may have landed) -- the rule of
    tests/fault_campaign.py's ``allowed_states``. A miss after an acknowledged delete is a
    resurrection, any other miss a lost write."""
    flat = [(kind, list(keys)) for kind, keys in ops]
    lost: list[str] = []
    back: list[str] = []
    for key in sorted({k for _, keys in ops for k in keys}):
        allowed, last = allowed_states(flat, list(acked), key)  # type: ignore[arg-type]
        texts = {None if i is None else ops[i][1][key] for i in allowed}
        if shown.get(key) not in texts:
            (back if last == "delete" else lost).append(key)
    return lost, back


def success_rate(samples: Iterable[tuple[float, bool]], t0: float, t1: float) -> float | None:
    """Share of the (start time, answered) samples started in [t0, t1]; None if none."""
    inside = [ok for t, ok in samples if t0 <= t <= t1]
    return sum(inside) / len(inside) if inside else None


def first_true(series: Iterable[tuple[float, bool]], after: float) -> float | None:
    """The first time >= ``after`` at which the (time, condition) series holds."""
    return next((t for t, ok in sorted(series) if t >= after and ok), None)


def alert_expected(
    outage_s: float, for_s: float, eval_s: float = 1.0, scrape_s: float = 1.0, lag_s: float = 0.0
) -> bool:
    """An alert whose condition holds from ``lag_s`` after the strike to the end of the
    ``outage_s`` fires only if that outlasts its ``for:`` plus a scrape and two evaluations
    (a shorter outage is over before it can fire: by design, no page)."""
    return outage_s - lag_s >= for_s + scrape_s + 2 * eval_s


@dataclass
class TrialResult:
    """What one trial observed (times in seconds; None where it never happened)."""

    fault: str
    seed: int
    plan: dict[str, Any] = field(default_factory=dict)
    target: str = ""  # the pod struck
    phase_at_strike: str = ""  # the migration's phase (or "steady")
    outage_s: float = 0.0  # strike -> the fault is over (kill: pod ready again; partition: healed)
    # a kill or SIGSTOP: strike -> the kubelet started the new process (a lower bound of the time nothing
    # answered the scrapes; the alert is expected from it, not from the outage)
    down_s: float | None = None
    # a partition: strike -> the struck pod was replaced on a new host, which ends the cut
    # (a migration's start or end rolls the index's pods; nothing rolls in steady state)
    moved_s: float | None = None
    recovery_s: float | None = None  # fault over -> Serving, a query and a write answer
    queries: int = 0  # queries started in the fault window (strike .. recovered)
    queries_ok: int = 0
    reader_queries_writer_down: int = 0  # ... while the writer was down or cut off (the
    # writer struck: strike .. fault over; readers must keep answering then)
    reader_ok_writer_down: int = 0
    writes_acked: int = 0  # ops over the whole trial
    writes_failed: int = 0
    lost: list[str] = field(default_factory=list)  # read back from the writer
    resurrected: list[str] = field(default_factory=list)
    readers_lost: list[str] = field(default_factory=list)  # through the readers (from S3)
    readers_resurrected: list[str] = field(default_factory=list)
    migration: str = ""  # the watched migration's last phase ("" = none watched)
    phase_before: str = ""  # the VectorIndex's phase just before the strike
    phase_after: str = ""  # ... at the end of the trial
    # a migration trial: the index reached Serving after the migration ended (None: not checked)
    serving_after_migration: bool | None = None
    restarted: bool | None = None  # the struck pod (or its replacement) ran again
    alert: str = ""
    alert_expected: bool = False
    alert_fired_s: float | None = None  # after the strike
    alert_resolved_s: float | None = None  # after the fault was over
    seconds: float = 0.0
    error: str = ""  # an exception that ended the trial early

    @property
    def query_success(self) -> float | None:
        return self.queries_ok / self.queries if self.queries else None

    @property
    def failures(self) -> list[str]:
        return verdict(self)

    @property
    def ok(self) -> bool:
        return not self.failures


def verdict(r: TrialResult) -> list[str]:
    """The checks of issue 17 a trial failed (empty: it passed)."""
    out = [f"error: {r.error}"] if r.error else []
    if r.lost:
        out.append(f"{len(r.lost)} acknowledged writes lost")
    if r.resurrected:
        out.append(f"{len(r.resurrected)} deleted rows back")
    if r.readers_lost or r.readers_resurrected:
        out.append(f"the readers never caught up: {len(r.readers_lost)} acknowledged writes "
                   f"missing, {len(r.readers_resurrected)} deleted rows shown")  # fmt: skip
    if r.recovery_s is None:
        out.append("did not return to Serving with queries and writes answered")
    if r.migration and r.migration != "Succeeded":
        out.append(f"migration ended {r.migration}")
    if r.serving_after_migration is False:
        out.append("the index did not return to Serving after the migration")
    if r.restarted is False:
        out.append(f"{r.target} did not run again")
    if r.moved_s is not None and r.phase_at_strike == "steady":
        out.append(f"{r.target} was replaced {r.moved_s:.1f} s into the cut with nothing rolling")
    rate = r.query_success
    if rate is not None and rate < QUERY_SLO:
        out.append(f"query success {rate:.0%} < {QUERY_SLO:.0%} in the fault window")
    if r.plan.get("component") == "writer" and r.outage_s >= READERS_ALONE_S and not r.reader_ok_writer_down:
        out.append("readers did not answer while the writer was down")
    if r.alert and r.alert_expected:
        if r.alert_fired_s is None:
            out.append(f"{r.alert} did not fire")
        elif r.alert_resolved_s is None:
            out.append(f"{r.alert} did not resolve")
    return out


def describe(r: TrialResult) -> str:
    """One line for a trial's log."""
    return (f"trial seed={r.seed} {r.fault} -> {r.target or '?'} at {r.phase_at_strike}: "
            f"outage {r.outage_s:.1f} s, recovery {r.recovery_s} s, queries {r.queries_ok}/{r.queries}, "
            f"{'ok' if r.ok else r.failures}")  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


@dataclass
class FaultRow:
    """One line of the results table."""

    fault: str
    trials: int = 0
    passed: int = 0
    lost: int = 0
    resurrected: int = 0
    queries: int = 0
    queries_ok: int = 0
    recovered: int = 0
    recovery_p50_s: float | None = None
    recovery_p99_s: float | None = None
    alerts_expected: int = 0
    alerts_fired_resolved: int = 0
    seconds: float = 0.0

    @property
    def query_success(self) -> float | None:
        return self.queries_ok / self.queries if self.queries else None


def summarize(results: Sequence[TrialResult]) -> list[FaultRow]:
    """Per fault (in ``FAULTS`` order, then any other), and a last row "all"."""
    names = [f for f in FAULTS if any(r.fault == f for r in results)]
    names += sorted({r.fault for r in results} - set(names))
    rows = [_row(f, [r for r in results if r.fault == f]) for f in names]
    return [*rows, _row("all", list(results))] if results else []


def _row(name: str, rs: Sequence[TrialResult]) -> FaultRow:
    rec = [r.recovery_s for r in rs if r.recovery_s is not None]
    return FaultRow(
        fault=name,
        trials=len(rs),
        passed=sum(r.ok for r in rs),
        lost=sum(len(r.lost) for r in rs),
        resurrected=sum(len(r.resurrected) for r in rs),
        queries=sum(r.queries for r in rs),
        queries_ok=sum(r.queries_ok for r in rs),
        recovered=len(rec),
        recovery_p50_s=percentile(rec, 50),
        recovery_p99_s=percentile(rec, 99),
        alerts_expected=sum(bool(r.alert and r.alert_expected) for r in rs),
        alerts_fired_resolved=sum(
            bool(r.alert and r.alert_expected and r.alert_resolved_s is not None) for r in rs
        ),
        seconds=sum(r.seconds for r in rs),
    )


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def table(results: Sequence[TrialResult], header: str = "") -> str:
    """The markdown summary (per fault) and the per-trial table."""
    lines = [header, ""] if header else []
    lines += [
        "| fault | trials | passed | lost | resurrected | query success % | recovery p50 s | "
        "recovery p99 s | alerts fired+resolved / expected | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summarize(results):
        lines.append(
            f"| {row.fault} | {row.trials} | {row.passed} | {row.lost} | {row.resurrected} | "
            f"{_pct(row.query_success)} | {_s(row.recovery_p50_s)} | {_s(row.recovery_p99_s)} | "
            f"{row.alerts_fired_resolved}/{row.alerts_expected} | {row.seconds:.0f} |"
        )
    lines += [
        "",
        "| seed | fault | target | moment (phase) | outage s | recovery s | queries ok/all | "
        "writes acked/failed | lost | back | migration | alert (fired s / resolved s) | verdict |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        alert = "—"
        if r.alert:
            alert = f"{r.alert} ({_s(r.alert_fired_s)} / {_s(r.alert_resolved_s)})"
            alert += "" if r.alert_expected else " not expected"
        lines.append(
            f"| {r.seed} | {r.fault} | {r.target or '—'} | {r.plan.get('moment', '')} "
            f"({r.phase_at_strike or '—'}) | {r.outage_s:.1f} | {_s(r.recovery_s)} | "
            f"{r.queries_ok}/{r.queries} | {r.writes_acked}/{r.writes_failed} | {len(r.lost)} | "
            f"{len(r.resurrected)} | {r.migration or '—'} | {alert} | "
            f"{'ok' if r.ok else '; '.join(r.failures)} |"
        )
    return "\n".join(lines) + "\n"
