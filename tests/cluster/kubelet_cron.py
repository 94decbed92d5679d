"""The CronJob controller's decisions (PURE): when a schedule is due, which Jobs to start and
which finished ones the history limits drop. Standard 5-field cron (minute hour day-of-month
month day-of-week; ``*``, ``a-b``, ``*/n``, ``a-b/n``, lists; ``@hourly`` style macros), in UTC
(a CronJob without ``timeZone``, as the controller's default on a UTC node)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))


def _field(text: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (int(x) for x in base.split("-"))
        else:
            a = b = int(base)
            if step:  # "5/15": from 5 to the end
                b = hi
        out.update(range(a, b + 1, int(step) if step else 1))
    if not out or min(out) < lo or max(out) > hi + (1 if hi == 6 else 0):
        raise ValueError(f"cron field {text!r} outside {lo}-{hi}")
    return {0 if (hi == 6 and x == 7) else x for x in out}  # Sunday is 0 or 7


def parse_schedule(schedule: str) -> tuple[set[int], ...]:
    fields = MACROS.get(schedule.strip(), schedule).split()
    if len(fields) != 5:
        raise ValueError(f"cron schedule {schedule!r}: 5 fields expected")
    return tuple(_field(f, lo, hi) for f, (lo, hi) in zip(fields, RANGES, strict=True))


def matches(sets: tuple[set[int], ...], t: dt.datetime) -> bool:
    minute, hour, dom, month, dow = sets
    day_ok = t.day in dom
    wday_ok = (t.weekday() + 1) % 7 in dow
    # cron's rule: when both day fields are restricted, either may match
    both = len(dom) < 31 and len(dow) < 7
    return t.minute in minute and t.hour in hour and t.month in month and ((day_ok or wday_ok) if both else (day_ok and wday_ok))


def last_due(schedule: str, since: dt.datetime, now: dt.datetime, limit_min: int = 24 * 60) -> dt.datetime | None:
    """The latest scheduled minute in (since, now] (at most ``limit_min`` minutes back)."""
    sets = parse_schedule(schedule)
    t = now.replace(second=0, microsecond=0)
    for _ in range(limit_min):
        if t <= since:
            return None
        if matches(sets, t):
            return t
        t -= dt.timedelta(minutes=1)
    return None


@dataclass(frozen=True)
class CronStep:
    start: dt.datetime | None  # the scheduled time of a Job to create now
    delete: tuple[str, ...]  # finished Jobs beyond the history limits


def cron_plan(
    spec: Mapping[str, Any],
    last_schedule: dt.datetime,
    now: dt.datetime,
    jobs: Sequence[tuple[str, str, dt.datetime]],
) -> CronStep:
    """One step: ``jobs`` are the CronJob's Jobs as (name, state Active/Succeeded/Failed,
    creation time). A due time within ``startingDeadlineSeconds`` starts a Job unless
    suspended or (``Forbid``) one is active; ``Replace`` is treated as Forbid here (the
    operator uses Forbid). The oldest finished Jobs beyond the history limits go."""
    due = None
    if not spec.get("suspend"):
        due = last_due(str(spec["schedule"]), last_schedule, now)
        deadline = spec.get("startingDeadlineSeconds")
        if due is not None and deadline is not None and (now - due).total_seconds() > float(deadline):
            due = None
        if due is not None and spec.get("concurrencyPolicy", "Allow") != "Allow" and any(s == "Active" for _, s, _ in jobs):
            due = None
    drop: list[str] = []
    for state, key in (("Succeeded", "successfulJobsHistoryLimit"), ("Failed", "failedJobsHistoryLimit")):
        keep = int(spec.get(key, 3 if state == "Succeeded" else 1))
        done = sorted((t, n) for n, s, t in jobs if s == state)
        drop += [n for _, n in done[: max(0, len(done) - keep)]]
    return CronStep(due, tuple(drop))
