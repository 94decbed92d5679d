"""Chaos trials against a LocalCluster (issue 17 item 3): ``run_trial(cluster, fault, seed)``.

A trial: start the client load (tests/cluster/chaos_load.py: writers through the writer
Service with a ledger, readers through the readers' Service), wait for the plan's moment
(tests/cluster/chaos_plan.py), strike one pod, hold the fault, then measure:

* ``outage_s``: strike -> the fault is over (a killed or stopped pod running and ready
  again, the partition healed);
* ``recovery_s``: fault over -> the VectorIndex back in the phase it had before the strike, a
  query answered and a write acknowledged (both started after the fault was over);
* query success in the fault window (strike -> recovered) and of the readers while the
  writer was struck; the ledger (0 lost, 0 resurrected) read back from the writer;
* the watched migration ends Succeeded;
* the fault's alert (tests/cluster/observe.py ``FAULT_ALERTS``) fires and resolves on the
  cluster's Prometheus -- expected only when the outage outlasts its (compressed) ``for:``.

The trial never raises for a failed check: the result says which (``result.failures``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from index_operator.resources.common import service_name
from index_runtime.contract import Role
from tests.cluster import chaos_plan as cp
from tests.cluster.chaos_load import Load

COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
GATE = ("Pending", "SamplingPairs", "TrainingAdapter", "Evaluating", "Bridged")
ORDER = (*GATE, "Backfilling", "Backfilled", "CuttingOver", *cp.MIGRATION_DONE)
POLL_S = 0.25
KUBELET_SLACK_S = 10.0  # a SIGSTOP hold goes on this long at most for a late liveness kill


class Sampler(threading.Thread):
    """Every ``POLL_S``: (time, the VectorIndex phase) and (time, the alerts listed)."""

    def __init__(self, cluster: Any, namespace: str, index: str) -> None:
        super().__init__(daemon=True, name="chaos-sampler")
        self.cluster, self.namespace, self.index = cluster, namespace, index
        self.phases: list[tuple[float, str]] = []
        self.alerts: list[tuple[float, list[dict[str, Any]]]] = []
        self.stop = threading.Event()

    def phase(self) -> str:
        obj = self.cluster.get("vectorindexes", self.namespace, self.index) or {}
        return str((obj.get("status") or {}).get("phase", ""))

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            t = time.monotonic()
            with contextlib.suppress(Exception):  # the API thread busy: next poll
                self.phases.append((t, self.phase()))
            with contextlib.suppress(Exception):  # Prometheus busy: a gap in the samples
                self.alerts.append((t, self.cluster.prometheus.alerts()))

    def firing(self, name: str, labels: dict[str, str]) -> list[tuple[float, bool]]:
        return [
            (
                t,
                any(
                    a["labels"].get("alertname") == name
                    and a.get("state") == "firing"
                    and all(a["labels"].get(k) == v for k, v in labels.items())
                    for a in alerts
                ),
            )
            for t, alerts in list(self.alerts)
        ]


def load_prefix(seed: int) -> str:
    """The keys a trial's client load writes start with this."""
    return f"chaos-{seed}-"


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def target_pods(cluster: Any, namespace: str, index: str, component: str) -> list[Any]:
    """Running pods of ``component`` (the operator's in any namespace), sorted by name."""
    if component == "operator":
        pods, sel = cluster.kubelet.pods(None), {COMPONENT: "operator"}
    else:
        pods, sel = cluster.kubelet.pods(namespace), {COMPONENT: component, INSTANCE: index}
    return sorted(
        (p for p in pods if _matches(p.labels, sel) and p.proc is not None and p.proc.poll() is None),
        key=lambda p: p.name,
    )


def _liveness(cluster: Any, namespace: str, index: str, component: str) -> float:
    """The liveness allowance (scaled by the kubelet's probe_scale) of the component's pods."""
    for p in target_pods(cluster, namespace, index, component):
        pod = getattr(p, "manifest", None) or cluster.get("pods", p.namespace, p.name) or {}
        probe = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("livenessProbe")
        return cp.liveness_allowance_s(probe, float(getattr(cluster, "probe_scale", 1.0)))
    return 31.0


@dataclass(frozen=True)
class Struck:
    """The struck pod as it was at the strike (the kubelet's PodState is live: it changes in
    place when the container restarts)."""

    name: str
    namespace: str
    owner: tuple[str, str]
    restarts: int
    proc: Any
    host: Any
    # the owner's pods ready at the strike: a replacement is any other pod (a new one, or a
    # rollout's surge pod that was starting then)
    ready_then: frozenset[str]

    @classmethod
    def of(cls, pod: Any, cluster: Any) -> Struck:
        owned = [p for p in cluster.kubelet.pods(pod.namespace) if tuple(p.owner) == tuple(pod.owner)]
        then = frozenset(p.name for p in owned if p.ready)
        return cls(pod.name, pod.namespace, tuple(pod.owner), pod.restarts, pod.proc, pod.host, then)


def _back(cluster: Any, struck: Struck, *, ready: bool = True) -> bool:
    """The struck pod runs again and (with ``ready``) is ready: restarted in place (restart
    count or process changed) or, once it is gone, replaced by a pod of the same owner that
    was not ready at the strike (a new pod, or the surge pod of a rollout that was starting:
    a Deployment rolling when its old pod is killed deletes it instead of restarting it, as
    CI's campaign struck at a migration's end). A sibling that was serving already is no
    replacement. ``ready=False`` asks only whether the struck process was replaced."""
    now = [p for p in cluster.kubelet.pods(struck.namespace) if tuple(p.owner) == struck.owner]
    same = [p for p in now if p.name == struck.name]
    if same:
        p = same[0]
        changed = p.restarts > struck.restarts or (p.proc is not None and p.proc is not struck.proc)
        return bool(changed and (p.ready or not ready))
    return any((p.ready or not ready) and p.name not in struck.ready_then for p in now)


def _on_host(cluster: Any, struck: Struck) -> bool:
    """The struck pod still runs on the host struck (an in-place restart keeps its host and
    a cut on it; a replacement pod of the same name gets a new one)."""
    return any(p.name == struck.name and p.host is struck.host
               for p in cluster.kubelet.pods(struck.namespace))  # fmt: skip


def _wait(cond: Any, timeout_s: float, step_s: float = POLL_S) -> float | None:
    """Poll ``cond`` until true; the monotonic time it held, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cond():
                return time.monotonic()
        except Exception:  # a lookup failing mid-restart counts as "not yet"
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(step_s)


def _migration_phase(cluster: Any, namespace: str, name: str) -> str:
    obj = cluster.get("modelmigrations", namespace, name) or {}
    return str((obj.get("status") or {}).get("phase", ""))


def _reach_moment(cluster: Any, r: cp.TrialResult, plan: cp.Plan, namespace: str,
                  index: str, migration: str | None, timeout_s: float) -> None:
    """Wait for the plan's moment (``r.phase_at_strike`` says what was hit)."""
    if plan.moment == "steady" or migration is None:
        r.phase_at_strike = "steady" if migration is None else _migration_phase(cluster, namespace, migration)
        return

    def there() -> bool:
        phase = _migration_phase(cluster, namespace, migration)
        if phase not in ORDER:
            return False  # no status yet
        if ORDER.index(phase) > ORDER.index(GATE[-1] if plan.moment == "gate" else "Backfilling"):
            return True  # missed the moment (an earlier trial took it): strike now, it says where
        if plan.moment == "gate":  # not Pending: the migration's start rolls every pod of the
            # index (its encoders change); a partition of a writer about to be replaced struck
            # nothing (seed 12: 42 s "cut", the replacement flushed, no alert)
            return phase in GATE[1:]
        return phase == "Backfilling" and (
            plan.component != "job-backfill"
            or bool(target_pods(cluster, namespace, index, "job-backfill"))
        )

    _wait(there, timeout_s)
    r.phase_at_strike = _migration_phase(cluster, namespace, migration)


def run_trial(
    cluster: Any,
    fault: str,
    seed: int,
    *,
    namespace: str = "search",
    index: str = "docs",
    migration: str | None = None,
    moments: tuple[str, ...] | None = None,
    recovery_timeout_s: float = 180.0,
    migration_timeout_s: float = 600.0,
    wait_migration: bool = True,
    partition_s: tuple[float, float] = cp.PARTITION_S,
    loads: list[Load] | None = None,
) -> cp.TrialResult:
    """One trial of ``fault`` (chaos_plan.FAULTS) planned from ``seed``; see the module doc.
    ``migration``: the running ModelMigration (in ``namespace``) to strike in and, with
    ``wait_migration``, to wait for and check (else the caller fills ``result.migration``
    when it ends: several trials strike during one migration). ``partition_s``: the range
    of partition-s3's duration (the issue's 5-60 s). ``loads``: the trial's client load is
    appended (its ledger can be checked again after the migration it struck ends)."""
    t_start = time.monotonic()
    moments = moments or (cp.MOMENTS if migration else ("steady",))
    plan = cp.plan(fault, seed, moments=moments, partition_s=partition_s)
    if fault == "sigstop":
        allowance = _liveness(cluster, namespace, index, plan.component)
        plan = cp.plan(fault, seed, moments=moments, allowance_s=allowance)
    r = cp.TrialResult(fault=fault, seed=seed, plan=asdict(plan))
    expected = _expected_alert(fault)
    for_s = float(getattr(cluster, "for_s", 10.0))
    load = Load(
        index,
        write_url=_resolver(cluster, namespace, service_name(index, Role.WRITER)),
        read_url=_resolver(cluster, namespace, service_name(index, Role.READER)),
        write_token=cluster.token(namespace, index, "write"),
        read_token=cluster.token(namespace, index, "read"),
        prefix=load_prefix(seed),
        seed=seed,
    )
    sampler = Sampler(cluster, namespace, index)
    undo: list[Any] = []
    try:
        sampler.start()
        load.start()
        _reach_moment(cluster, r, plan, namespace, index, migration, migration_timeout_s)
        time.sleep(plan.delay_s)  # the seeded moment inside the phase
        phase_before = r.phase_before = sampler.phase()
        # a migration's start rolls the writer (its encoders change): strike once one runs
        _wait(lambda: target_pods(cluster, namespace, index, plan.component), 120)
        pods = target_pods(cluster, namespace, index, plan.component)
        if not pods:
            raise LookupError(f"no running {plan.component} pod to strike ({r.phase_at_strike})")
        struck = Struck.of(pods[plan.pick % len(pods)], cluster)
        r.target = struck.name
        labels = dict(expected.labels) if expected else {}
        if expected and expected.alert == "DriftlessRuntimeDown":
            labels["pod"] = struck.name
        # a previous trial's alert must be over, or this one cannot be told apart
        if expected and _wait(lambda: not _firing_now(sampler, expected.alert, labels), 120) is None:
            raise RuntimeError(f"{expected.alert} {labels} still firing from before the strike")
        t_strike = time.monotonic()
        t_over = _strike(cluster, plan, struck, r, undo)
        r.outage_s = t_over - t_strike
        # recovered: the phase of before, a query and a write answered, all after the fault
        deadline = t_over + recovery_timeout_s

        def recovered() -> float | None:
            migrating = migration is not None
            back = [(t, cp.phase_recovered(p, phase_before, migrating)) for t, p in list(sampler.phases)]
            times = [
                cp.first_true(back, t_over),
                cp.first_true([(t1, ok) for t0, t1, ok in load.read_samples() if t0 >= t_over], t_over),
                cp.first_true([(t1, ok) for t0, t1, ok in load.write_samples() if t0 >= t_over], t_over),
            ]
            return None if None in times else max(t for t in times if t is not None)

        _wait(lambda: recovered() is not None, recovery_timeout_s)
        t_rec = recovered()
        r.phase_after = sampler.phase()
        r.recovery_s = None if t_rec is None else round(t_rec - t_over, 2)
        t_end = t_rec or deadline
        # the queries the fault hit are the ones still retrying at the recovery: wait for
        # their outcome (each within the load's query budget) before counting the window
        _wait(lambda: load.reads_settled(t_end), load.query_budget_s + 5.0)
        reads = load.read_samples()
        window = [ok for t0, _, ok in reads if t_strike <= t0 <= t_end]
        r.queries, r.queries_ok = len(window), sum(window)
        if plan.component == "writer":  # answered while the writer was down, not after
            down = [(t1, ok) for t0, t1, ok in reads if t_strike <= t0 <= t_over]
            r.reader_queries_writer_down = len(down)
            r.reader_ok_writer_down = sum(ok and t1 <= t_over for t1, ok in down)
        if expected:
            r.alert = expected.alert
            lag = float(getattr(expected, "lag_s", 0.0))
            down = r.outage_s if r.down_s is None else r.down_s  # a kill: the lower bound
            r.alert_expected = cp.alert_expected(down, for_s, lag_s=lag)
            _alert_times(sampler, r, expected.alert, labels, t_strike, t_over, for_s)
        load.stop()
        lost, back, acked, failed = load.check()
        r.lost, r.resurrected, r.writes_acked, r.writes_failed = lost, back, acked, failed
        r.readers_lost, r.readers_resurrected = load.check_readers()
        if loads is not None:  # the caller checks the ledger again when the migration ends
            loads.append(load)
        if migration and wait_migration:
            done = _wait(lambda: _migration_phase(cluster, namespace, migration) in cp.MIGRATION_DONE,
                         migration_timeout_s, 1.0)
            r.migration = _migration_phase(cluster, namespace, migration) if done else "timed out"
    except Exception as exc:  # the result reports it; the campaign goes on
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        for fn in reversed(undo):
            fn()
        load.stop()
        sampler.stop.set()
        sampler.join(10)
    r.seconds = round(time.monotonic() - t_start, 1)
    return r


def _firing_now(sampler: Sampler, name: str, labels: dict[str, str]) -> bool:
    return any(ok for _, ok in sampler.firing(name, labels)[-2:])


def _strike(cluster: Any, plan: cp.Plan, struck: Struck, r: cp.TrialResult, undo: list[Any]) -> float:
    """Inject the fault and hold it; returns the monotonic time it was over."""
    if plan.fault == "partition-s3":
        s3_ip = cluster.s3.host.ip
        cluster.net.cut(struck.host, s3_ip)
        def heal() -> None:
            cluster.net.heal(struck.host, s3_ip)

        undo.append(heal)
        # a migration's start or end rolls the index's pods (its encoders change): a writer
        # replaced during the cut runs on a new host the cut never reached, so the fault is
        # over then (CI's run struck at CuttingOver, the writer rolled at Succeeded, and the
        # storage alert, expected for a 56.5 s cut, rightly never fired)
        t_cut = time.monotonic()
        moved = _wait(lambda: not _on_host(cluster, struck), plan.duration_s)
        r.moved_s = None if moved is None else moved - t_cut
        heal()
        undo.remove(heal)
        return moved or time.monotonic()
    if plan.fault == "sigstop":
        struck.proc.signal(signal.SIGSTOP)
        t_stop = time.monotonic()

        def cont() -> None:
            struck.proc.signal(signal.SIGCONT)

        undo.append(cont)
        # the kubelet's liveness probe must find it hung and restart it while it is held (the
        # hold outlasts the probes' allowance); ready again may take the pod's start-up beyond
        # the hold (a reader loads its index first), as after a kill
        # (up to KUBELET_SLACK_S more: the full run's reader, held 16.9 s against an
        # allowance of 7.75 s, was killed only just after the hold on 2 loaded cores)
        killed = _wait(lambda: _back(cluster, struck, ready=False), plan.duration_s + KUBELET_SLACK_S)
        if killed is None:
            cont()
        undo.remove(cont)
        # scraped as down from the stop until the kubelet started the new process, which
        # answers /metrics before it is ready (the full run's shadow, held 17.6 s, loaded its
        # index after that: its alert, expected from the outage to readiness, never fired)
        r.down_s = None if killed is None else killed - t_stop
        back = _wait(lambda: _back(cluster, struck), 120)
        r.restarted = killed is not None and back is not None
        return back or time.monotonic()
    struck.proc.signal(signal.SIGKILL)
    t_kill = time.monotonic()
    if plan.component == "job-backfill":
        return t_kill  # the Job retries the index; the migration's end is the check
    restarted = _wait(lambda: _back(cluster, struck, ready=False), 120)
    # down (no process to scrape) at least until the kubelet started the new one; a pod that
    # runs but is not ready yet (a writer replaying its WAL) is scraped: up == 1
    r.down_s = None if restarted is None else restarted - t_kill
    back = _wait(lambda: _back(cluster, struck), 120)
    r.restarted = back is not None
    return back or time.monotonic()


def _alert_times(sampler: Sampler, r: cp.TrialResult, name: str, labels: dict[str, str],
                 t_strike: float, t_over: float, for_s: float) -> None:
    """Fill alert_fired_s (after the strike) and alert_resolved_s (after the fault was over),
    waiting for the alert to fire (for: plus evaluation) and to resolve."""
    def fired() -> float | None:
        return cp.first_true(sampler.firing(name, labels), t_strike)

    if r.alert_expected:
        _wait(lambda: fired() is not None, max(0.0, t_over + 5.0 - time.monotonic()))
    t_fired = fired()
    if t_fired is None:
        return
    r.alert_fired_s = round(t_fired - t_strike, 2)

    def resolved() -> float | None:
        series = [(t, not ok) for t, ok in sampler.firing(name, labels)]
        return cp.first_true(series, max(t_fired, t_over))

    _wait(lambda: resolved() is not None, for_s + 90)
    t_res = resolved()
    r.alert_resolved_s = None if t_res is None else round(t_res - t_over, 2)


def _expected_alert(fault: str) -> Any:
    from tests.cluster.observe import FAULT_ALERTS

    return FAULT_ALERTS.get(fault)


def _resolver(cluster: Any, namespace: str, service: str) -> Any:
    """The Service's URL, looked up again for every attempt (the headless writer Service
    answers with its pod's current address)."""
    return lambda: cluster.service_url(namespace, service)
